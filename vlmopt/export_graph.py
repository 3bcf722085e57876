"""Export forms of a (rewritten) block graph: prefill and decode-step modules that return K/V.

The block graph's decoder nodes call HF layers with ``use_cache=False``; the forms here walk the
same fx graph but run every decoder node as an explicit attention (the layer's own norms,
q/k/v/o projections called as modules, its rotary function, SDPA with an explicit boolean mask)
that also returns that layer's keys (post-RoPE) and values. Every other node (vision, select,
score, drop, ...) runs its graph module unchanged, so the drops are in the exported graph.

    prefill(input_ids, pixel_values, attention_mask, position_ids[, layout inputs])
        -> logits [B, V], next_position_ids [B, 1] ([3, B, 1] for M-RoPE),
           per layer i: key_i, value_i [B, KV, T_i, hd], mask_i [B, T_i] (int64)
    decode(input_ids [B, 1], position_ids [B, 1], past: per layer (key_i, value_i, mask_i))
        -> logits [B, V], next_position_ids [B, 1], present per layer with T_i + 1

T_i is layer i's own token count after the drops before it. Kept tokens keep their original
position ids, so the next position is the last prompt position + 1 in every layer.

Dynamic-resolution families (Qwen-VL) export at batch 1: the vision node runs its export form
(vlmopt.export_vision, layout tensors as inputs), and the visual-token count of each token change
is derived from the patch count (a shape), so fraction budgets stay symbolic in the graph (a
greedy selection's loop runs that many picks: vlmopt.ir.select.greedy_loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from vlmopt.errors import VlmoptError
from vlmopt.ir.capture import decoder_nodes
from vlmopt.ir.dart import DartScore
from vlmopt.ir.frozen import FrozenDecoder
from vlmopt.ir.mmtok import CoverageScore
from vlmopt.ir.select import DiversityScore
from vlmopt.ir.tokens import KeepTopK, _rotary_fn, keep_count, qk_heads


def _block(node: fx.Node) -> str | None:
    return node.meta.get("vlmopt", {}).get("block")


def _check_decoder(mod: nn.Module, name: str) -> nn.Module:
    layer = getattr(mod, "layer", None)
    parts = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    if layer is None or not all(hasattr(layer, p) for p in parts):
        raise VlmoptError(f"emit: decoder node {name!r} ({type(mod).__name__}) has no "
                          "Llama-style layer to export (input_layernorm/self_attn/mlp)")
    return layer


def _heads(attn: nn.Module) -> tuple[int, int, int]:
    cfg = attn.config
    return cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim


def _qkv(layer: nn.Module, h: torch.Tensor, rows: torch.Tensor, cos, sin, cos_q, sin_q):
    """q for ``rows`` [B, Tq, D], k/v for ``h`` [B, T, D] (both already normed), RoPE'd.
    Returns q [B, H, Tq, hd], k/v [B, KV, T, hd] (KV heads, not repeated)."""
    attn = layer.self_attn
    H, KV, hd = _heads(attn)
    B, T, _ = h.shape
    q, k = qk_heads(attn, rows, h)  # [B, H, Tq, hd], [B, KV, T, hd] (q/k norms: Qwen3)
    v = attn.v_proj(h).view(B, T, KV, hd).transpose(1, 2)
    rot = _rotary_fn(attn)
    q, _ = rot(q, q, cos_q, sin_q)
    k, _ = rot(k, k, cos, sin)
    return q, k, v


def _attend(layer: nn.Module, q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """SDPA over KV heads repeated to H; allowed [B, Tq, S] bool. Returns [B, Tq, H * hd]."""
    attn = layer.self_attn
    H, KV, hd = _heads(attn)
    B, _, Tq, _ = q.shape
    k = k.repeat_interleave(H // KV, dim=1)  # [B, H, S, hd]
    v = v.repeat_interleave(H // KV, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None],
                                       scale=attn.scaling)  # [B, H, Tq, hd]
    return attn.o_proj(o.transpose(1, 2).reshape(B, Tq, H * hd))


def prefill_dense(layer: nn.Module, hidden, rope, amask):
    """A dense decoder layer on hidden [B, T, D] -> (hidden, k, v)."""
    B, T, _ = hidden.shape
    cos, sin = rope  # [B, T, hd]
    h = layer.input_layernorm(hidden)
    q, k, v = _qkv(layer, h, h, cos, sin, cos, sin)
    ar = torch.arange(T, device=hidden.device)
    # causal, padding keys masked; NOTE: a row always sees itself, so padding rows get no empty
    # softmax (their outputs feed nothing: padding keys stay masked for every real row)
    allowed = ((ar[None, :] <= ar[:, None])[None] & amask.bool()[:, None, :]) | \
        torch.eye(T, dtype=torch.bool, device=hidden.device)[None]  # [B, T, T]
    hidden = hidden + _attend(layer, q, k, v, allowed)
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, k, v


def prefill_frozen(layer: nn.Module, n_visual: int, hidden, rope, visual_mask, amask):
    """ShortV (ir/frozen.py) with K/V of every token: visual rows pass through unchanged."""
    B, T, D = hidden.shape
    Tt = T - n_visual  # text (and padding) rows per sample
    ar = torch.arange(T, device=hidden.device).expand(B, T)
    idx = torch.where(~visual_mask, ar, ar + T).sort(dim=-1).values[:, :Tt]  # [B, Tt]
    idx_d = idx[..., None].expand(B, Tt, D)
    cos, sin = rope
    hd_idx = idx[..., None].expand(B, Tt, cos.shape[-1])
    h = layer.input_layernorm(hidden)  # [B, T, D]
    q, k, v = _qkv(layer, h, h.gather(1, idx_d), cos, sin,
                   cos.gather(1, hd_idx), sin.gather(1, hd_idx))
    keys = ar[:, None, :]  # [B, 1, T]
    allowed = ((keys <= idx[..., None]) & amask.bool()[:, None, :]) | (keys == idx[..., None])
    t = hidden.gather(1, idx_d) + _attend(layer, q, k, v, allowed)  # [B, Tt, D]
    t = t + layer.mlp(layer.post_attention_layernorm(t))
    return hidden.scatter(1, idx_d, t), k, v


def decode_layer(layer: nn.Module, hidden, rope, past_k, past_v, past_mask):
    """One new token per sample: hidden [B, 1, D], past [B, KV, P, hd], past_mask [B, P]."""
    cos, sin = rope  # [B, 1, hd]
    h = layer.input_layernorm(hidden)
    q, k, v = _qkv(layer, h, h, cos, sin, cos, sin)
    k = torch.cat([past_k, k], dim=2)  # [B, KV, P + 1, hd]
    v = torch.cat([past_v, v], dim=2)
    mask = torch.cat([past_mask, torch.ones_like(past_mask[:, :1])], dim=1)  # [B, P + 1]
    hidden = hidden + _attend(layer, q, k, v, mask.bool()[:, None, :])
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, k, v, mask


class PrefillForm(nn.Module):
    """The block graph as a prefill that also returns per-layer K/V and padding masks."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm
        self._nodes = list(gm.graph.nodes)
        for n in decoder_nodes(gm):
            _check_decoder(gm.get_submodule(n.target), n.name)
        self.dynamic = gm.meta["vlmopt"]["n_visual"] is None
        self.vision, self.unit = None, None
        if self.dynamic and gm.meta["vlmopt"].get("position_rows", 1) == 3:  # Qwen-VL
            from vlmopt.export_vision import QwenVisionExport
            from vlmopt.ir.mmtok import QwenVisionPatches
            from vlmopt.ir.received import QwenVisionReceived

            for n in self._nodes:
                if _block(n) == "vision":
                    mod = gm.get_submodule(n.target)
                    self.vision = QwenVisionExport(mod.tower, mod.n_deepstack,
                                                   received=isinstance(mod, QwenVisionReceived),
                                                   patches=isinstance(mod, QwenVisionPatches))
            self.unit = self.vision.unit

    def forward(self, input_ids, pixel_values, attention_mask, position_ids, vision_pos=None,
                frame_seg=None, window_index=None, window_seg=None, interp_idx=None,
                interp_w=None, pixel_attention_mask=None, anyres_index=None,
                anyres_weight=None, anyres_visual=None):
        feeds = {"input_ids": input_ids, "pixel_values": pixel_values,
                 "attention_mask": attention_mask, "position_ids": position_ids,
                 "image_grid_thw": None, "pixel_attention_mask": pixel_attention_mask,
                 "image_sizes": None}
        layout = {k: v for k, v in (("vision_pos", vision_pos), ("frame_seg", frame_seg),
                                    ("window_index", window_index), ("window_seg", window_seg),
                                    ("interp_idx", interp_idx), ("interp_w", interp_w))
                  if v is not None}
        # NOTE: batch 1 with dynamic resolution: the visual tokens of the prompt, a shape (from
        # the pixel rows on Qwen-VL, else from the vision node's output rows)
        n_cur = pixel_values.shape[0] // self.unit if self.unit else None
        env: dict[fx.Node, object] = {}
        present: list[torch.Tensor] = []

        def val(a):
            return fx.node.map_arg(a, lambda n: env[n])

        logits = None
        for n in self._nodes:
            if n.op == "placeholder":
                env[n] = feeds[n.target]
            elif n.op == "call_function":
                env[n] = n.target(*val(n.args), **val(n.kwargs))
            elif n.op == "call_method":
                a = val(n.args)
                env[n] = getattr(a[0], n.target)(*a[1:], **val(n.kwargs))
            elif n.op == "call_module":
                mod = self.gm.get_submodule(n.target)
                blk = _block(n)
                if blk == "mask":  # explicit attention below builds its own boolean masks
                    env[n] = None
                elif blk == "vision" and self.vision is not None:
                    env[n] = self.vision(pixel_values, **layout)
                elif blk == "vision" and hasattr(mod, "export_forward"):
                    # AnyRes: the packing from layout inputs; n_cur = image features, a shape
                    env[n], n_cur = mod.export_forward(pixel_values, anyres_index,
                                                       anyres_weight, anyres_visual)
                elif blk == "vision" and self.dynamic:
                    env[n] = mod(*val(n.args), **val(n.kwargs))
                    out = env[n][0] if isinstance(env[n], tuple) else env[n]
                    n_cur = out.shape[0]  # [Nv_total, D] at batch 1
                elif self.dynamic and (isinstance(mod, (KeepTopK, DiversityScore, DartScore,
                                                        CoverageScore))
                                       or getattr(mod, "symbolic_n_visual", False)):
                    mod.n_visual = n_cur  # the symbolic count, for this call only
                    try:
                        env[n] = mod(*val(n.args))
                    finally:
                        mod.n_visual = None
                    if isinstance(mod, KeepTopK):
                        n_cur = keep_count(mod.keep, n_cur)
                elif blk == "decoder":
                    hidden, _, rope, _, visual, amask = val(n.args)[:6]
                    layer = mod.layer
                    if isinstance(mod, FrozenDecoder):
                        nv = mod.n_visual if mod.n_visual is not None else n_cur
                        h, k, v = prefill_frozen(layer, nv, hidden, rope, visual, amask)
                    else:
                        h, k, v = prefill_dense(layer, hidden, rope, amask)
                    env[n] = h
                    present += [k, v, amask.to(torch.int64)]
                else:
                    env[n] = mod(*val(n.args), **val(n.kwargs))
            elif n.op == "output":
                logits = val(n.args[0])
        next_pos = position_ids[..., -1:] + 1  # [B, 1], or [3, B, 1] (M-RoPE)
        return (logits, next_pos, *present)


