"""DART's duplication-aware selection inside the LLM (drop_tokens, scorer "dart").

Follows the official code, xqy1111111/DART at 5a19452 (the fork holding the history of
ZichenWen1/DART): ``llava/model/language_model/modeling_llama_self.py``, class ``DART``,
``forward`` and ``get_retained_image_token`` (LLaVA), and
``Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py`` (same rule on Qwen2.5-VL); the
ModelTC/LightCompress port (``llmc/compression/token_reduction/dart.py`` at 9701d035) reads the
same tensors. Written from the rule; no code copied. Pruning before decoder layer K (default 2):
  keys = layer K-1's keys, post-RoPE (what its attention returns; LightCompress reads them from
      the KV cache), L1 norm over every head and channel (GQA repeats scale it uniformly);
  image pivots = the ``pivot_image`` visual tokens with the largest key L1 norm;
  text pivots = the ``pivot_text`` tokens after the image span with the largest key L1 norm;
  features = the model's final RMSNorm applied to layer K-1's output (the hidden at the cut);
  pool = the visual tokens that are not image pivots;
  for each pivot in turn: take from the pool the ``TOKEN_TOPK`` tokens least cosine-similar to
      the pivot, and remove them from the pool;
  kept = image pivots + every token taken; positions are the original ones (the official code
      gathers the position ids / M-RoPE rows with the kept indices).
The picks are removed from the pool, so no token is taken twice: the official count is static,
``pivot_image + (pivot_image + pivot_text) * TOKEN_TOPK`` (LLaVA's default budget 128 -> 4 + 8 * 16
= 132 of 576). Here the count is the drop's ``keep``: the ``keep - pivot_image`` picks are split
over the P pivots, the first ``(keep - pivot_image) % P`` in visiting order taking one more,
which is the official split exactly when ``keep`` is of the official form (preset
``drop_tokens.dart``). So the rule is a static unrolled loop of P top-k's: exportable.

Deterministic choices where the official code leaves it open or cannot run (vlmopt's, stated):
  * order: the official code visits ``list(set(image_pivots + text_pivots))``, i.e. CPython's
    set order (slot order, by value mod table size: arbitrary for positions). Here the pivots
    are visited in the order the official code lists them before the set: image pivots by
    descending key norm, then text pivots by descending key norm. The order matters (each pivot
    takes from what the previous ones left); the tests measure how much.
  * "after the image" means after the row's last visual token (one image span in the official
    code). Where fewer than ``pivot_text`` text tokens follow it (the official ``topk`` raises;
    e.g. prompts whose question precedes the image), the rest come from the earlier text tokens
    by the same norm; where there are fewer text tokens than that, the last token stands in.
  * batches (the official code asserts batch 1): every row on its own, padding never a pivot.
  * a budget below ``pivot_image`` (a fraction on a small image) keeps the best-ranked image
    pivots only; all pivots still take their turn, so the loop stays static.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmopt.ir.tokens import _rotary_fn, keep_count, visual_count


def key_l1(layer: nn.Module, hidden: torch.Tensor, rope) -> torch.Tensor:
    """L1 norm of each token's post-RoPE keys in ``layer`` over all KV heads: [B, T]."""
    attn = layer.self_attn
    h = layer.input_layernorm(hidden)  # [B, T, D]
    B, T, _ = h.shape
    k = attn.k_proj(h).view(B, T, -1, attn.head_dim)
    if hasattr(attn, "k_norm"):  # Qwen3's per-head key RMSNorm, before RoPE
        k = attn.k_norm(k)
    k = k.transpose(1, 2)  # [B, KV, T, hd]
    cos, sin = rope
    k, _ = _rotary_fn(attn)(k, k, cos, sin)
    return k.float().abs().sum(dim=(1, 3))  # [B, T]


def _top(score: torch.Tensor, k, margins: bool, scale: torch.Tensor | float = 1.0):
    """topk indices, and (margins) the gap between the k-th and the (k+1)-th value [B],
    divided by ``scale``."""
    if not margins:
        return score.topk(k, dim=-1).indices, None
    n = min(int(k) + 1, score.shape[-1])
    v = score.topk(n, dim=-1)
    if n <= k or k == 0:
        return v.indices[:, :k], torch.full(score.shape[:1], float("inf"))
    gap = (v.values[:, k - 1] - v.values[:, k]) / scale
    return v.indices[:, :k], torch.where(torch.isfinite(v.values[:, k]), gap, float("inf"))


