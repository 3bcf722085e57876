"""Weight-only quantization: symmetric per-group integer codes, evaluated as fake quantization.

For a weight W [d_out, d_in], bits b and group size g, each row is cut into ceil(d_in / g)
groups of g input columns (the last one zero-padded) and, per group,

    scale = max|w| / (2^(b-1) - 1),   code = clamp(round(w / scale), -(2^(b-1) - 1), 2^(b-1) - 1)

(symmetric, restricted range: int8 codes in [-127, 127], int4 in [-7, 7]; no zero point). A
``QuantLinear`` is a plain ``nn.Linear`` whose weight IS the dequantized weight codes * scales,
so PyTorch evaluation needs no special kernel and ``torch.onnx.export`` sees an ordinary MatMul;
it also keeps ``bits``, ``group_size`` and the codes and scales as buffers, so the emitter can
find every quantized linear by type (or by name) and lower it to ONNX Runtime's MatMulNBits
(codes + 2^(b-1) as unsigned, the zero point implied) or to a DequantizeLinear + MatMul.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BITS = (2, 3, 4, 5, 6, 7, 8)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


@torch.no_grad()
def quantize_weight(w: torch.Tensor, bits: int, group_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int8 [d_out, d_in], scales [d_out, n_groups] in w's dtype, dequantized [d_out,
    d_in] in w's dtype). ``dequantized == codes * scales`` exactly (computed in float32)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    d_out, d_in = w.shape
    n_groups = math.ceil(d_in / group_size)
    pad = n_groups * group_size - d_in
    wg = F.pad(w.detach().float(), (0, pad)).view(d_out, n_groups, group_size)
    q = qmax(bits)
    scales = (wg.abs().amax(-1) / q).to(w.dtype).float()  # [d_out, G]; stored in w's dtype
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group: code 0
    codes = (wg / safe[..., None]).round().clamp(-q, q)  # [d_out, G, g]
    deq = (codes * scales[..., None]).view(d_out, -1)[:, :d_in]
    return (codes.view(d_out, -1)[:, :d_in].to(torch.int8), scales.to(w.dtype),
            deq.to(w.dtype))


class QuantLinear(nn.Linear):
    """An nn.Linear holding dequantized weights (fake quantization) plus what an integer
    kernel needs: ``bits``, ``group_size``, buffers ``qweight`` (int8 codes [d_out, d_in]) and
    ``scales`` ([d_out, ceil(d_in / group_size)])."""

    bits: int
    group_size: int

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> QuantLinear:
        """A new QuantLinear for ``linear`` (which is never modified; its bias is shared)."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.bits, q.group_size = int(bits), int(group_size)
        codes, scales, deq = quantize_weight(linear.weight, bits, group_size)
        q.weight = nn.Parameter(deq, requires_grad=False)
        q.bias = linear.bias
        q.register_buffer("qweight", codes)
        q.register_buffer("scales", scales)
        return q

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}"


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(||w||^2 / ||w - w_hat||^2)."""
    w, w_hat = w.detach().double(), w_hat.detach().double()
    noise = (w - w_hat).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(w.pow(2).sum().item() / noise)

