"""VisPruner's selection (Theia-4869/VisPruner at aefa01a, llava/model/llava_arch.py
``encode_images``): visual-only importance, then diversity among the rest.

Written from the official rule (no code copied). For T kept of Nv visual tokens and the
important ratio q (the eval scripts' default 0.5):
  important = the int(T * q) patches with the highest CLS attention of the ViT layer producing
      the projector's features (head mean; vlmopt's CLS module sums heads: same order);
  residual = the other patches, in descending CLS-attention order;
  while len(residual) > T - int(T * q): split the residual list by position into a (even) and
      b (odd); score each a-token by its highest cosine (vision features of that layer) to any
      b-token; drop the r = min(8, len(residual) - T_div) highest-scored a-tokens; the new
      residual list is the remaining a-tokens in descending-score order followed by b;
  kept = important + residual, in patch order.
Deviation: where the official code cannot run (an odd residual count, or r above the a-half;
its indexing raises there) the a-half is ceil(R/2) tokens and r is capped at it.

The loop's length grows with Nv - T (64 rounds at 576 -> 64), so it is not unrolled: PyTorch
only for now, with a clear error at ONNX export.
"""

from __future__ import annotations

import torch
from torch import nn


class VisPrunerSelect(nn.Module):
    """(features [B, Nv, Dv], cls_attention [B, Nv]) -> kept [B, Nv] (1 = kept)."""

    def __init__(self, n_visual: int, keep: int, important_ratio: float):
        super().__init__()
        if not 1 <= keep <= n_visual:
            raise ValueError(f"VisPruner keeps 1..{n_visual} tokens, got {keep}")
        self.n_visual, self.keep, self.important_ratio = n_visual, keep, important_ratio

    @property
    def n_important(self) -> int:
        return int(self.keep * self.important_ratio)

    def forward(self, feats: torch.Tensor, cls_attention: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            raise ValueError("select_visual: VisPruner's duplicate removal is a loop whose "
                             "length grows with the tokens removed; it runs in PyTorch only "
                             "and is not exportable to ONNX yet")
        B, Nv, D = feats.shape
        n_imp = self.n_important
        n_div = self.keep - n_imp
        order = cls_attention.argsort(dim=-1, descending=True)  # [B, Nv]
        sel, res = order[:, :n_imp], order[:, n_imp:]
        x = feats.float() / feats.float().norm(dim=-1, keepdim=True)  # [B, Nv, D]
        while n_div > 0:  # NOTE: sequential; each round reorders what the next one splits
            R = res.shape[1]
            a, b = res[:, 0::2], res[:, 1::2]
            r = min(8, R - n_div, a.shape[1])
            if r <= 0:
                break
            xa = x.gather(1, a[..., None].expand(-1, -1, D))  # [B, ceil(R/2), D]
            xb = x.gather(1, b[..., None].expand(-1, -1, D))  # [B, R // 2, D]
            s = (xa @ xb.transpose(1, 2)).amax(-1)  # [B, ceil(R/2)]: best match in b
            a = a.gather(1, s.argsort(dim=-1, descending=True)[:, r:])
            res = torch.cat([a, b], dim=1)
        if n_div > 0:
            sel = torch.cat([sel, res], dim=1)  # [B, T]
        kept = torch.zeros(B, Nv, dtype=feats.dtype, device=feats.device)
        return kept.scatter(1, sel, 1.0)
