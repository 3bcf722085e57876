"""ToMe, token merging inside the vision tower (pass merge_vision).

Follows the official code, facebookresearch/ToMe at af95e4b (``tome/merge.py``
``bipartite_soft_matching`` and ``merge_wavg``, ``tome/patch/timm.py`` ``ToMeBlock``,
``ToMeAttention`` and ``apply_patch``); written from the rule, no code copied. In each ViT layer
i that merges (r_i > 0), between the attention and the MLP:
  metric = that layer's keys averaged over heads [N, hd] (L2-normalised);
  A = tokens 0, 2, 4, ..., B = tokens 1, 3, 5, ... (alternating); score = cos(A, B), CLS's row
      -inf (CLS is never merged); each A token's best B match (first on ties) and its score;
  the r_i A tokens with the highest best score (a stable descending sort) merge into their
      match: x_B = sum over its group of size * x / sum of size (``merge_wavg``), size adds up;
      r_i = min(r_i, (N - 1) // 2), at most half the tokens (``bipartite_soft_matching``);
  the new sequence is [unmerged A (in order, CLS first), all of B] (ToMe's own order);
  proportional attention (``prop_attn``, the official default for off-the-shelf models such as
      LLaVA's CLIP): every later attention adds log(size) of each key to its logits.
The tower runs only the layers up to the one LLaVA's projector reads (``vision_feature_layer``;
HF's tower runs every layer), and the merged features leave it with CLS dropped.

Deviations (vlmopt's, stated):
  order and slots: ToMe's order [unmerged A, B] carries no spatial meaning and the LLM's prompt
      holds one slot per patch; each merged token is written into the slot of its *anchor*, the
      patch of the B token that absorbed the others (an unmerged token: its own patch), so the
      LLM sees the merged tokens in patch order; their positions are renumbered 0.. after the cut
      (``positions="contiguous"``, the preset's default, as LLaVA rebuilds the sequence from the
      tower's output) or keep their anchor's position (``"original"``).
  argsort: the official ``argsort(descending=True)`` is not stable (tied scores, e.g. duplicate
      flat patches, may go either way); here ties keep token order (the rank of a stable sort,
      computed from pairwise comparisons, so that it exports).
  schedule: besides the official constant ``r`` (``parse_r`` with an int) or per-layer list,
      a ``keep`` target spreads R = Nv - keep merges over the merging layers as evenly as the
      50% cap allows, earlier layers taking the remainder (vlmopt's convenience).
  ModelTC/LightCompress's port (``llmc/compression/token_reduction/tome.py`` at 9701d035)
      drops proportional attention and restarts the sizes at 1 in every layer; not followed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmopt.ir.select import has_cls, vision_layers


def effective_r(rs: list[int], n_tokens: int, protected: int) -> list[int]:
    """Per layer, the merges that run: each r capped at half the mergeable tokens then."""
    out, n = [], n_tokens
    for r in rs:
        r = max(0, min(r, (n - protected) // 2))
        out.append(r)
        n -= r
    return out


def _most(n: int, layers: int, protected: int) -> int:
    """The most merges ``layers`` layers can make starting from ``n`` tokens (each at its cap)."""
    return sum(effective_r([n] * layers, n, protected))


def spread(total: int, n_layers: int, n_tokens: int, protected: int) -> list[int] | None:
    """``total`` merges over ``n_layers`` layers, as even as the 50% cap allows: each layer takes
    ceil(left / layers left), more where the later layers' caps could not take the rest; None if
    even every layer at its cap falls short."""
    if _most(n_tokens, n_layers, protected) < total:
        return None
    rs, n, left = [], n_tokens, total
    for i in range(n_layers):
        m = n_layers - i
        r = min(-(-left // m), (n - protected) // 2)
        while _most(n - r, m - 1, protected) < left - r:  # NOTE: front-load what must be
            r += 1
        rs.append(r)
        n, left = n - r, left - r
    return rs


def bipartite_merge(metric: torch.Tensor, r: int, cls: bool):
    """ToMe's matching on metric [B, N, C]: a function mapping [B, N, X] -> [B, N - r, X]
    (``mode`` "sum" adds a group up, "keep" leaves each B token's own row, for anchors)."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(1, 2)  # [B, Na, Nb]
    if cls:
        first = torch.arange(scores.shape[1], device=scores.device)[None, :, None] == 0
        scores = scores.masked_fill(first, float("-inf"))
    best, match = scores.max(dim=-1)  # [B, Na]
    # rank in a stable descending sort, from comparisons (a stable sort does not export):
    # the tokens scoring higher, and those scoring the same at a lower index
    Na = best.shape[1]
    ar = torch.arange(Na, device=best.device)
    ahead = (best[:, None, :] > best[:, :, None]) | (
        (best[:, None, :] == best[:, :, None]) & (ar[None, :] < ar[:, None]))  # [B, i, j]
    is_src = ahead.sum(-1) < r  # [B, Na]: the r best matches merge
    src = torch.where(is_src, ar, ar + Na).sort(dim=-1).values[:, :r]  # [B, r]
    unm = torch.where(is_src, ar + Na, ar).sort(dim=-1).values[:, :Na - r]  # CLS (0) first
    dst = match.gather(1, src)  # [B, r]

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        xa, xb = x[:, ::2], x[:, 1::2]
        C = x.shape[-1]
        kept = xa.gather(1, unm[..., None].expand(-1, -1, C))
        if mode == "sum":
            moved = xa.gather(1, src[..., None].expand(-1, -1, C))
            xb = xb.scatter_add(1, dst[..., None].expand(-1, -1, C), moved)
        return torch.cat([kept, xb], dim=1)

    return merge


def attention(attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None):
    """CLIP self-attention of x [B, N, Dv] with proportional attention (log size [B, N, 1]
    added to every key's logits) -> (output [B, N, Dv], keys averaged over heads [B, N, hd])."""
    B, N, _ = x.shape
    hd = attn.head_dim
    q, k, v = (p(x).view(B, N, -1, hd).transpose(1, 2)
               for p in (attn.q_proj, attn.k_proj, attn.v_proj))  # [B, H, N, hd]
    bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)  # [B,1,1,N]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    return attn.out_proj(o.transpose(1, 2).reshape(B, N, -1)), k.mean(1)


