"""Token-level leaf modules shared by the token passes: scorers and the static keep-top-k gather.

Scores are computed explicitly from a layer's own norm, q/k projections and RoPE for the query
rows needed (one row for the last prompt token), so every layer stays on SDPA and no n x n
matrix is built for the FastV/PyramidDrop scorer.
"""

from __future__ import annotations

import sys
from fractions import Fraction

import torch
from torch import nn


def _rotary_fn(attn: nn.Module):
    """The apply_rotary_pos_emb of the attention's own modeling module (Llama, Qwen2, ...)."""
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


def qk_heads(attn: nn.Module, rows: torch.Tensor, h: torch.Tensor):
    """Queries of ``rows`` [B, Tq, D] and keys of ``h`` [B, T, D] as the attention computes them
    before RoPE: [B, H, Tq, hd] and [B, KV, T, hd], with the per-head q/k RMSNorm of families
    that have one (Qwen3)."""
    hd = attn.head_dim
    q = attn.q_proj(rows).view(*rows.shape[:2], -1, hd)
    k = attn.k_proj(h).view(*h.shape[:2], -1, hd)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2)


def gather_positions(position_ids: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Position ids of tokens ``idx`` [B, T']: from [B, T], or all three M-RoPE rows [3, B, T]."""
    if position_ids.dim() == 3:
        return position_ids.gather(2, idx[None].expand(position_ids.shape[0], *idx.shape))
    return position_ids.gather(1, idx)


def contiguous_positions(position_ids: torch.Tensor, attention_mask: torch.Tensor
                         ) -> torch.Tensor:
    """Position ids renumbered 0.. over the kept sequence's real tokens, as a model run on the
    shortened sequence numbers them (``cumsum(attention_mask) - 1``): the
    convention of PyramidDrop's, DivPrune's and VisionZip's official code. Left padding sits
    at 0, as in vlmopt's own inputs (``inputs.encode``)."""
    m = attention_mask.to(position_ids.dtype)
    return (m.cumsum(-1) - 1).clamp(min=0)


def visual_count(visual_mask: torch.Tensor, static: int | None) -> int:
    """Visual tokens per row: the static count, or (dynamic resolution) the mask's, which must
    be the same in every row of the batch (batch images of one size together)."""
    if static is not None:
        return static
    counts = visual_mask.sum(-1)
    n = int(counts[0])
    if bool((counts != n).any()):
        raise ValueError(f"rows of one batch carry different visual-token counts "
                         f"({sorted(set(counts.tolist()))}); batch images of one size together")
    return n


def keep_count(keep: int | float, n: int) -> int:
    """A budget at ``n`` visual tokens: a count, or a fraction of the n, rounded half up, at
    least 1. NOTE: integer arithmetic on the fraction's exact ratio, so a symbolic n (export
    with dynamic resolution) gives the same count as eager."""
    if isinstance(keep, float):
        p, q = Fraction(keep).as_integer_ratio()
        return max(1, min(n, (2 * n * p + q) // (2 * q)))
    if keep > n:
        raise ValueError(f"keep={keep} but only {n} visual tokens reach this point")
    return keep


class AttnScore(nn.Module):
    """Head-mean softmax attention that visual tokens receive, from chosen query rows.

    mode "last": the last prompt token's row (FastV's code, PyramidDrop's inference rule).
    mode "text_mean": mean over every non-visual, non-padding query row (text-guided).
    Returns scores [B, T] (zero on non-visual slots; callers mask them anyway).
    """

    def __init__(self, layer: nn.Module, mode: str):
        super().__init__()
        self.layer, self.mode = layer, mode  # HF decoder layer (shared, read-only)

    def forward(self, hidden, rope, visual_mask, attention_mask):
        attn = self.layer.self_attn
        cfg = attn.config
        H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
        h = self.layer.input_layernorm(hidden)  # [B, T, D]
        B, T, _ = h.shape
        cos, sin = rope  # [B, T, hd]
        rows = h[:, -1:] if self.mode == "last" else h
        Tq = rows.shape[1]
        q, k = qk_heads(attn, rows, h)  # [B, H, Tq, hd], [B, KV, T, hd]
        rot = _rotary_fn(attn)
        q, _ = rot(q, q, cos[:, -Tq:], sin[:, -Tq:])
        k, _ = rot(k, k, cos, sin)
        k = k.repeat_interleave(H // KV, dim=1)  # [B, H, T, hd]
        logits = (q @ k.transpose(-1, -2)).float() * attn.scaling  # [B, H, Tq, T]
        ok = attention_mask.bool()[:, None, None, :]  # padding keys are never attended
        # NOTE: branch on the mode, not on Tq: after a data-dependent count (an exported Loop)
        # Tq is an unbacked size and torch.export cannot decide ``Tq > 1``
        if self.mode != "last":  # causal for the full-row mode (Tq == T)
            ok = ok & torch.ones(Tq, T, dtype=torch.bool, device=h.device).tril(T - Tq)
        p = logits.masked_fill(~ok, float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)
        if self.mode == "last":
            return p[:, 0]  # [B, T]
        w = (~visual_mask & attention_mask.bool()).to(p.dtype)  # text query rows [B, Tq]
        return (p * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)


class HashScore(nn.Module):
    """A fixed pseudo-random score per original position: the 'random' baseline, exportable."""

    recompute = True  # cheaper to recompute than to keep (search.evaluator)

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if position_ids.dim() == 3:  # M-RoPE: an image's (h, w) rows tell its tokens apart
            position_ids = position_ids[1] * 4099 + position_ids[2]
        x = torch.sin(position_ids.double() * 12.9898 + self.seed * 78.233) * 43758.5453
        return (x - torch.floor(x)).float()  # [B, T] in [0, 1)


class KeepTopK(nn.Module):
    """Keep the ``keep`` best-scored visual tokens and every non-visual token, in order.

    Static per input size: each row has exactly n visual tokens in (``n_visual``, or for
    dynamic-resolution families the mask's count, equal across the batch) and
    ``keep_count(keep, n)`` out, so every batch stays rectangular. Returns the shortened
    (hidden, position_ids, visual_mask, attention_mask) and the kept slot indices [B, T'].
    """

    recompute = True  # cheaper to recompute than to keep (search.evaluator)

    def __init__(self, n_visual: int | None, keep: int | float):
        super().__init__()
        if n_visual is not None and not 0 <= keep <= n_visual:
            raise ValueError(f"keep must be in [0, {n_visual}], got {keep}")
        self.n_visual, self.keep = n_visual, keep

    def forward(self, scores, hidden, position_ids, visual_mask, attention_mask):
        B, T = visual_mask.shape
        n = visual_count(visual_mask, self.n_visual)
        keep = keep_count(self.keep, n)
        s = scores.float().masked_fill(~visual_mask, float("-inf"))
        top = s.topk(keep, dim=-1).indices  # [B, keep]
        kept = (~visual_mask).scatter(1, top, True)  # [B, T]
        ar = torch.arange(T, device=hidden.device).expand(B, T)
        # kept slots sort first, by position; dropped ones after: the first T' are the kept ones
        T_new = T - n + keep
        idx = torch.where(kept, ar, ar + T).sort(dim=-1).values[:, :T_new]  # [B, T']
        hid = hidden.gather(1, idx[..., None].expand(B, T_new, hidden.shape[-1]))
        return (hid, gather_positions(position_ids, idx), visual_mask.gather(1, idx),
                attention_mask.gather(1, idx), idx)
