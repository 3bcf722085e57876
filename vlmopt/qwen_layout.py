"""Qwen-VL layout tensors computed from the image grids, without torch (numpy only).

What the Qwen-VL vision tower and M-RoPE derive from ``grid_thw`` with data-dependent Python
(loops over ``.tolist()``, ``repeat_interleave``), computed here ahead of the graph so the
exported ONNX prefill takes them as inputs and stays free of data-dependent shapes:

- ``vision_position_ids``: the (h, w) rotary coordinates of every patch, in the tower's
  merge-block order (transformers ``get_vision_position_ids``);
- ``window_layout``: Qwen2.5-VL's window permutation and window boundaries
  (``get_vision_window_index``);
- ``segment_ids``: per token, which attention chunk it belongs to (frames, or windows), which
  the export form turns into a block-diagonal mask;
- ``interpolation``: Qwen3-VL's bilinear resampling taps of its learned position table
  (``get_vision_interpolation_indices_and_weights``, align_corners, border padding);
- ``mrope_positions``: the LLM's [3, B, T] position ids (``get_rope_index``, images only).

Each is tested against transformers' own function (tests/test_qwen_export.py).
"""

from __future__ import annotations

import numpy as np


def _grids(grids) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in g) for g in np.asarray(grids).reshape(-1, 3)]


def vision_position_ids(grids, merge: int) -> np.ndarray:
    """[N, 2] int64 (h, w) of every patch, merge-block-major, repeated per frame."""
    out = []
    for t, h, w in _grids(grids):
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hh = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hh, ww], -1), (t, 1)))
    return np.concatenate(out).astype(np.int64)


def frame_bounds(grids) -> list[int]:
    """Cumulative patch boundaries of full attention: one chunk per frame."""
    cu = [0]
    for t, h, w in _grids(grids):
        for _ in range(t):
            cu.append(cu[-1] + h * w)
    return cu


def window_layout(grids, merge: int, window_size: int, patch: int) -> tuple[np.ndarray, list]:
    """(window_index [N / merge^2] int64, cumulative patch boundaries of the windows)."""
    win = window_size // merge // patch  # window side in merged cells
    unit = merge * merge
    index, cu, base = [], [0], 0
    for t, h, w in _grids(grids):
        gh, gw = h // merge, w // merge
        idx = np.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = win - gh % win, win - gw % win  # NOTE: a full extra window when divisible
        nh, nw = (gh + ph) // win, (gw + pw) // win
        pad = np.full((t, gh + ph, gw + pw), -100)
        pad[:, :gh, :gw] = idx
        pad = pad.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, -1)
        lens = (pad != -100).sum(-1).reshape(-1)
        flat = pad.reshape(-1)
        index.append(flat[flat != -100] + base)
        cu.extend((np.cumsum(lens) * unit + cu[-1]).tolist())
        base += t * gh * gw
    dedup = [cu[0]] + [c for a, c in zip(cu, cu[1:]) if c != a]  # unique_consecutive
    return np.concatenate(index).astype(np.int64), dedup


def segment_ids(bounds: list[int]) -> np.ndarray:
    """[N] int64: the chunk each token is in, for cumulative ``bounds``."""
    lens = np.diff(np.asarray(bounds))
    return np.repeat(np.arange(len(lens)), lens).astype(np.int64)


def interpolation(grids, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL: per patch 4 bilinear taps into the side x side table and their weights,
    align_corners=True, border padding, patches in merge-block order. ([N, 4] int64, float32)"""
    rows, cols, hs, ws = [], [], [], []
    for t, h, w in _grids(grids):
        n = h * w
        within = np.tile(np.arange(n), t)
        bw = w // merge
        in_col, in_row = within % merge, (within // merge) % merge
        bcol, brow = (within // (merge * merge)) % bw, within // (merge * merge * bw)
        rows.append(brow * merge + in_row)
        cols.append(bcol * merge + in_col)
        hs.append(np.full(t * n, h))
        ws.append(np.full(t * n, w))

    def axis(index, size):
        src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(
            np.float32)
        floor = np.floor(src)
        taps = floor.astype(np.int64)[:, None] + np.arange(2)
        dist = np.abs(src[:, None] - floor[:, None] - np.arange(2, dtype=np.float32))
        return taps.clip(0, side - 1), np.clip(1 - dist, 0, None).astype(np.float32)

    ht, hw = axis(np.concatenate(rows), np.concatenate(hs))
    wt, ww = axis(np.concatenate(cols), np.concatenate(ws))
    idx = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
    wts = (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4)
    return idx, wts.astype(np.float32)


def mrope_positions(input_ids: np.ndarray, attention_mask: np.ndarray, grids,
                    image_token_id: int, merge: int) -> np.ndarray:
    """[3, B, T] int64 M-RoPE position ids of image-and-text prompts (padding: 0); the images'
    grids in prompt order, row by row."""
    grids = iter(_grids(grids))
    B, T = input_ids.shape
    out = np.zeros((3, B, T), dtype=np.int64)
    for b in range(B):
        valid = attention_mask[b].astype(bool)
        ids = input_ids[b][valid]
        pos, cur, i = [], 0, 0
        while i < len(ids):
            j = i
            if ids[i] == image_token_id:
                t, h, w = next(grids)
                gh, gw = h // merge, w // merge
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw),
                                         indexing="ij")
                pos.append(np.stack([tt.reshape(-1) + cur, hh.reshape(-1) + cur,
                                     ww.reshape(-1) + cur]))
                j = i + t * gh * gw
                cur += max(h, w) // merge
            else:
                while j < len(ids) and ids[j] != image_token_id:
                    j += 1
                pos.append(np.tile(np.arange(cur, cur + j - i), (3, 1)))
                cur += j - i
            i = j
        out[:, b, valid] = np.concatenate(pos, axis=1)
    return out
