"""VScan's two stages (Tencent/SelfEvolvingAgent at a82450e, ``VScan/``; "VScan: Rethinking
Visual Token Reduction for Efficient Large Vision-Language Models", arXiv 2505.22654).

Written from the official LLaVA rule (no code copied):
``VScan/llava/model/llava_arch.py`` ``LlavaMetaForCausalLM.encode_images``,
``window_cls_selection`` and ``token_merging``;
``VScan/llava/model/multimodal_encoder/clip_encoder.py`` ``feature_select`` (every ViT layer's
eager attention, the CLS row over the patches); ``VScan/llava/model/modeling_llama_x.py``
``LlamaModel.forward_x`` / ``layer_prune`` (stage 2). Defaults from the README and
``VScan/llava/eval/model_vqa_loader.py``: ``visual_token_num`` 96, ``layer_list`` [16],
``image_token_list`` [32] (LLaVA-1.5-7B).

Stage 1 (select_visual method "vscan"), with a = the head-mean CLS attention over the patches:
  local scan: a of the shallow ViT layer (official ``attentions[5]``) on the patch grid, cut
      into non-overlapping ``window`` x ``window`` windows (official 6: 4 x 4 windows on 24 x 24;
      ``side // window`` per side, trailing rows/columns outside every window); in each, the
      top int(T / 2) // n_windows patches;
  global scan: a of the deep layer (official ``attentions[-2]``: the layer producing LLaVA-1.5's
      features), local picks excluded, the top T - int(T / 2);
  merge: every other patch joins the retained patch of highest cosine similarity in the
      projected (LLM input) space; a retained token becomes (x_r + sum of its joiners) /
      (1 + their count). The retained tokens enter the LLM in patch order, positions
      renumbered (LLaVA rebuilds the sequence with ``position_ids=None``): "contiguous".
  So T' = n_windows * (int(T / 2) // n_windows) + T - int(T / 2) tokens enter (T' = T for the
  official budgets 64 / 96 / 128 / 192 on 24 x 24).
Stage 2 is PyramidDrop's rule (``layer_prune`` is ``pdrop_rank_drop``): after layer 15, the
last prompt token's attention recomputed with layer 16's norm/q/k/RoPE keeps 32; positions
renumbered. It is drop_tokens with ``score_at="next"`` (``preset`` below combines both).

Deviations (vlmopt's, stated):
  * the deep scan reads the layer producing the projector's features (the official code
    hard-codes ``attentions[-2]``, which is that layer on LLaVA-1.5, whose features are
    ``hidden_states[-2]``); the shallow layer is a field (official 5 of 24).
  * attention recomputed for the CLS row only (float32 softmax), so the tower keeps SDPA; the
    official code asks HF for every layer's eager attentions.
  * local picks are excluded from the global scan by -inf (the official code zeroes them,
    which could re-pick one only if every other score were 0).
  * grids other than 24 x 24 (the official code asserts 576): the same window arithmetic;
    presets scale the window to keep 4 x 4 windows.
  * every row ranks its own patches (the official loops over the batch the same way).
CLS-free towers (Qwen-VL) are refused: the official Qwen2.5-VL variant (``qwen/model/
qwen2_5_vl_custom.py``) scores differently and is not implemented here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmopt.ir.select import _visual, cls_attention_row, has_cls, to_slots, vision_layers


def window_table(side: int, window: int) -> list[list[int]]:
    """Per window (row-major), the row-major patch indices inside it."""
    nw = side // window
    return [[(i * window + dy) * side + j * window + dx for dy in range(window)
             for dx in range(window)] for i in range(nw) for j in range(nw)]


def kept_count(n_visual: int, keep: int, window: int) -> int:
    """Tokens VScan keeps for a budget ``keep`` (the official ``visual_token_num``)."""
    check(n_visual, keep, window)
    side = math.isqrt(n_visual)
    n_win = (side // window) ** 2
    local = int(keep * 0.5)
    return n_win * (local // n_win) + keep - local


def check(n_visual: int, keep: int, window: int) -> None:
    """ValueError naming the field when the grid or budget cannot run VScan's rule."""
    side = math.isqrt(n_visual)
    if side * side != n_visual:
        raise ValueError(f"VScan needs a square patch grid, got {n_visual} tokens")
    if not 1 <= window <= side:
        raise ValueError(f"field 'window' must lie in [1, {side}] (the grid side), got {window}")
    local = int(keep * 0.5) // (side // window) ** 2
    if local > window * window:
        raise ValueError(f"field 'keep'={keep}: {local} local picks per window exceed its "
                         f"{window * window} patches")


