"""Export form of the Qwen-VL vision tower: the same modules, no data-dependent Python.

transformers' Qwen-VL towers derive their rotary coordinates, window permutation, attention
chunks and (Qwen3-VL) position-table taps from ``grid_thw`` with loops over ``.tolist()`` and
split attention into per-chunk SDPA calls of data-dependent lengths. Here those layout tensors
are inputs (computed without torch by ``vlmopt.qwen_layout``), and each chunked attention is one
SDPA over all patches with a block-diagonal mask (same chunk = attend), which is the same
computation up to float rounding. Every weight-bearing part is the tower's own module
(patch embedding, norms, qkv/proj, MLPs, mergers), called as in the HF forward.

    QwenVisionExport(tower)(pixel_values, vision_pos, frame_seg[, window_index, window_seg]
                            [, interp_idx, interp_w]) -> embeddings [M, D] (, *deepstack)
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmopt import qwen_layout
from vlmopt.ir.received import received_attention

# layout inputs per family, in the order the prefill graph takes them
LAYOUT_INPUTS = {"qwen2_vl": ("vision_pos", "frame_seg"),
                 "qwen2_5_vl": ("vision_pos", "frame_seg", "window_index", "window_seg"),
                 "qwen3_vl": ("vision_pos", "frame_seg", "interp_idx", "interp_w")}


def layout_spec(config) -> dict:
    """What ``layout_feeds`` needs of a Qwen-VL config (JSON: the artifact's manifest keeps it)."""
    vc = config.vision_config
    spec = {"model_type": config.model_type, "merge": int(vc.spatial_merge_size),
            "patch_size": int(vc.patch_size),
            "inputs": list(LAYOUT_INPUTS[config.model_type])}  # the prefill graph's, in order
    if config.model_type == "qwen2_5_vl":
        spec["window_size"] = int(vc.window_size)
    if config.model_type == "qwen3_vl":
        spec["side"] = int(vc.num_position_embeddings ** 0.5)
    return spec


def layout_feeds(spec: dict, grids) -> dict[str, np.ndarray]:
    """The layout inputs of one prompt's images (numpy; no torch needed)."""
    m = spec["merge"]
    out = {"vision_pos": qwen_layout.vision_position_ids(grids, m),
           "frame_seg": qwen_layout.segment_ids(qwen_layout.frame_bounds(grids))}
    if spec["model_type"] == "qwen2_5_vl":
        idx, bounds = qwen_layout.window_layout(grids, m, spec["window_size"],
                                                spec["patch_size"])
        out["window_index"] = idx
        out["window_seg"] = qwen_layout.segment_ids(bounds)
    if spec["model_type"] == "qwen3_vl":
        out["interp_idx"], out["interp_w"] = qwen_layout.interpolation(grids, spec["side"], m)
    return out


def layout_tensors(spec: dict, grids) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in layout_feeds(spec, grids.cpu().numpy()).items()}


def _attention(attn: nn.Module, x: torch.Tensor, cos, sin, allowed: torch.Tensor):
    """The tower's attention over x [N, d] with a boolean mask [N, N] instead of chunks."""
    N = x.shape[0]
    q, k, v = attn.qkv(x).reshape(N, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    rot = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    q, k = rot(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, N, hd]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[None, None],
                                       scale=attn.scaling)  # [1, H, N, hd]
    return attn.proj(o.transpose(1, 2).reshape(N, -1))


class QwenVisionExport(nn.Module):
    def __init__(self, tower: nn.Module, n_deepstack: int = 0, received: bool = False,
                 patches: bool = False):
        super().__init__()
        self.tower, self.n_deepstack, self.received = tower, n_deepstack, received
        self.patches = patches  # MMTok's merge-group means (vlmopt.ir.mmtok.QwenVisionPatches)
        self.unit = tower.spatial_merge_size ** 2
        self.windowed = hasattr(tower, "fullatt_block_indexes")
        self.full_blocks = set(getattr(tower, "fullatt_block_indexes", []) or [])
        self.deepstack = list(getattr(tower, "deepstack_visual_indexes", []) or [])

    def _permute(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        return x.reshape(N // self.unit, self.unit, -1)[index].reshape(N, -1)

    def forward(self, pixel_values, vision_pos, frame_seg, window_index=None, window_seg=None,
                interp_idx=None, interp_w=None):
        t = self.tower
        h = t.patch_embed(pixel_values.type(t.dtype))  # [N, d]
        if interp_idx is not None:  # Qwen3-VL: the learned table resampled to the grid
            h = h + (t.pos_embed(interp_idx) * interp_w[:, :, None]).sum(1).to(h.dtype)
        cos, sin = t.rotary_pos_emb(h, vision_pos)
        full = frame_seg[:, None] == frame_seg[None, :]  # [N, N]
        win = None
        if self.windowed:
            h = self._permute(h, window_index)
            cos, sin = self._permute(cos, window_index), self._permute(sin, window_index)
            win = window_seg[:, None] == window_seg[None, :]
        feats, recv = [], None
        last = len(t.blocks) - 1
        for i, blk in enumerate(t.blocks):
            allowed = full if win is None or i in self.full_blocks else win
            if self.received and i == last:  # VisionZip's score (vlmopt.ir.received)
                recv = received_attention(blk.attn, blk.norm1(h), cos, sin, allowed, self.unit)
            h = h + _attention(blk.attn, blk.norm1(h), cos, sin, allowed)
            h = h + blk.mlp(blk.norm2(h))
            if i in self.deepstack:
                feats.append(t.deepstack_merger_list[self.deepstack.index(i)](h))
        merged = t.merger(h)
        means = h.reshape(h.shape[0] // self.unit, self.unit, -1).mean(1) if self.patches \
            else None
        if self.windowed:
            undo = torch.argsort(window_index)
            merged = merged[undo]
            recv = recv[undo] if recv is not None else None
            means = means[undo] if means is not None else None
        if self.received:
            return (merged, *feats, recv)
        if self.patches:
            return (merged, *feats, means)
        return (merged, *feats) if self.n_deepstack else merged
