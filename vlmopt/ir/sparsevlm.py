"""SparseVLM's text-guided pruning inside the LLM (drop_tokens, scorer "sparsevlm").

Follows the official code, Gumpest/SparseVLMs at 26a5f48 (v1.0, the default ``USE_VERSION``):
``llava/model/language_model/modelling_sparse_llama.py`` (``LlamaDynamicvitModel.forward``,
``LlamaDynamicvitSdpaAttention``), ``llava/model/language_model/score.py``
(``attn_postprocess_topk``, ``sparse_token_dict``) and ``llava/model/language_model/utils.py``
(``cluster_and_merge``). The ModelTC/LightCompress port (``llmc/compression/token_reduction/
sparsevlm.py`` at 9701d03) hooks the same places (pruning on the output of layers 2, 6, 15).
Written from the rule; no code copied.

  raters (once, on the LLM input embeddings): M = V T^T (raw dot products of the visual rows V
      with the text rows T after the image), softmax over the text, mean over the visual
      rows -> one score per text token; raters = the text tokens scoring above the mean.
  relevance (at each pruning layer l, official 2, 6, 15 of LLaVA-1.5-7B): layer l's own
      causal softmax attention (heads averaged), rows = the raters, mean over them, per
      visual token; the top ``keep`` visual tokens survive layer l's output (the official
      ``min(count, v_token_num - 1)``; counts from ``sparse_token_dict``, 192: 300/200/110).
  recycling (official on): of the pruned visual tokens, the int(0.3 m) + 1 most relevant
      (m pruned) are clustered into C = int(n / 10) + 1 groups by density-peak kNN clustering on
      layer l's output (L2 distance / sqrt(D); density = exp(-mean of the squared distances to
      the C nearest, self included); parent distance = the nearest denser token (the largest
      distance where none); centres = top-C of distance * density; each token joins its
      nearest centre) and each group's mean, sum / (count + 1e-6), is inserted after the kept
      visual tokens, centres in score order. The merged tokens are visual tokens for the next
      stage (they can be kept, pruned or recycled again).
  positions: renumbered 0.. after each cut (``position_ids[:, :len]``): ``"contiguous"``.

So the counts are static: layer l -> l + 1 carries keep + C visual tokens (576 -> 309 -> 204 ->
113 for "192"). Where this differs from the official code (vlmopt's, stated):
  * the relevance attention is recomputed from layer l's input with its norm, q/k and RoPE
    (all query rows, float32), so every layer stays on SDPA; the official SDPA path returns
    the same probabilities from its own (fp16) softmax.
  * raters per row (the official code mixes batch rows: ``torch.where`` over a batch of 1);
    padding is never a rater. Where no text follows the image (a prompt with the question
    first), the raters come from all the prompt's text (``raters="text"`` always does that);
    where no token scores above the mean (one candidate), every candidate is a rater (the
    official code would average an empty set).
  * no tie-breaking noise: ``cluster_and_merge`` adds ``rand * 1e-6`` to the densities; here
    exact ties keep the strict comparison (equal densities are not "denser"), so the result
    is deterministic and exportable.
  * distances via ``|a|^2 + |b|^2 - 2 a.b`` (one matmul, exportable), the diagonal set to 0.
  * ``positions="original"`` (vlmopt's variant): kept tokens keep their ids and the merged
    ones take the id of the image span's last slot (they sit at its end).
  * recycling needs a static visual count (a fixed grid); dynamic-resolution models prune
    without it (the pass refuses ``recycle`` there).
The official comment "2*576 4*300 10*200 16*110" does not match its code (pruning the output
of layers 2, 6, 15 gives 3 / 4 / 9 / 16 layers); the code is followed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmopt.ir.select import _visual
from vlmopt.ir.tokens import KeepTopK, _rotary_fn, gather_positions, qk_heads, visual_count

# Gumpest/SparseVLMs score.py: retained-token budget -> kept counts after layers 2, 6, 15 of
# LLaVA-1.5-7B (v1.0), at 576 visual tokens
OFFICIAL_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26),
                   64: (66, 30, 17)}
OFFICIAL_LAYERS = (2, 6, 15)
RATERS = ("after_image", "text")


def recycled_counts(n: int, keep: int, ratio: float) -> tuple[int, int]:
    """(tokens recycled, clusters) when ``keep`` of ``n`` visual tokens survive: the official
    int(m * ratio) + 1 of the m pruned, and int(that / 10) + 1 clusters."""
    m = n - keep
    if ratio <= 0 or m <= 0:
        return 0, 0
    n2 = min(m, int(m * ratio) + 1)
    return n2, int(n2 / 10) + 1


class TextRaters(nn.Module):
    """(hidden [B, T, D] entering the LLM, visual_mask, attention_mask) -> rater flags in
    text order [B, T]: entry j is 1 when the row's j-th non-visual slot is a rater. Text
    tokens are never dropped and keep their order, so a later cut finds them by rank."""

    def __init__(self, n_visual: int | None, source: str = "after_image"):
        super().__init__()
        if source not in RATERS:
            raise ValueError(f"field 'raters' must be one of {RATERS}, got {source!r}")
        self.n_visual, self.source = n_visual, source

    def forward(self, hidden, visual_mask, attention_mask):
        B, T, _ = hidden.shape
        nv = visual_count(visual_mask, self.n_visual)
        text = ~visual_mask & attention_mask.bool()  # [B, T]
        cand = text
        if self.source == "after_image":
            ar = torch.arange(T, device=hidden.device).expand(B, T)
            last = torch.where(visual_mask, ar, -1).amax(-1, keepdim=True)  # [B, 1]
            after = text & (ar > last)
            # NOTE: logical ops, not a bool Where (ONNX Runtime's CPU Where has no bool kernel)
            cand = after | (text & ~after.any(-1, keepdim=True))
        V = _visual(hidden, visual_mask, nv)[0].float()  # [B, Nv, D]
        m = V @ hidden.float().transpose(1, 2)  # [B, Nv, T]
        p = m.masked_fill(~cand[:, None], float("-inf")).softmax(-1).mean(1)  # [B, T]
        p = p.nan_to_num(0.0)
        thr = (p * cand).sum(-1, keepdim=True) / cand.sum(-1, keepdim=True).clamp(min=1)
        raters = cand & (p > thr)
        raters = raters | (cand & ~raters.any(-1, keepdim=True))
        return to_text_order(raters, visual_mask)


def to_text_order(flags: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
    """Per-slot flags [B, T] of non-visual slots -> flags by text rank [B, T] (float)."""
    B, T = flags.shape
    rank = (~visual_mask).long().cumsum(-1) - 1  # [B, T]
    dest = torch.where(visual_mask, T, rank)  # visual slots write into a dump column
    out = torch.zeros(B, T + 1, dtype=torch.float32, device=flags.device)
    return out.scatter_add(1, dest, flags.float())[:, :T]


def from_text_order(raters: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
    """Rater flags by text rank [B, T0] -> per-slot flags of the current sequence [B, T]."""
    rank = ((~visual_mask).long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
    return (raters.gather(1, rank) > 0) & ~visual_mask


class RaterScore(nn.Module):
    """(hidden and rope entering layer l, visual mask, padding mask, raters by text rank) ->
    scores [B, T]: layer l's head-mean causal attention from the rater rows, averaged over
    them. Queries are computed for the text rows only (a static count, T - Nv), keys for
    every token, from the layer's own norm, q/k and RoPE; no n x n matrix over visual rows."""

    def __init__(self, layer: nn.Module, n_visual: int | None):
        super().__init__()
        self.layer, self.n_visual = layer, n_visual  # HF decoder layer (shared, read-only)

    def forward(self, hidden, rope, visual_mask, attention_mask, raters):
        attn = self.layer.self_attn
        cfg = attn.config
        H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
        B, T = visual_mask.shape
        nt = T - visual_count(visual_mask, self.n_visual)
        ar = torch.arange(T, device=hidden.device).expand(B, T)
        tidx = torch.where(visual_mask, ar + T, ar).sort(dim=-1).values[:, :nt]  # [B, Tt]
        h = self.layer.input_layernorm(hidden)  # [B, T, D]
        rows = h.gather(1, tidx[..., None].expand(B, nt, h.shape[-1]))
        cos, sin = rope  # [B, T, hd]
        hd = cos.shape[-1]
        q, k = qk_heads(attn, rows, h)  # [B, H, Tt, hd], [B, KV, T, hd]
        rot = _rotary_fn(attn)
        q, _ = rot(q, q, cos.gather(1, tidx[..., None].expand(B, nt, hd)),
                   sin.gather(1, tidx[..., None].expand(B, nt, hd)))
        k, _ = rot(k, k, cos, sin)
        k = k.repeat_interleave(H // KV, dim=1)  # [B, H, T, hd]
        logits = (q @ k.transpose(-1, -2)).float() * attn.scaling  # [B, H, Tt, T]
        ok = attention_mask.bool()[:, None, :] & (ar[:, None, :] <= tidx[..., None])
        p = logits.masked_fill(~ok[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
        p = p.mean(1)  # [B, Tt, T]
        w = from_text_order(raters, visual_mask).gather(1, tidx).to(p.dtype)  # [B, Tt]
        return (p * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)


def score_flops(s, n_text: int, n_tokens: int) -> int:
    """RaterScore over ``n_tokens`` tokens of which ``n_text`` are text rows (``s``:
    cost.ModelShapes): q for the text rows, k for every token, and q.k^T (FLOPs)."""
    return 2 * (n_text * s.d * s.d_q + n_tokens * s.d * s.d_kv
                + s.heads * n_text * n_tokens * s.head_dim)


def density_peak_merge(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """x [B, n, D] -> the means of ``clusters`` density-peak kNN clusters [B, C, D], centres in
    descending score order (``cluster_and_merge`` without its tie-breaking noise)."""
    B, n, D = x.shape
    xf = x.float()
    sq = (xf * xf).sum(-1)  # [B, n]
    d2 = (sq[:, :, None] + sq[:, None, :] - 2 * (xf @ xf.transpose(1, 2))).clamp(min=0)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    dist = d2.sqrt().masked_fill(eye, 0.0) / math.sqrt(D)  # [B, n, n]
    near = dist.topk(clusters, dim=-1, largest=False).values  # [B, n, C], self included
    density = (-(near ** 2).mean(-1)).exp()  # [B, n]
    denser = density[:, None, :] > density[:, :, None]  # [B, i, j]: j denser than i
    dmax = dist.flatten(1).amax(-1)[:, None, None]
    parent = torch.where(denser, dist, dmax).amin(-1)  # [B, n]
    centres = (parent * density).topk(clusters, dim=-1).indices  # [B, C]
    to_c = dist.gather(1, centres[..., None].expand(B, clusters, n))  # [B, C, n]
    assign = to_c.argmin(1)  # [B, n]
    ar = torch.arange(clusters, device=x.device).expand(B, clusters)
    assign = assign.scatter(1, centres, ar)  # a centre joins its own cluster
    one_hot = torch.zeros(B, n, clusters, dtype=xf.dtype, device=x.device).scatter(
        2, assign[..., None], 1.0)  # [B, n, C]
    counts = one_hot.sum(1)[..., None]  # [B, C, 1]
    return (one_hot.transpose(1, 2) @ xf) / (counts + 1e-6)


class RecycleKeep(KeepTopK):
    """KeepTopK plus SparseVLM's recycling: the ``keep`` best-scored visual tokens, every
    non-visual token, and C merged tokens right after the row's image span (static count
    ``keep + n_merged``). The fifth output maps each token to a slot of the input sequence:
    a merged token to the span's last slot (whose position id it takes)."""

    def __init__(self, n_visual: int, keep: int, ratio: float):
        super().__init__(n_visual, keep)
        self.ratio = ratio
        self.n_recycled, self.n_merged = recycled_counts(n_visual, keep, ratio)

    def forward(self, scores, hidden, position_ids, visual_mask, attention_mask):
        if not self.n_merged:
            return super().forward(scores, hidden, position_ids, visual_mask, attention_mask)
        B, T = visual_mask.shape
        C = self.n_merged
        s = scores.float().masked_fill(~visual_mask, float("-inf"))
        top = s.topk(self.keep, dim=-1).indices  # [B, keep]
        kept = (~visual_mask).scatter(1, top, True)  # [B, T]
        pruned = visual_mask & ~kept
        rec = s.masked_fill(~pruned, float("-inf")).topk(self.n_recycled, dim=-1).indices
        D = hidden.shape[-1]
        x = hidden.gather(1, rec[..., None].expand(B, self.n_recycled, D))  # [B, n2, D]
        merged = density_peak_merge(x, C).to(hidden.dtype)  # [B, C, D]
        ar = torch.arange(T, device=hidden.device).expand(B, T)
        last = torch.where(visual_mask, ar, -1).amax(-1, keepdim=True)  # [B, 1]
        # NOTE: sort keys: kept slot t -> t (C + 1); merged c -> last (C + 1) + 1 + c, i.e.
        # right after the image span; dropped slots after everything
        key = torch.where(kept, ar, ar + T) * (C + 1)
        key_m = last * (C + 1) + 1 + torch.arange(C, device=hidden.device)  # [B, C]
        T_new = T - self.n_visual + self.keep + C
        order = torch.cat([key, key_m], 1).sort(dim=-1).indices[:, :T_new]  # [B, T']
        slots = torch.cat([ar, last.expand(B, C)], 1).gather(1, order)  # [B, T']
        hid = torch.cat([hidden, merged], 1).gather(
            1, order[..., None].expand(B, T_new, D))
        ones = torch.ones(B, C, dtype=torch.bool, device=hidden.device)
        vis = torch.cat([visual_mask, ones], 1).gather(1, order)
        am = torch.cat([attention_mask, ones.to(attention_mask.dtype)], 1).gather(1, order)
        return hid, gather_positions(position_ids, slots), vis, am, slots


def rater_flops(n_visual: int, n_tokens: int, d: int) -> int:
    """The raters' one matmul: every visual row against every token [Nv, T] (FLOPs)."""
    return 2 * n_visual * n_tokens * d


def recycle_flops(n_recycled: int, n_merged: int, d: int) -> int:
    """Recycling's matmuls: the pairwise distances [n2, n2] and the group sums [C, D]."""
    return 2 * (n_recycled * n_recycled * d + n_merged * n_recycled * d)


def official_schedule(budget: int, n_visual: int | None, n_layers: int, recycle: float
                      ) -> dict:
    """drop_tokens ``keep`` of the official schedule (``OFFICIAL_COUNTS[budget]`` after
    ``OFFICIAL_LAYERS``, i.e. cuts before layers 3, 7, 16), scaled to the model (vlmopt's:
    layers by n_layers / 32, counts by n_visual / 576), each count at most one below what
    reaches it (the official ``min(count, v_token_num - 1)``, recycled tokens included).
    ``n_visual`` None: each stage's official fraction of what reaches it."""
    if budget not in OFFICIAL_COUNTS:
        raise ValueError(f"sparsevlm: budget must be one of {sorted(OFFICIAL_COUNTS)}, "
                         f"got {budget!r}")
    cuts: dict[int, int] = {}
    for layer, c in zip(OFFICIAL_LAYERS, OFFICIAL_COUNTS[budget]):  # a later stage wins a cut
        cuts[min(n_layers - 2, max(0, round(layer * n_layers / 32))) + 1] = c
    keep: dict = {}
    if n_visual is None:
        prev = 576
        for k, c in sorted(cuts.items()):
            keep[f"layer_{k}"], prev = float(c / prev), c
        return keep
    v = n_visual
    for k, c in sorted(cuts.items()):
        n = min(v - 1, max(1, round(c * n_visual / 576)))
        keep[f"layer_{k}"] = n
        v = n + recycled_counts(v, n, recycle)[1]
    return keep


def insert_raters(gm, source: str):
    """Insert the TextRaters node on the LLM input (the state entering layer 0) and return
    it; its meta carries the visual budget for the cost model."""
    from vlmopt.ir.capture import decoder_nodes
    from vlmopt.ir.rewrite import ChainState, add_module

    d0 = decoder_nodes(gm)[0]
    st = ChainState.at(d0)
    info = d0.meta["vlmopt"]
    name = add_module(gm, "sparsevlm_raters", TextRaters(info["n_visual"], source))
    with gm.graph.inserting_before(d0):
        node = gm.graph.call_module(name, (st.hidden, st.visual, st.amask))
    node.meta["vlmopt"] = {"block": "raters", "n_visual": info["n_visual"],
                           "visual_keeps": list(info.get("visual_keeps", []))}
    return node
