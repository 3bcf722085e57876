"""Token-level leaf modules shared by the token passes: scorers and the static keep-top-k gather.

Scores are computed explicitly from a layer's own norm, q/k projections and RoPE for the query
rows needed (one row for the last prompt token), so every layer stays on SDPA and no n x n
matrix is built for the FastV/PyramidDrop scorer.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _rotary_fn(attn: nn.Module):
    """The apply_rotary_pos_emb of the attention's own modeling module (Llama, Qwen2, ...)."""
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


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
        H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
        h = self.layer.input_layernorm(hidden)  # [B, T, D]
        B, T, _ = h.shape
        cos, sin = rope  # [B, T, hd]
        rows = h[:, -1:] if self.mode == "last" else h
        Tq = rows.shape[1]
        q = attn.q_proj(rows).view(B, Tq, H, hd).transpose(1, 2)  # [B, H, Tq, hd]
        k = attn.k_proj(h).view(B, T, KV, hd).transpose(1, 2)  # [B, KV, T, hd]
        rot = _rotary_fn(attn)
        q, _ = rot(q, q, cos[:, -Tq:], sin[:, -Tq:])
        k, _ = rot(k, k, cos, sin)
        k = k.repeat_interleave(H // KV, dim=1)  # [B, H, T, hd]
        logits = (q @ k.transpose(-1, -2)).float() * attn.scaling  # [B, H, Tq, T]
        ok = attention_mask.bool()[:, None, None, :]  # padding keys are never attended
        if Tq > 1:  # causal for the full-row mode
            ok = ok & torch.ones(Tq, T, dtype=torch.bool, device=h.device).tril(T - Tq)
        p = logits.masked_fill(~ok, float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)
        if self.mode == "last":
            return p[:, 0]  # [B, T]
        w = (~visual_mask & attention_mask.bool()).to(p.dtype)  # text query rows [B, Tq]
        return (p * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)


class HashScore(nn.Module):
    """A fixed pseudo-random score per original position: the 'random' baseline, exportable."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        x = torch.sin(position_ids.double() * 12.9898 + self.seed * 78.233) * 43758.5453
        return (x - torch.floor(x)).float()  # [B, T] in [0, 1)


class KeepTopK(nn.Module):
    """Keep the ``keep`` best-scored visual tokens and every non-visual token, in order.

    Static: each row has exactly ``n_visual`` visual tokens in, ``keep`` out, so the output length
    is T - n_visual + keep for every sample and every batch stays rectangular.
    """

    def __init__(self, n_visual: int, keep: int):
        super().__init__()
        if not 0 <= keep <= n_visual:
            raise ValueError(f"keep must be in [0, {n_visual}], got {keep}")
        self.n_visual, self.keep = n_visual, keep

    def forward(self, scores, hidden, position_ids, visual_mask, attention_mask):
        B, T = visual_mask.shape
        s = scores.float().masked_fill(~visual_mask, float("-inf"))
        top = s.topk(self.keep, dim=-1).indices  # [B, keep]
        kept = (~visual_mask).scatter(1, top, True)  # [B, T]
        ar = torch.arange(T, device=hidden.device).expand(B, T)
        # kept slots sort first, by position; dropped ones after: the first T' are the kept ones
        T_new = T - self.n_visual + self.keep
        idx = torch.where(kept, ar, ar + T).sort(dim=-1).values[:, :T_new]  # [B, T']
        hid = hidden.gather(1, idx[..., None].expand(B, T_new, hidden.shape[-1]))
        return (hid, position_ids.gather(1, idx), visual_mask.gather(1, idx),
                attention_mask.gather(1, idx))