class ToMeVision(nn.Module):
    """pixel_values -> (merged features [B, N', Dv] in anchor order, anchors [B, N'] patch
    indices 0..Nv-1, sorted): a CLIP tower run layer by layer up to the feature layer, merging
    ``r[i]`` tokens in layer i (the effective, capped counts)."""

    def __init__(self, tower: nn.Module, feature_layer: int, drop_cls: bool, r: list[int],
                 prop_attn: bool = True):
        super().__init__()
        vm = getattr(tower, "vision_model", tower)
        layers = vision_layers(tower)
        f = feature_layer % (len(layers) + 1)  # index into hidden_states
        if not hasattr(vm, "pre_layrnorm") or not (drop_cls and has_cls(tower)) or f == 0:
            raise ValueError("ToMe needs a CLIP vision tower whose CLS is dropped (strategy "
                             "'default') and a feature layer produced by a ViT layer")
        if len(r) != f:
            raise ValueError(f"field 'r': {len(r)} entries for the {f} ViT layers that run")
        self.tower, self.vm, self.f, self.r, self.prop_attn = tower, vm, f, list(r), prop_attn
        self.layers = layers

    def forward(self, pixel_values: torch.Tensor):
        x = self.vm.pre_layrnorm(self.vm.embeddings(pixel_values))  # [B, 1 + Nv, Dv]
        B, N, _ = x.shape
        size = None  # [B, N, 1] once a merge happened (all ones before: no bias)
        anchor = torch.arange(-1, N - 1, device=x.device).expand(B, N)[..., None]  # CLS: -1
        for layer, r in zip(self.layers[:self.f], self.r):
            h, metric = attention(layer.self_attn, layer.layer_norm1(x),
                                  size if self.prop_attn else None)
            x = x + h
            if r:
                merge = bipartite_merge(metric, r, cls=True)
                s = torch.ones_like(x[..., :1]) if size is None else size
                size = merge(s)
                x = merge(x * s) / size
                anchor = merge(anchor, mode="keep")
            x = x + layer.mlp(layer.layer_norm2(x))
        x, anchor = x[:, 1:], anchor[:, 1:, 0]  # CLS stays first: dropped
        order = anchor.argsort(dim=-1)
        return x.gather(1, order[..., None].expand_as(x)), anchor.gather(1, order)


class AnchorSlots(nn.Module):
    """(merged embeddings [B, N', D], anchors [B, N']) -> (embeddings on the patch grid
    [B, Nv, D], each merged token at its anchor's row and zeros elsewhere; kept [B, Nv])."""

    recompute = True  # cheaper to recompute than to keep (search.evaluator)

    def __init__(self, n_visual: int):
        super().__init__()
        self.n_visual = n_visual

    def forward(self, embeds: torch.Tensor, anchors: torch.Tensor):
        B, _, D = embeds.shape
        grid = embeds.new_zeros(B, self.n_visual, D).scatter(
            1, anchors[..., None].expand(-1, -1, D), embeds)
        kept = embeds.new_zeros(B, self.n_visual).scatter(1, anchors, 1.0)
        return grid, kept
