"""Low-rank linear layers and the activation-aware (whitened) SVD that builds them (CASP,
SVD-LLM; shared/methods.md section 8.2).

    W [d_out, d_in]  ~=  A [d_out, r] @ B [r, d_in]   as   Linear(d_in -> r) then Linear(r -> d_out)

Whitening: with G = E[x x^T] the second moment of the layer's inputs and S S^T = G (Cholesky,
lower triangular), ||(W - W') X||_F = ||(W - W') S||_F, so the rank-r truncation of the SVD of
W S is the rank-r W' with the least error on the calibration activations. Then
A = U_r sqrt(Sigma_r) and B = sqrt(Sigma_r) V_r^T S^{-1} (the square root balances the factors'
magnitudes, which keeps them quantization-friendly). Without G this is the plain SVD.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class LowRankLinear(nn.Sequential):
    """Linear(d_in -> rank, no bias) then Linear(rank -> d_out) replacing one Linear; the
    original bias (Qwen2's q/k), if any, sits on the second. Exports as two plain MatMuls."""

    def __init__(self, down: nn.Linear, up: nn.Linear, in_features: int, out_features: int):
        super().__init__(down, up)
        self.in_features, self.out_features = in_features, out_features
        self.rank = down.out_features

    def verify_factors(self) -> str | None:
        """The verifier's invariant: factors shaped like the weight they replace (else why)."""
        if len(self) != 2 or not all(isinstance(m, nn.Linear) for m in self):
            return "a low-rank projection must be exactly two Linear layers"
        down, up = self[0], self[1]
        want = [(down, (self.rank, self.in_features)), (up, (self.out_features, self.rank))]
        for which, (m, shape) in zip(("first", "second"), want):
            got = tuple(m.weight.shape)
            if got != shape or (m.out_features, m.in_features) != shape:
                return (f"{which} factor is {got} (declares {m.out_features}x{m.in_features}), "
                        f"expected {shape} for a rank-{self.rank} factorisation of a "
                        f"{self.out_features}x{self.in_features} weight")
        if down.bias is not None:
            return "the first factor must be bias-free"
        if not 1 <= self.rank <= min(self.in_features, self.out_features):
            return f"rank {self.rank} outside [1, {min(self.in_features, self.out_features)}]"
        return None


def rank_for_ratio(ratio: float, d_out: int, d_in: int) -> int:
    """CASP's rank for keeping ``ratio`` of a d_out x d_in weight's parameters:
    floor(ratio * d_out * d_in / (d_out + d_in)), at least 1, at most full rank."""
    return max(1, min(int(ratio * d_out * d_in / (d_out + d_in)), min(d_out, d_in)))


def _cholesky(cov: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower S with S S^T = cov + damp * mean(diag) * I; more damping until it factorizes."""
    d = cov.shape[0]
    eye = torch.eye(d, dtype=cov.dtype)
    scale = cov.diagonal().mean().clamp(min=1e-12)
    for attempt in range(8):
        s, info = torch.linalg.cholesky_ex(cov + (damp * 10 ** attempt) * scale * eye)
        if int(info) == 0:
            if attempt:
                log.info("whitening: damping raised to %g to factorize", damp * 10 ** attempt)
            return s
    raise ValueError("calibration covariance is not positive definite even with damping")


@torch.no_grad()
def factorize(linear: nn.Linear, rank: int, cov: torch.Tensor | None = None,
              damp: float = 0.01) -> LowRankLinear:
    """A new LowRankLinear approximating ``linear`` (never modified) at ``rank``.

    ``cov``: E[x x^T] of the layer's inputs [d_in, d_in] (whitened SVD), or None (plain SVD).
    Computed in float64 and cast to the weight's dtype; meta weights give meta factors.
    """
    w = linear.weight  # [d_out, d_in]
    d_out, d_in = w.shape
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank {rank} outside [1, {min(d_out, d_in)}] for a {d_out}x{d_in} "
                         "weight")
    kw = {"dtype": w.dtype, "device": w.device}
    down = nn.Linear(d_in, rank, bias=False, **kw)
    up = nn.Linear(rank, d_out, bias=linear.bias is not None, **kw)
    down.weight.requires_grad_(False)
    up.weight.requires_grad_(False)
    if linear.bias is not None:
        up.bias = linear.bias  # shared, not copied: it is never written
    if w.is_meta:  # config-only model on the meta device: shapes are all the cost model needs
        return LowRankLinear(down, up, d_in, d_out)
    w64 = w.detach().to("cpu", torch.float64)
    if cov is None:
        u, sig, vh = torch.linalg.svd(w64, full_matrices=False)
        b = vh[:rank]  # [r, d_in]
    else:
        s = _cholesky(cov.to("cpu", torch.float64), damp)  # [d_in, d_in], lower
        u, sig, vh = torch.linalg.svd(w64 @ s, full_matrices=False)
        # B = V_r^T S^{-1}: solve B S = V_r^T (triangular)
        b = torch.linalg.solve_triangular(s, vh[:rank], upper=False, left=False)
    root = sig[:rank].sqrt()
    up.weight.copy_((u[:, :rank] * root).to(**kw))  # [d_out, r]
    down.weight.copy_((root[:, None] * b).to(**kw))  # [r, d_in]
    return LowRankLinear(down, up, d_in, d_out)