class DartScore(nn.Module):
    """(hidden and rope entering layer K-1, hidden at the cut, visual mask, padding mask)
    -> scores [B, T]: 1 on the ``keep`` visual tokens DART keeps, 0 elsewhere."""

    def __init__(self, layer: nn.Module, norm: nn.Module, n_visual: int | None,
                 keep: int | float, pivot_image: int = 4, pivot_text: int = 4):
        super().__init__()
        self.layer, self.norm = layer, norm  # HF layer K-1 and final norm (shared, read-only)
        self.n_visual, self.keep = n_visual, keep
        self.pivot_image, self.pivot_text = pivot_image, pivot_text

    def forward(self, src_hidden, src_rope, hidden, visual_mask, attention_mask):
        return self._select(src_hidden, src_rope, hidden, visual_mask, attention_mask)[0]

    @torch.no_grad()
    def decision_margin(self, src_hidden, src_rope, hidden, visual_mask, attention_mask):
        """Per sample [B]: the smallest gap at any top-k boundary (relative for key norms,
        absolute for cosines). Rounding differences between runtimes can flip a pick whose gap
        is below them (emit screens parity samples by it). PyTorch only."""
        return self._select(src_hidden, src_rope, hidden, visual_mask, attention_mask,
                            margins=True)[1]

    def _select(self, src_hidden, src_rope, hidden, visual_mask, attention_mask,
                margins: bool = False):
        B, T = visual_mask.shape
        keep = keep_count(self.keep, visual_count(visual_mask, self.n_visual))
        n_img = torch.sym_min(self.pivot_image, keep)
        P = self.pivot_image + self.pivot_text
        gap = torch.full((B,), float("inf"), device=hidden.device)
        l1 = key_l1(self.layer, src_hidden, src_rope)  # [B, T]
        ninf = float("-inf")
        top_l1 = l1.amax(-1).clamp(min=1e-12)  # margins of the norms: relative to the top
        # NOTE: always pivot_image pivots (a static loop); a budget below that keeps only
        # the first n_img of them (the others stay in the pool)
        img, g = _top(l1.masked_fill(~visual_mask, ninf), self.pivot_image, margins, top_l1)
        gap = gap if g is None else torch.minimum(gap, g)

        ar = torch.arange(T, device=hidden.device).expand(B, T)
        text = attention_mask.bool() & ~visual_mask
        last_vis = torch.where(visual_mask, ar, -1).amax(-1, keepdim=True)  # [B, 1]
        after = text & (ar > last_vis)
        ta, g = _top(l1.masked_fill(~after, ninf), self.pivot_text, margins, top_l1)
        gap = gap if g is None else torch.minimum(gap, g)
        before = l1.masked_fill(~(text & ~after), ninf)
        tb = before.topk(self.pivot_text, dim=-1)
        # the j-th text pivot: the j-th after the image, else the (j - n_after)-th before it
        j = torch.arange(self.pivot_text, device=hidden.device).expand(B, -1)
        n_after = after.sum(-1, keepdim=True)
        jb = (j - n_after).clamp(0, self.pivot_text - 1)
        txt = torch.where(j < n_after, ta, tb.indices.gather(1, jb))
        ok = (j < n_after) | torch.isfinite(tb.values.gather(1, jb))
        txt = torch.where(ok, txt, T - 1)  # fewer text tokens than pivots: the last token
        if margins:  # rows that fall back: any boundary among the earlier text tokens
            v = before.topk(min(self.pivot_text + 1, T), dim=-1).values
            d = ((v[:, :-1] - v[:, 1:]) / top_l1[:, None]).nan_to_num(float("inf"))
            d = d.masked_fill(~torch.isfinite(v[:, 1:]), float("inf")).amin(-1)
            gap = torch.where(n_after[:, 0] < self.pivot_text, torch.minimum(gap, d), gap)
        pivots = torch.cat([img, txt], dim=1)  # [B, P] in visiting order

        x = self.norm(hidden).float()  # [B, T, D]
        x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        pool = visual_mask.scatter(1, img[:, :n_img], False)  # [B, T]
        n_pick = keep - n_img
        for p in range(P):  # NOTE: sequential: each pivot takes from what the previous left
            n_p = (n_pick + P - 1 - p) // P  # the first n_pick % P pivots take one more
            xp = x.gather(1, pivots[:, p, None, None].expand(B, 1, x.shape[-1]))  # [B, 1, D]
            cos = (x @ xp.transpose(1, 2))[..., 0]  # [B, T]
            picks, g = _top((-cos).masked_fill(~pool, ninf), n_p, margins)
            gap = gap if g is None else torch.minimum(gap, g)
            pool = pool.scatter(1, picks, False)
        kept = visual_mask & ~pool  # image pivots + every pick: exactly ``keep`` per row
        return kept.to(hidden.dtype), gap
