"""CLS-free towers (Qwen-VL, SigLIP): dominant tokens by the attention they receive.

VisionZip ranks patches by the [CLS] query's attention; a tower without CLS uses the mean
attention each token *receives* instead (VisionZip paper, appendix A.2). The rule follows the
LightCompress Qwen2.5-VL port (``llmc/compression/token_reduction/visionzip.py``, methods.md
section 3.2): the last ViT block's attention probabilities, averaged over heads, summed over the
query rows of the token's attention chunk, averaged over each 2x2 merge group (one LLM token),
window order undone. Only the dominant part: contextual merging needs a fixed grid here.

    QwenVisionReceived(tower)(pixel_values, grid_thw) -> (embeddings[, *deepstack], received [M])

Fixed-grid towers without [CLS] (a LLaVA with a SigLIP tower, strategy "full"): the same score,
averaged over heads and query rows, of one ViT layer, with that layer's head-mean keys, so
VisionZip's contextual merge runs unchanged (``VisionReceived``). VisionZip reads the layer
producing the projector's features (its CLS rule's layer; LightCompress's Qwen port reads the
last block, which feeds the merger); VisPruner reads the LAST layer, as its SigLIP tower does
(Theia-4869/VisPruner at aefa01a, llava/model/multimodal_encoder/siglip_encoder.py
``feature_select``: ``attentions[-1].mean(dim=-2)``, then the head mean in llava_arch.py).

    VisionReceived(tower, f, drop_cls, s)(pixel_values)
        -> (features [B, Nv, Dv], received [B, Nv], key_metric [B, Nv, hd])
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def received_attention(attn: nn.Module, x: torch.Tensor, cos, sin, allowed: torch.Tensor,
                       unit: int) -> torch.Tensor:
    """Per merge group of ``unit`` patches, the head-mean attention its patches receive in the
    block ``attn`` (input x [N, d] already normed, its RoPE, mask [N, N]). Returns [N / unit]."""
    N = x.shape[0]
    q, k, _ = attn.qkv(x).reshape(N, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    rot = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    q, k = rot(q, k, cos, sin)  # [N, H, hd]
    # NOTE: one head at a time: [N, N] probabilities live at once, not [H, N, N] (a 1344-px
    # image on a 7B tower has ~9k patches and 16 heads: 0.3 GB a head instead of 5 GB). The
    # head count is static, so the loop unrolls in export.
    recv = x.new_zeros(N, dtype=torch.float32)
    for h in range(attn.num_heads):
        logits = (q[:, h] @ k[:, h].T).float() * attn.scaling  # [N, N]
        recv = recv + logits.masked_fill(~allowed, float("-inf")).softmax(-1).sum(0)
    recv = recv / attn.num_heads  # [N]: column sums of the head-mean attention
    return recv.reshape(N // unit, unit).mean(-1)


def undo_window_order(tower: nn.Module, x: torch.Tensor, grid_thw: torch.Tensor):
    """Rows of x [M, ...], one per LLM token in a windowed tower's order (Qwen2.5-VL), back in
    the LLM's raster order; other towers' rows are already in it."""
    if not hasattr(tower, "fullatt_block_indexes"):
        return x
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(grid_thw, tower.spatial_merge_size, tower.window_size,
                                       tower.patch_size)
    return x[torch.argsort(index)]


class QwenVisionReceived(nn.Module):
    """The Qwen-VL tower as ``blocks.QwenVision``, plus the received attention per LLM token."""

    def __init__(self, tower: nn.Module, n_deepstack: int = 0):
        super().__init__()
        self.tower, self.n_deepstack = tower, n_deepstack

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        t = self.tower
        seen: dict = {}

        def grab(mod, args, kwargs):  # the last block's input and its attention layout
            seen["x"], seen["kw"] = args[0], kwargs

        hook = t.blocks[-1].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            out = t(pixel_values.type(t.dtype), grid_thw=image_grid_thw, return_dict=True)
        finally:
            hook.remove()
        x, kw = seen["x"], seen["kw"]
        cu = kw["cu_seqlens"]
        seg = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
        allowed = seg[:, None] == seg[None, :]
        cos, sin = kw["position_embeddings"]
        unit = t.spatial_merge_size ** 2
        recv = received_attention(t.blocks[-1].attn, t.blocks[-1].norm1(x), cos, sin, allowed,
                                  unit)
        recv = undo_window_order(t, recv, image_grid_thw)
        feats = (out.pooler_output, *out.deepstack_features) if self.n_deepstack else \
            (out.pooler_output,)
        return (*feats, recv)


class VisionReceived(nn.Module):
    """A CLIP/SigLIP-style tower as ``blocks.Vision`` (features ``hidden_states[f]``), plus the
    attention each visual token receives in the ViT layer producing ``hidden_states[s]``
    (layer s - 1), averaged over heads and query rows, recomputed from that layer's input with
    its own layer_norm1 and q/k projections; and that layer's keys averaged over heads."""

    def __init__(self, tower: nn.Module, feature_layer: int, drop_cls: bool,
                 score_layer: int | None = None):
        super().__init__()
        from vlmopt.ir.select import vision_layers

        layers = vision_layers(tower)
        n = len(layers) + 1  # hidden_states entries
        s = (feature_layer if score_layer is None else score_layer) % n
        if s == 0:
            raise ValueError("no received attention: the feature layer is the embeddings, "
                             "which no ViT layer produces")
        self.tower, self.feature_layer, self.drop_cls, self.s = tower, feature_layer, drop_cls, s
        self.layer = layers[s - 1]  # shared, read-only

    def forward(self, pixel_values: torch.Tensor):
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[self.feature_layer]  # [B, N, Dv]
        x = self.layer.layer_norm1(out.hidden_states[self.s - 1])
        attn = self.layer.self_attn
        B, N, _ = x.shape
        H, hd = attn.num_heads, attn.head_dim
        q = attn.q_proj(x).view(B, N, H, hd).transpose(1, 2)  # [B, H, N, hd]
        k = attn.k_proj(x).view(B, N, H, hd).transpose(1, 2)
        # NOTE: HF's eager order: (q @ k^T) * scale, softmax in float32
        p = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * attn.scale, dim=-1,
                          dtype=torch.float32)  # [B, H, N, N]
        recv = p.mean(dim=(1, 2))  # [B, N]: column means over heads and query rows
        keys = k.mean(1)  # [B, N, hd]
        if self.drop_cls:
            return feats[:, 1:], recv[:, 1:], keys[:, 1:]
        return feats, recv, keys