class DecodeForm(nn.Module):
    """One greedy decode step over per-layer caches of per-layer lengths."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm
        self._layers = [n.target for n in decoder_nodes(gm)]
        for n in decoder_nodes(gm):
            _check_decoder(gm.get_submodule(n.target), n.name)
        for b in ("embed", "rope", "norm", "head"):
            if not any(_block(n) == b for n in gm.graph.nodes):
                raise VlmoptError(f"emit: the graph has no {b!r} block")

    def _blk(self, b: str) -> nn.Module:
        for n in self.gm.graph.nodes:
            if _block(n) == b:
                return self.gm.get_submodule(n.target)
        raise KeyError(b)

    def forward(self, input_ids, position_ids, past: list[torch.Tensor]):
        hidden = self._blk("embed")(input_ids)  # [B, 1, D]
        rope = self._blk("rope")(hidden, position_ids)
        present = []
        for i, name in enumerate(self._layers):
            layer = self.gm.get_submodule(name).layer
            hidden, k, v, m = decode_layer(layer, hidden, rope, *past[3 * i:3 * i + 3])
            present += [k, v, m]
        logits = self._blk("head")(self._blk("norm")(hidden))
        return (logits, position_ids + 1, *present)


def kv_lengths(gm: fx.GraphModule, n_text: int, n_visual: int | None = None) -> list[int]:
    """Per-layer KV length after prefill for prompts of ``n_text`` non-visual tokens (and, for
    dynamic resolution, ``n_visual`` visual tokens entering the LLM)."""
    from vlmopt.ir.rewrite import visual_tokens

    return [n_text + (n.meta["vlmopt"]["n_visual"] if n_visual is None
                      else visual_tokens(n.meta["vlmopt"], n_visual)) for n in decoder_nodes(gm)]
