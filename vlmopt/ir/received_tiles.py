"""Tile towers (Idefics3 / SmolVLM, InternVL): VisionZip's dominant tokens by received attention.

The LLM token of a tile tower is a pixel-shuffle group of ``s x s`` ViT patches, so no single
[CLS] row or patch ranks it. The score is the CLS-free rule vlmopt uses on Qwen-VL
(vlmopt.ir.received, after LightCompress's Qwen2.5-VL VisionZip port): the attention each
patch receives in the ViT layer producing the connector's features, averaged over heads and
summed over the tile's query rows (so every tile's scores average 1 per patch, whatever its
size: a sample's tiles are ranked together, the budget is global per image), then averaged over
each pixel-shuffle group - by running the family's own shuffle on the score, so the groups are
the LLM tokens in the LLM's order by construction.

- Idefics3 / SmolVLM (SigLIP, no CLS): the last encoder layer; padded patches
  (``pixel_attention_mask``) are neither queries nor keys, as in the tower's mask.
- InternVL (InternViT): the layer producing ``vision_feature_layer``; its CLS is a query (it
  is in the tower's attention) but receives no score (it is no LLM token).

The probabilities are recomputed from the layer's attention input with its own q/k
projections (and q/k norms), one head at a time, in HF's eager order.

    TileVisionReceived(tile_vision)(pixel_values, pixel_attention_mask) -> (emb, received)
    InternVisionReceived(intern_vision)(pixel_values) -> (emb [N, D], received [N])
"""

from __future__ import annotations

import torch
from torch import nn

from vlmopt.ir.blocks import InternVision, TileVision, intern_pixel_shuffle


def _received(attn: nn.Module, x: torch.Tensor, mask, queries: torch.Tensor | None
              ) -> torch.Tensor:
    """Head-mean attention each key receives, summed over the ``queries`` rows ([n, N] bool;
    None: all), in block ``attn`` on its input x [n, N, d] with HF's 4-D ``mask`` (additive,
    bool or None). Returns [n, N] float32."""
    n, N, _ = x.shape
    H = attn.num_heads
    hd = attn.head_dim
    q = attn.q_proj(x)
    k = attn.k_proj(x)
    if hasattr(attn, "q_norm"):  # InternViT's optional qk norm (nn.Identity when off)
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = q.reshape(n, N, H, hd).transpose(1, 2)
    k = k.reshape(n, N, H, hd).transpose(1, 2)
    w = None if queries is None else queries.to(torch.float32)[:, :, None]  # [n, N, 1]
    recv = x.new_zeros(n, N, dtype=torch.float32)
    # NOTE: one head at a time (static count: unrolled in export): [n, N, N] live, not H times
    for h in range(H):
        logits = torch.matmul(q[:, h], k[:, h].transpose(1, 2)) * attn.scale  # [n, N, N]
        if mask is not None:
            m = mask[:, 0]
            logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else \
                logits + m
        p = torch.softmax(logits, dim=-1, dtype=torch.float32)
        recv = recv + (p.sum(1) if w is None else (p * w).sum(1))
    return recv / H


def _grab(module: nn.Module):
    """A pre-hook on ``module`` that records its input hidden states and attention mask."""
    seen: dict = {}

    def hook(mod, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["mask"] = args[1] if len(args) > 1 else kwargs.get("attention_mask")

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


class TileVisionReceived(nn.Module):
    """``blocks.TileVision`` plus the received attention of each LLM token [N_total]."""

    def __init__(self, vision: TileVision):
        super().__init__()
        self.vision = vision
        self.n_deepstack = 0

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor):
        v = self.vision
        pv, patch_mask = v.tiles(pixel_values, pixel_attention_mask)
        attn = v.tower.encoder.layers[-1].self_attn
        seen, hook = _grab(attn)
        try:
            out = v.tower(pixel_values=pv, patch_attention_mask=patch_mask, return_dict=True)
        finally:
            hook.remove()
        feats = v.connector(out.last_hidden_state)
        valid = patch_mask.reshape(patch_mask.shape[0], -1)  # [n, N]
        recv = _received(attn, seen["x"], seen["mask"], valid) * valid
        s = v.connector.scale_factor
        groups = v.connector.pixel_shuffle(recv[..., None], s)  # [n, N / s^2, s^2]
        return feats.reshape(-1, feats.shape[-1]), groups.mean(-1).reshape(-1)


class InternVisionReceived(nn.Module):
    """``blocks.InternVision`` plus the received attention of each LLM token [N_total]."""

    def __init__(self, vision: InternVision):
        super().__init__()
        self.vision = vision
        self.n_deepstack = 0
        layers = vision.tower.encoder.layer
        f = vision.feature_layer % (len(layers) + 1)
        if f == 0:
            raise ValueError("no received attention: the feature layer is the embeddings, "
                             "which no ViT layer produces")
        self.attn = layers[f - 1].attention  # shared, read-only

    def forward(self, pixel_values: torch.Tensor):
        v = self.vision
        seen, hook = _grab(self.attn)
        try:
            emb = v(pixel_values)
        finally:
            hook.remove()
        recv = _received(self.attn, seen["x"], seen["mask"], None)  # [n, 1 + side^2]
        if v.drop_cls:
            recv = recv[:, 1:]
        groups = intern_pixel_shuffle(recv[..., None], v.ratio)  # [n, side^2 r^2, 1/r^2]
        return emb, groups.mean(-1).reshape(-1)


def for_tower(vision: nn.Module) -> nn.Module | None:
    """The received-attention form of a tile tower's vision block, or None for other towers."""
    if isinstance(vision, TileVision):
        return TileVisionReceived(vision)
    if isinstance(vision, InternVision):
        return InternVisionReceived(vision)
    return None