class VisionClsRows(nn.Module):
    """pixel_values -> (features [B, Nv, Dv], CLS rows [B, 2, Nv]): the head-mean CLS attention
    of the shallow ViT layer and of the layer producing the features (CLS dropped)."""

    def __init__(self, tower: nn.Module, feature_layer: int, drop_cls: bool, shallow: int):
        super().__init__()
        layers = vision_layers(tower)
        f = feature_layer % (len(layers) + 1)
        if not (drop_cls and has_cls(tower)) or f == 0:
            raise ValueError("no CLS attention: needs a CLS vision tower whose CLS is dropped "
                             "(strategy 'default') and a feature layer produced by a ViT layer")
        if not 0 <= shallow < len(layers):
            raise ValueError(f"field 'shallow_layer' must lie in [0, {len(layers) - 1}] (the "
                             f"tower has {len(layers)} layers), got {shallow}")
        self.tower, self.feature_layer, self.ids = tower, feature_layer, (shallow, f - 1)
        self.layers = [layers[i] for i in self.ids]  # shared, read-only (not registered)

    def forward(self, pixel_values: torch.Tensor):
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[self.feature_layer][:, 1:]  # [B, Nv, Dv]
        rows = [cls_attention_row(layer, out.hidden_states[i])[0].mean(1)[:, 1:]
                for i, layer in zip(self.ids, self.layers)]
        return feats, torch.stack(rows, 1)  # [B, 2, Nv]


