"""LLaVA-NeXT / LLaVA-OneVision (AnyRes) image preprocessing, prompt length and feature layout
with numpy and Pillow alone.

NOTE: this module must never import torch or transformers: the ONNX runtime uses it. It
reproduces transformers' ``LlavaNextImageProcessorPil`` / ``LlavaOnevisionImageProcessorPil``
(single image per prompt) and the models' ``pack_image_features`` bit for bit:

    cfg = image_config_of(json.load(open("preprocessor_config.json")))
    tiles = pixels(image, cfg)                       # [1 + rows*cols, 3, S, S] float32
    lay = layout(h, w, cfg.pinpoints, cfg.tile, side, max_patches)
    text = text.replace("<image>", "<image>" * lay.n_slots, 1)

The image rule: pick the pinpoint resolution that keeps the most of the image
(``select_best_resolution``), resize the image into it keeping the aspect ratio, pad it
centred with zeros, cut it into S x S tiles, and put the whole image resized to S x S (the
"base" tile) first. Every resize is a Pillow resize of the uint8 image (BICUBIC by default).

The feature rule (``layout``): the tiles' (S/p)^2-feature grids are stitched into one
(rows * S/p) x (cols * S/p) grid, the rows or columns the padding added are cut away
("unpadding"), OneVision's ``anyres_max_N`` shrinks the grid bilinearly when it holds more
than ~N tiles' features, and an ``image_newline`` embedding ends each row. The LLM sees the
base tile's features, then the grid row by row with its newlines: ``n_slots`` = P + rows' *
(cols' + 1) image tokens, of which ``n_visual`` = P + rows' * cols' are image features and
``n_newline`` = rows' are newline embeddings (text, for the token passes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlmopt.errors import VlmoptError
from vlmopt.preprocess_idefics3 import _resize, chw_float, uint8_array

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class AnyResImageConfig:
    """What the AnyRes image processors read; defaults are transformers' (NeXT's CLIP ones)."""

    tile: int  # S: the tower's input side (crop_size, or size)
    pinpoints: tuple[tuple[int, int], ...]  # (height, width) resolutions, multiples of S
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    rescale_factor: float = 1 / 255
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = 3  # PIL.Image.Resampling.BICUBIC

    def __post_init__(self):
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile <= 0:
            raise VlmoptError(f"image processor config: tile side must be a positive integer, "
                              f"got {self.tile!r}")
        if not self.pinpoints:
            raise VlmoptError("image processor config: image_grid_pinpoints is empty")
        for p in self.pinpoints:
            if len(p) != 2 or min(p) <= 0 or p[0] % self.tile or p[1] % self.tile:
                raise VlmoptError(f"image processor config: image_grid_pinpoints entry {list(p)} "
                                  f"is not a (height, width) multiple of the {self.tile} px tile")


def image_config_of(d: dict) -> AnyResImageConfig:
    """The config of a ``preprocessor_config.json`` dict (or of a ``processor_config.json`` one
    that nests it under ``image_processor``). Only processors whose every tile enters the tower
    unchanged are read (base size = crop = tile, as every released checkpoint has)."""
    if isinstance(d.get("image_processor"), dict):
        d = d["image_processor"]

    def get(key, default):
        return default if d.get(key) is None else d[key]

    size = get("size", {})
    if not isinstance(size, dict):
        raise VlmoptError(f"image processor config: size must be a dict, got {size!r}")
    if size.get("height") and size.get("width"):
        base = (int(size["height"]), int(size["width"]))
    elif size.get("shortest_edge"):
        base = (int(size["shortest_edge"]),) * 2
    else:
        raise VlmoptError(f"image processor config: size {size} has neither height/width nor "
                          "shortest_edge")
    crop = get("crop_size", None) if get("do_center_crop", False) else None
    tile = int(crop["height"]) if isinstance(crop, dict) and crop.get("height") else \
        int(size.get("height") or size["shortest_edge"])
    if base != (tile, tile) or (isinstance(crop, dict) and int(crop.get("width", tile)) != tile):
        raise VlmoptError(f"image processor config: size {size} and crop_size {crop} do not "
                          f"both give the {tile} px square tile; such processors are not read")
    pins = get("image_grid_pinpoints", None)
    if not isinstance(pins, list):
        raise VlmoptError("image processor config: image_grid_pinpoints must be a list of "
                          f"[height, width], got {pins!r}")

    def per(v):
        return tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))

    return AnyResImageConfig(
        tile=tile, pinpoints=tuple((int(h), int(w)) for h, w in pins),
        do_resize=bool(get("do_resize", True)), do_rescale=bool(get("do_rescale", True)),
        do_normalize=bool(get("do_normalize", True)),
        do_convert_rgb=bool(get("do_convert_rgb", True)),
        rescale_factor=float(get("rescale_factor", 1 / 255)),
        mean=per(get("image_mean", OPENAI_CLIP_MEAN)), std=per(get("image_std", OPENAI_CLIP_STD)),
        resample=int(get("resample", 3)))


def image_config(path) -> AnyResImageConfig | None:
    """The image config of a checkpoint directory, None without one."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = Path(path) / name
        if f.is_file():
            try:
                d = json.loads(f.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise VlmoptError(f"{f}: not valid JSON ({e})") from None
            if name == "preprocessor_config.json" or isinstance(d.get("image_processor"), dict):
                return image_config_of(d)
    return None


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """transformers' ``select_best_resolution``: the most effective pixels, then the least
    waste, first one on ties."""
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    return best


def patch_output_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """transformers' ``get_patch_output_size``: the image resized into ``target``, aspect kept."""
    th, tw = target
    sw, sh = tw / width, th / height
    if sw < sh:
        return min(math.ceil(height * sw), th), tw
    return th, min(math.ceil(width * sh), tw)


def pixels(image: Image.Image, cfg: AnyResImageConfig) -> np.ndarray:
    """One image -> tiles [1 + rows * cols, C, S, S] float32: the base tile, then the grid."""
    if not isinstance(image, Image.Image):
        raise VlmoptError(f"expected a PIL image, got {type(image).__name__}")
    arr = uint8_array(image, cfg)
    h, w = arr.shape[:2]
    S = cfg.tile
    best = select_best_resolution(h, w, cfg.pinpoints)
    resized = _resize(arr, *patch_output_size(h, w, best), cfg.resample)
    py, ry = divmod(best[0] - resized.shape[0], 2)
    px, rx = divmod(best[1] - resized.shape[1], 2)
    padded = np.pad(resized, ((py, py + ry), (px, px + rx), (0, 0)), constant_values=0)
    frames = [_resize(arr, S, S, cfg.resample)]
    frames += [padded[i:i + S, j:j + S] for i in range(0, best[0], S)
               for j in range(0, best[1], S)]
    out = [chw_float(f, cfg) for f in frames]
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


@dataclass(frozen=True)
class Layout:
    """Where each LLM image token of one image comes from. Rows of ``index`` / ``weight``
    [n_slots, 4] pick rows of the table [n_tiles * P + 1, D] (every tile's projected features,
    base first, then the newline embedding) and weigh them: one source with weight 1, or the
    four corners of OneVision's bilinear downsampling. ``visual`` [n_visual]: the slots that
    hold image features (the others are newlines)."""

    n_tiles: int  # 1 + rows * cols
    grid: tuple[int, int]  # (rows, cols) of tiles
    features: tuple[int, int]  # the stitched grid after unpadding and downsampling
    n_visual: int
    n_newline: int
    index: np.ndarray
    weight: np.ndarray
    visual: np.ndarray

    @property
    def n_slots(self) -> int:
        return self.n_visual + self.n_newline


def unpadded(height: int, width: int, cur_h: int, cur_w: int) -> tuple[int, int, int, int]:
    """transformers' ``unpad_image`` on a cur_h x cur_w feature grid: (top, bottom, left, right)."""
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = int(round(width * (cur_h / height), 7))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def _bilinear(n_in: int, n_out: int):
    """torch's ``upsample_bilinear2d`` (align_corners=False, no scale given) along one axis:
    (i0, i1, w0, w1) per output index, in float32 as its CPU kernel computes them."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def max_patches_of(aspect: str | None) -> int | None:
    """N of OneVision's ``vision_aspect_ratio`` "anyres_max_N" (None: NeXT, no downsampling)."""
    if aspect is None:
        return None
    digits = str(aspect).strip("anyres_max_")  # noqa: B005 - transformers' own (char) strip
    if not digits.isdigit() or int(digits) < 1:
        raise VlmoptError(f"vision_aspect_ratio {aspect!r}: expected 'anyres_max_N'")
    return int(digits)


def layout(height: int, width: int, pinpoints, tile: int, side: int,
           max_patches: int | None = None) -> Layout:
    """The layout of one ``height`` x ``width`` image (its size before preprocessing) whose
    tiles give ``side`` x ``side`` features each."""
    if height <= 0 or width <= 0:
        raise VlmoptError(f"image of {width}x{height} pixels: both sides must be positive")
    bh, bw = select_best_resolution(height, width, pinpoints)
    rows, cols = bh // tile, bw // tile
    P = side * side
    t, b, left, right = unpadded(height, width, rows * side, cols * side)
    ch, cw = b - t, right - left
    ys = np.arange(t, b)[:, None, None]  # grid coordinates of the unpadded cells
    xs = np.arange(left, right)[None, :, None]
    if max_patches is not None:
        ratio = math.sqrt(ch * cw / (max_patches * side ** 2))
    if max_patches is not None and ratio > 1.1:
        oh, ow = int(ch // ratio), int(cw // ratio)
        y0, y1, wy0, wy1 = _bilinear(ch, oh)
        x0, x1, wx0, wx1 = _bilinear(cw, ow)
        cy = np.stack([y0, y0, y1, y1], -1)[:, None, :] + t  # [oh, 1, 4]
        cx = np.stack([x0, x1, x0, x1], -1)[None, :, :] + left  # [1, ow, 4]
        wt = (np.stack([wy0, wy0, wy1, wy1], -1)[:, None, :]
              * np.stack([wx0, wx1, wx0, wx1], -1)[None, :, :]).astype(np.float32)
    else:
        oh, ow = ch, cw
        cy = np.broadcast_to(ys, (ch, cw, 4))
        cx = np.broadcast_to(xs, (ch, cw, 4))
        wt = np.zeros((ch, cw, 4), dtype=np.float32)
        wt[..., 0] = 1
    src = (1 + (cy // side) * cols + cx // side) * P + (cy % side) * side + cx % side
    n_tiles = 1 + rows * cols
    newline = n_tiles * P  # the table's last row
    grid_idx = np.concatenate([src, np.full((oh, 1, 4), newline, dtype=np.int64)], 1)
    nl_w = np.zeros((oh, 1, 4), dtype=np.float32)
    nl_w[..., 0] = 1
    grid_w = np.concatenate([wt, nl_w], 1)
    base_idx = np.repeat(np.arange(P, dtype=np.int64)[:, None], 4, 1)
    base_w = np.zeros((P, 4), dtype=np.float32)
    base_w[:, 0] = 1
    index = np.concatenate([base_idx, grid_idx.reshape(-1, 4)]).astype(np.int64)
    weight = np.concatenate([base_w, grid_w.reshape(-1, 4)]).astype(np.float32)
    is_visual = np.ones(len(index), dtype=bool)
    is_visual[P:] = np.tile(np.r_[np.ones(ow, dtype=bool), False], oh)
    return Layout(n_tiles=n_tiles, grid=(rows, cols), features=(oh, ow), n_visual=P + oh * ow,
                  n_newline=oh, index=np.ascontiguousarray(index),
                  weight=np.ascontiguousarray(weight),
                  visual=np.flatnonzero(is_visual).astype(np.int64))


def layout_feeds(spec: dict, height: int, width: int) -> dict[str, np.ndarray]:
    """The prefill graph's layout inputs for one image, from the manifest's / graph's layout
    spec (``pinpoints``, ``tile``, ``side``, ``max_patches``)."""
    try:
        lay = layout(height, width, spec["pinpoints"], int(spec["tile"]), int(spec["side"]),
                     spec.get("max_patches"))
    except KeyError as e:
        raise VlmoptError(f"AnyRes layout spec: field {e.args[0]!r} is missing") from None
    return {"anyres_index": lay.index, "anyres_weight": lay.weight, "anyres_visual": lay.visual}
