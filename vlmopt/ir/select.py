"""Leaf modules of the select_visual pass: which visual tokens enter the LLM at layer 0.

Visual slot j of a row (its j-th image token) holds patch j of the vision tower (row-major
sqrt(Nv) x sqrt(Nv) grid), so per-patch quantities map into the sequence with
``masked_scatter(visual_mask, ...)`` and visual embeddings are gathered in slot order. Every
module returns per-patch or per-slot scores in which the kept tokens score 1 and the others 0,
so ``tokens.KeepTopK`` keeps exactly them (shared/methods.md sections 3, 4, 6, 10).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmopt.ir.tokens import keep_count, visual_count


def _visual(hidden: torch.Tensor, visual_mask: torch.Tensor, n_visual: int):
    """The visual rows of ``hidden`` [B, T, D] in slot order, [B, Nv, D], and their indices
    [B, Nv, D] for gather/scatter. Same as ``hidden[visual_mask].view(B, Nv, D)``, as a static
    gather (no data-dependent shape)."""
    B, T, D = hidden.shape
    ar = torch.arange(T, device=hidden.device).expand(B, T)
    idx = torch.where(visual_mask, ar, ar + T).sort(dim=-1).values[:, :n_visual]  # [B, Nv]
    idx = idx[..., None].expand(B, n_visual, D)
    return hidden.gather(1, idx), idx


def to_slots(per_patch: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
    """Per-patch scores [B, Nv] -> per-slot scores [B, T] (0 on text slots)."""
    zeros = torch.zeros(visual_mask.shape, dtype=per_patch.dtype, device=per_patch.device)
    return zeros.masked_scatter(visual_mask, per_patch)


def vision_layers(tower: nn.Module) -> nn.ModuleList:
    return getattr(tower, "vision_model", tower).encoder.layers


def has_cls(tower: nn.Module) -> bool:
    return hasattr(getattr(tower, "vision_model", tower).embeddings, "class_embedding")


class VisionClsAttention(nn.Module):
    """pixel_values -> (features [B, Nv, Dv], cls_attention [B, Nv], key_metric [B, Nv, hd]).

    The features are exactly ``blocks.Vision``'s (CLS dropped). The attention is that of the ViT
    layer producing ``hidden_states[f]`` (layer f-1), recomputed from its input
    ``hidden_states[f-1]`` with its own layer_norm1 and q/k projections for the CLS query row
    only; summed over heads. key_metric: that layer's keys averaged over heads (VisionZip).
    """

    def __init__(self, tower: nn.Module, feature_layer: int, drop_cls: bool,
                 cls_feature: bool = False):
        super().__init__()
        layers = vision_layers(tower)
        f = feature_layer % (len(layers) + 1)  # index into hidden_states (L + 1 entries)
        if not (drop_cls and has_cls(tower)) or f == 0:
            raise ValueError("no CLS attention: needs a CLS vision tower whose CLS is dropped "
                             "(strategy 'default') and a feature layer produced by a ViT layer")
        self.tower, self.feature_layer, self.f = tower, feature_layer, f
        self.cls_feature = cls_feature  # also return CLS's own features [B, Dv] (4th output)
        self.layer = layers[f - 1]  # shared, read-only

    def forward(self, pixel_values: torch.Tensor):
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        h = out.hidden_states[self.feature_layer]  # [B, 1 + Nv, Dv]
        p, k = cls_attention_row(self.layer, out.hidden_states[self.f - 1])
        res = (h[:, 1:], p[:, :, 1:].sum(1), k.mean(1)[:, 1:])  # cls [B, Nv], keys [B, Nv, hd]
        return (*res, h[:, 0]) if self.cls_feature else res


def cls_attention_row(layer: nn.Module, h: torch.Tensor):
    """The CLS query's attention probabilities in CLIP-style ViT ``layer`` whose input is
    h [B, N, Dv] (N = 1 + Nv, CLS first), from its own layer_norm1 and q/k projections:
    (p [B, H, N] float32, keys [B, H, N, hd])."""
    x = layer.layer_norm1(h)
    attn = layer.self_attn
    B, N, _ = x.shape
    H, hd = attn.num_heads, attn.head_dim
    q = attn.q_proj(x[:, :1]).view(B, 1, H, hd).transpose(1, 2)  # [B, H, 1, hd]
    k = attn.k_proj(x).view(B, N, H, hd).transpose(1, 2)  # [B, H, N, hd]
    # NOTE: same op order as HF's eager attention: (q @ k^T) * scale, softmax in float32
    p = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * attn.scale, dim=-1,
                      dtype=torch.float32)  # [B, H, 1, N]
    return p[:, :, 0], k


class ContextualMerge(nn.Module):
    """VisionZip in vision-feature space: (feats, cls_attention, key_metric) -> (feats', kept).

    dominant = top-``dominant`` patches by CLS attention. Of the remaining patches (in order),
    targets = every step-th, step = max(1, n_rem // contextual), first ``contextual``; each other
    remaining patch joins the target with the highest cosine of head-mean keys, and the target's
    features become X_t + mean(X_assigned) (VisionZip's code; a target with none keeps X_t).
    Merged features are written into the target's own slot. kept [B, Nv]: 1 = kept.

    ``cls_first`` (VisionZip's official layout, dvlab-research/VisionZip at 3151f6d,
    visionzip/clip_encoder.py): a fourth input, CLS's features [B, Dv], and the kept tokens are
    laid out in rows 0..keep-1 in the official order - CLS, the dominant patches by index, the
    contextual tokens by target - with kept = those rows; the other rows are filler.
    """

    recompute = True  # cheaper to recompute than to keep (search.evaluator)

    def __init__(self, n_visual: int, dominant: int, contextual: int, cls_first: bool = False):
        super().__init__()
        self.n_visual, self.dominant, self.contextual = n_visual, dominant, contextual
        self.cls_first = cls_first
        n_rem = n_visual - dominant
        step = max(1, n_rem // contextual) if contextual else 1
        self.targets = list(range(0, n_rem, step))[:contextual]  # static, in remaining order
        self.others = sorted(set(range(n_rem)) - set(self.targets))

    @property
    def n_merge(self) -> int:
        return len(self.others) if self.contextual else 0

    def forward(self, feats, cls_attention, key_metric, cls_feats=None):
        B, Nv, Dv = feats.shape
        kept = torch.zeros(B, Nv, dtype=torch.bool, device=feats.device)
        kept = kept.scatter(1, cls_attention.topk(self.dominant, dim=-1).indices, True)
        ar = torch.arange(Nv, device=feats.device).expand(B, Nv)
        if self.cls_first:
            return self._official(feats, kept, ar, cls_feats, key_metric)
        if not self.contextual:
            return feats, kept.to(feats.dtype)
        feats, tgt = self._merge(feats, kept, ar, key_metric)
        return feats, kept.scatter(1, tgt, True).to(feats.dtype)

    def _official(self, feats, kept, ar, cls_feats, key_metric):
        """Rows [CLS, dominant patches in index order, contextual tokens], then filler."""
        B, Nv, Dv = feats.shape
        dom = torch.where(kept, ar, ar + Nv).sort(dim=-1).values[:, :self.dominant]  # [B, D]
        order = dom
        if self.contextual:
            feats, tgt = self._merge(feats, kept, ar, key_metric)
            order = torch.cat([dom, tgt], dim=1)  # [B, D + C]
        rows = feats.gather(1, order[..., None].expand(-1, -1, Dv))  # [B, D + C, Dv]
        keep = 1 + order.shape[1]
        out = torch.cat([cls_feats[:, None].to(feats.dtype), rows, feats[:, :Nv - keep]], 1)
        return out, (ar < keep).to(feats.dtype)  # out [B, Nv, Dv]; rows 0..keep-1 kept

    def _merge(self, feats, kept, ar, key_metric):
        """Features with each target's merged token in its slot, and the targets [B, C]."""
        B, Nv, Dv = feats.shape
        rem = torch.where(kept, ar + Nv, ar).sort(dim=-1).values[:, :Nv - self.dominant]
        tgt = rem[:, self.targets]  # [B, C] patch indices
        oth = rem[:, self.others]  # [B, M]
        km = F.normalize(key_metric, dim=-1)  # [B, Nv, hd]
        hd = km.shape[-1]
        k_t = km.gather(1, tgt[..., None].expand(-1, -1, hd))  # [B, C, hd]
        k_o = km.gather(1, oth[..., None].expand(-1, -1, hd))  # [B, M, hd]
        assign = torch.bmm(k_o, k_t.transpose(1, 2)).argmax(-1)  # [B, M] -> target
        one_hot = torch.zeros(B, len(self.others), self.contextual, dtype=feats.dtype,
                              device=feats.device).scatter(2, assign[..., None], 1.0)
        counts = one_hot.sum(1).clamp(min=1)[..., None]  # [B, C, 1]
        x_o = feats.gather(1, oth[..., None].expand(-1, -1, Dv))  # [B, M, Dv]
        x_t = feats.gather(1, tgt[..., None].expand(-1, -1, Dv))  # [B, C, Dv]
        merged = x_t + torch.bmm(one_hot.transpose(1, 2), x_o) / counts  # [B, C, Dv]
        return feats.scatter(1, tgt[..., None].expand(-1, -1, Dv), merged), tgt


class SlotScores(nn.Module):
    """Per-patch scores [B, Nv] -> per-slot scores [B, T] along the visual mask."""

    recompute = True  # cheaper to recompute than to keep (search.evaluator)

    def forward(self, per_patch: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
        return to_slots(per_patch, visual_mask)


class DiversityScore(nn.Module):
    """Greedy max-min selection on cosine distance of the visual embeddings at the LLM input.

    start "isolated" (DivPrune): the token whose nearest other token is farthest;
    start "mean" (ToDRE's k-center stage): the token closest to the mean embedding.
    Then ``keep - 1`` times add argmax_j min_{i in S} dist[i, j] over tokens not yet chosen.
    Returns per-slot scores [B, T]: 1 on chosen visual slots.

    Exported, the picks are one ``torch.while_loop`` (an ONNX ``Loop`` whose trip count is
    computed in the graph): the graph's size does not grow with ``keep``, and a count derived
    from the image's patch count (dynamic resolution) exports too. Eager PyTorch runs the same
    step in a Python loop.
    """

    # True: trace the Python loop instead, one ArgMax/ScatterElements group per pick (the
    # construction before the Loop; examples/bench_select_export.py compares the two)
    unroll_export = False

    def __init__(self, n_visual: int | None, keep: int | float, start: str):
        super().__init__()
        if start not in ("isolated", "mean"):
            raise ValueError(f"unknown start {start!r}")
        self.n_visual, self.keep, self.start = n_visual, keep, start

    def forward(self, hidden: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
        chosen, _ = self._greedy(hidden, visual_mask, margins=False)
        return to_slots(chosen.to(hidden.dtype), visual_mask)

    @torch.no_grad()
    def decision_margin(self, hidden: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
        """Per sample [B]: the smallest gap between the winner and the runner-up over every
        greedy pick. Rounding differences between runtimes can flip a pick whose gap is below
        them, so export parity is checked on samples with clear margins (emit.calib_batch).
        PyTorch only; never part of the exported graph."""
        return self._greedy(hidden, visual_mask, margins=True)[1]

    def _greedy(self, hidden, visual_mask, margins: bool):
        nv = visual_count(visual_mask, self.n_visual)
        keep = keep_count(self.keep, nv)
        E = _visual(hidden, visual_mask, nv)[0].float()  # [B, Nv, D]
        B, Nv, _ = E.shape
        En = F.normalize(E, dim=-1)
        dist = 1.0 - torch.bmm(En, En.transpose(1, 2))  # [B, Nv, Nv], rows i, columns j
        gap = torch.full((B,), float("inf"), device=E.device) if margins else None

        def pick(score):  # argmax, and the running minimum gap to the runner-up
            nonlocal gap
            if margins and score.shape[-1] > 1:
                top = score.topk(2, dim=-1).values
                gap = torch.minimum(gap, top[:, 0] - top[:, 1])
            return score.argmax(-1)

        if self.start == "isolated":
            eye = torch.eye(Nv, dtype=torch.bool, device=E.device)
            first = pick(dist.masked_fill(eye, float("inf")).amin(1))  # [B]
        else:
            c = F.normalize(E.mean(1), dim=-1)  # [B, D]
            first = pick((En * c[:, None]).sum(-1))
        chosen = torch.zeros(B, Nv, dtype=torch.bool, device=E.device)
        rows = dist.gather(1, first[:, None, None].expand(B, 1, Nv))[:, 0]  # [B, Nv]
        if keep:
            chosen = chosen.scatter(1, first[:, None], True)
        mind = rows
        if torch.compiler.is_exporting() and not (margins or self.unroll_export):
            return greedy_loop(chosen, mind, dist, keep - 1)[0], gap
        for _ in range(keep - 1):  # NOTE: sequential by nature
            chosen, mind = greedy_step(chosen, mind, dist, pick)
        return chosen, gap


def greedy_step(chosen: torch.Tensor, mind: torch.Tensor, dist: torch.Tensor, pick=None):
    """One max-min pick: chosen [B, Nv] bool, mind [B, Nv] (each token's distance to the chosen
    set), dist [B, Nv, Nv] -> (chosen, mind) with argmax_j mind[j] over unchosen j added."""
    B, Nv = mind.shape
    # chosen tokens are excluded explicitly so exact duplicates cannot be picked twice
    score = mind.masked_fill(chosen, float("-inf"))
    j = score.argmax(-1) if pick is None else pick(score)  # [B]
    chosen = chosen.scatter(1, j[:, None], True)
    mind = torch.minimum(mind, dist.gather(1, j[:, None, None].expand(B, 1, Nv))[:, 0])
    return chosen, mind


def repeat_loop(step, state: tuple, n) -> tuple:
    """``state = step(*state)`` ``n`` times (an int, or a SymInt from a shape) as one
    ``torch.while_loop``: the ONNX exporter lowers it to a ``Loop`` whose body is one step."""
    device = state[0].device
    stop = torch.full((), n, dtype=torch.int64, device=device)  # [] trip count

    def cond(i, *s):
        return i < stop

    def body(i, *s):
        return (i + 1, *step(*s))

    i0 = torch.zeros((), dtype=torch.int64, device=device)
    return tuple(torch.while_loop(cond, body, (i0, *state))[1:])


def greedy_loop(chosen: torch.Tensor, mind: torch.Tensor, dist: torch.Tensor, n):
    """``n`` greedy max-min picks (``greedy_step``) as one ONNX Loop (``repeat_loop``)."""
    return repeat_loop(lambda c, m: greedy_step(c, m, dist), (chosen, mind), n)


def pool_slots(side: int, g: int) -> list[int]:
    """For each g x g output cell (row-major), the patch nearest its adaptive window's centre
    (the upper-left one of the central pair for even windows)."""
    def centre(i):
        start, end = (i * side) // g, -(-((i + 1) * side) // g)
        return (start + end - 1) // 2

    return [centre(r) * side + centre(c) for r in range(g) for c in range(g)]


class GridPool(nn.Module):
    """LLaVolta-style pooling: visual embeddings on their grid -> g x g adaptive average pool.

    Each pooled token is written into the slot of the patch nearest its window's centre; those
    slots score 1. Returns (scores [B, T], hidden [B, T, D]); text rows are untouched.
    """

    recompute = True  # cheaper to recompute than to keep (search.evaluator)

    def __init__(self, n_visual: int, keep: int):
        super().__init__()
        side, g = math.isqrt(n_visual), math.isqrt(keep)
        if side * side != n_visual or g * g != keep or g > side:
            raise ValueError(f"pool needs square grids with g <= side: {n_visual} -> {keep}")
        self.n_visual, self.side, self.g = n_visual, side, g
        self.slots = pool_slots(side, g)

    def forward(self, hidden: torch.Tensor, visual_mask: torch.Tensor):
        V, idx = _visual(hidden, visual_mask, self.n_visual)  # [B, Nv, D]
        B, Nv, D = V.shape
        grid = V.transpose(1, 2).reshape(B, D, self.side, self.side)
        pooled = F.adaptive_avg_pool2d(grid, self.g).flatten(2).transpose(1, 2)  # [B, g*g, D]
        slots = torch.tensor(self.slots, device=hidden.device)
        V = V.index_copy(1, slots, pooled)
        hidden = hidden.scatter(1, idx, V)  # text rows untouched
        kept = torch.zeros(B, Nv, dtype=hidden.dtype, device=hidden.device).index_fill(1, slots, 1)
        return to_slots(kept, visual_mask), hidden