class VScanSelect(nn.Module):
    """(hidden [B, T, D] at the LLM input, visual_mask, CLS rows [B, 2, Nv]) -> (per-slot
    scores [B, T]: 1 on the retained tokens, hidden with the merged features written into
    the retained slots)."""

    recompute = True  # cheaper to recompute than to keep (search.evaluator)

    def __init__(self, n_visual: int, keep: int, window: int):
        super().__init__()
        check(n_visual, keep, window)
        self.n_visual, self.keep, self.window = n_visual, keep, window
        side = math.isqrt(n_visual)
        self.table = window_table(side, window)
        self.n_local = int(keep * 0.5) // len(self.table)
        self.n_global = keep - int(keep * 0.5)
        self.n_kept = kept_count(n_visual, keep, window)

    def forward(self, hidden, visual_mask, rows):
        return self._select(hidden, visual_mask, rows)[:2]

    @torch.no_grad()
    def decision_margin(self, hidden, visual_mask, rows) -> torch.Tensor:
        """Per sample [B]: the smallest gap at any decision (a window's or the global top-k
        boundary, a joiner's best vs second-best cosine). Flat backgrounds give near-identical
        patches whose cosines tie within 1e-7, so ONNX Runtime may merge them otherwise; emit
        screens parity samples by this (emit.decision_margins). PyTorch only."""
        return self._select(hidden, visual_mask, rows, margins=True)[2]

    def _select(self, hidden, visual_mask, rows, margins: bool = False):
        B = hidden.shape[0]
        Nv = self.n_visual
        shallow, deep = rows[:, 0].float(), rows[:, 1].float()  # [B, Nv]
        table = torch.tensor(self.table, device=hidden.device)  # [W, w*w]
        win = shallow[:, table]  # [B, W, w*w]
        local = table.expand(B, *table.shape).gather(
            2, win.topk(self.n_local, dim=-1).indices).flatten(1)  # [B, W * n_local]
        kept = torch.zeros(B, Nv, dtype=torch.bool, device=hidden.device).scatter(1, local, True)
        local_mask = kept
        glob = deep.masked_fill(kept, float("-inf")).topk(self.n_global, dim=-1).indices
        kept = kept.scatter(1, glob, True)  # [B, Nv], n_kept per row

        E, idx = _visual(hidden, visual_mask, Nv)  # [B, Nv, D]
        D = E.shape[-1]
        ar = torch.arange(Nv, device=hidden.device).expand(B, Nv)
        order = torch.where(kept, ar, ar + Nv).sort(dim=-1).values  # retained first, in order
        ret, oth = order[:, :self.n_kept], order[:, self.n_kept:] - Nv
        x_r = E.gather(1, ret[..., None].expand(B, self.n_kept, D))  # [B, K, D]
        x_o = E.gather(1, oth[..., None].expand(B, Nv - self.n_kept, D))  # [B, M, D]
        cos = F.normalize(x_o.float(), dim=-1) @ F.normalize(x_r.float(), dim=-1).transpose(1, 2)
        one_hot = torch.zeros(B, Nv - self.n_kept, self.n_kept, dtype=torch.float32,
                              device=hidden.device).scatter(2, cos.argmax(-1)[..., None], 1.0)
        merged = (x_r.float() + one_hot.transpose(1, 2) @ x_o.float()) / (
            1 + one_hot.sum(1)[..., None])  # [B, K, D]
        E = E.scatter(1, ret[..., None].expand(B, self.n_kept, D), merged.to(E.dtype))
        hidden = hidden.scatter(1, idx, E)  # text rows untouched
        gap = None
        if margins:
            inf = torch.full((B,), float("inf"), device=hidden.device)
            gap = inf
            if self.n_local < win.shape[-1]:
                v = win.topk(self.n_local + 1, dim=-1).values  # [B, W, n_local + 1]
                gap = torch.minimum(gap, (v[..., -2] - v[..., -1]).amin(-1))
            rest = deep.masked_fill(kept, float("-inf"))
            if self.n_kept < Nv:  # the global boundary: last picked vs best left out
                last = deep.masked_fill(~kept | local_mask, float("inf")).amin(-1)
                gap = torch.minimum(gap, last - rest.amax(-1))
            if self.n_kept > 1 and Nv > self.n_kept:
                c = cos.topk(2, dim=-1).values
                gap = torch.minimum(gap, (c[..., 0] - c[..., 1]).amin(-1))
        return to_slots(kept.to(hidden.dtype), visual_mask), hidden, gap


def vscan_rows(gm, shallow_layer: int):
    """vision -> project becomes vision(+two CLS rows) -> project; returns the rows node."""
    from vlmopt.ir import select_wiring as wire

    hint = ("; VScan's Qwen2.5-VL variant (no CLS) is not implemented")
    vis, proj = wire._swap_vision(gm, "VScan", lambda old: VisionClsRows(
        old.tower, old.feature_layer, old.drop_cls, shallow_layer), "vision_vscan", hint)
    vis.meta["vlmopt"]["n_cls_layers"] = 2
    g = gm.graph
    with g.inserting_before(proj):
        feats, rows = wire.getitems(g, vis, 2)
    proj.args = (feats,)
    return rows


def preset(n_visual: int, n_layers: int, vit_layers: int, keep: int = 96,
           stage2: tuple[int, int] | None = (16, 32), positions: str = "contiguous") -> list:
    """Both stages as plan steps [(pass, fields)], the official LLaVA-1.5-7B defaults scaled to
    the model (vlmopt's scaling): budget and stage-2 count by n_visual / 576, the stage-2 layer
    by n_layers / 32, the shallow ViT layer by vit_layers / 24, windows by side / 4."""
    side = math.isqrt(n_visual)
    r = n_visual / 576
    k1 = max(2, round(keep * r))
    steps = [("select_visual", {"method": "vscan", "keep": k1, "positions": positions,
                                "shallow_layer": min(vit_layers - 1, round(5 * vit_layers / 24)),
                                "window": max(1, side // 4)})]
    if stage2 is not None:
        layer, k2 = stage2
        at = min(n_layers - 1, max(1, round(layer * n_layers / 32)))
        steps.append(("drop_tokens", {"keep": {f"layer_{at}": max(1, round(k2 * r))},
                                      "score_at": "next", "positions": positions}))
    return steps
