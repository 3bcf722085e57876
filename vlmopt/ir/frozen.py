"""The ShortV layer: a decoder layer in which visual tokens get no update.

Visual tokens still provide keys and values (computed from their unchanged hidden states), but
have no query rows, no output projection and no FFN: their hidden states pass through exactly.
Text tokens get the full layer, attending to every earlier token, visual ones included, so their
outputs equal the dense layer's text outputs. Saves prefill FLOPs only (the KV cache is unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmopt.ir.tokens import _rotary_fn, qk_heads, visual_count


class FrozenDecoder(nn.Module):
    is_decoder_block = True

    def __init__(self, layer: nn.Module, index: int, n_visual: int | None):
        super().__init__()
        self.layer, self.index, self.n_visual = layer, index, n_visual

    def forward(self, hidden, mask, rope, position_ids, visual_mask, attention_mask):
        layer, attn = self.layer, self.layer.self_attn
        cfg = attn.config
        H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
        B, T, D = hidden.shape
        Tt = T - visual_count(visual_mask, self.n_visual)  # text (and padding) rows per sample
        ar = torch.arange(T, device=hidden.device).expand(B, T)
        idx = torch.where(~visual_mask, ar, ar + T).sort(dim=-1).values[:, :Tt]  # [B, Tt]
        idx_d = idx[..., None].expand(B, Tt, D)
        h = layer.input_layernorm(hidden)  # [B, T, D]
        cos, sin = rope  # [B, T, hd]
        hd_idx = idx[..., None].expand(B, Tt, cos.shape[-1])
        q, k = qk_heads(attn, h.gather(1, idx_d), h)  # [B, H, Tt, hd], [B, KV, T, hd]
        v = attn.v_proj(h).view(B, T, KV, hd).transpose(1, 2)
        rot = _rotary_fn(attn)
        q, _ = rot(q, q, cos.gather(1, hd_idx), sin.gather(1, hd_idx))
        k, _ = rot(k, k, cos, sin)
        k = k.repeat_interleave(H // KV, dim=1)
        v = v.repeat_interleave(H // KV, dim=1)
        # causal by original slot, padding keys masked; NOTE: a row may always see itself, so
        # padding rows never get an empty softmax (NaN would leak through 0-weight products)
        keys = ar[:, None, :]  # [B, 1, T]
        allowed = ((keys <= idx[..., None]) & attention_mask.bool()[:, None, :]) | \
            (keys == idx[..., None])  # [B, Tt, T]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None],
                                           scale=attn.scaling)  # [B, H, Tt, hd]
        o = attn.o_proj(o.transpose(1, 2).reshape(B, Tt, H * hd))
        t = hidden.gather(1, idx_d) + o  # [B, Tt, D]
        t = t + layer.mlp(layer.post_attention_layernorm(t))
        return hidden.scatter(1, idx_d, t)
