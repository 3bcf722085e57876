"""InternVL image preprocessing and prompt expansion with numpy and Pillow alone.

NOTE: this module must never import torch or transformers: the ONNX runtime uses it. It
reproduces transformers' ``GotOcr2ImageProcessorPil`` (the image processor of InternVL
checkpoints) and ``InternVLProcessor``'s image prompt bit for bit:

    cfg = image_config_of(json.load(open("preprocessor_config.json")))
    tiles = pixels(image, cfg)                               # [n, 3, S, S] float32
    text = text.replace("<image>", image_prompt(len(tiles), tokens_per_tile), 1)

The rule (``crop_to_patches``): among the (cols, rows) grids with min_patches <= cols*rows <=
max_patches, sorted by tile count, take the one whose aspect ratio is closest to the image's
(on a tie, the later one while the image covers more than half its area); resize the image to
(cols*S, rows*S), cut it row-major, and append the whole image resized to S x S when there is more
than one tile. Without ``crop_to_patches`` the image is resized to S x S. Resizes are Pillow's
(bicubic by default) on the uint8 image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlmopt.errors import VlmoptError
from vlmopt.preprocess_idefics3 import _resize, chw_float, read_config_file, uint8_array

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TilingConfig:
    """What the GotOcr2 image processor reads; defaults are transformers' (InternVL checkpoints
    set crop_to_patches, 448-px tiles and max_patches 12)."""

    tile: int = 448
    crop_to_patches: bool = True
    min_patches: int = 1
    max_patches: int = 12
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    rescale_factor: float = 1 / 255
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = 3  # PIL.Image.Resampling.BICUBIC

    def __post_init__(self):
        for name in ("tile", "min_patches", "max_patches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise VlmoptError(f"image processor config: {name} must be a positive integer, "
                                  f"got {v!r}")


def image_config_of(d: dict) -> TilingConfig:
    if isinstance(d.get("image_processor"), dict):
        d = d["image_processor"]

    def get(key, default):
        return default if d.get(key) is None else d[key]

    size = get("size", {"height": 384, "width": 384})
    if not isinstance(size, dict) or size.get("height") != size.get("width") \
            or size.get("height") is None:
        raise VlmoptError(f"image processor config: size must be a square {{height, width}}, "
                          f"got {size!r}")

    def per(v):
        return tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))

    return TilingConfig(
        tile=int(size["height"]), crop_to_patches=bool(get("crop_to_patches", False)),
        min_patches=int(get("min_patches", 1)), max_patches=int(get("max_patches", 12)),
        do_resize=bool(get("do_resize", True)), do_rescale=bool(get("do_rescale", True)),
        do_normalize=bool(get("do_normalize", True)),
        do_convert_rgb=bool(get("do_convert_rgb", True)),
        rescale_factor=float(get("rescale_factor", 1 / 255)),
        mean=per(get("image_mean", OPENAI_CLIP_MEAN)), std=per(get("image_std", OPENAI_CLIP_STD)),
        resample=int(get("resample", 3)))


def image_config(path, config=None) -> TilingConfig:
    """The image config of a checkpoint directory (defaults with the vision config's tile
    without one)."""
    default = TilingConfig()
    if config is not None:
        s = config.vision_config.image_size
        default = TilingConfig(tile=int(s if isinstance(s, int) else s[0]))
    return read_config_file(path, image_config_of, default)


def best_grid(height: int, width: int, cfg: TilingConfig) -> tuple[int, int]:
    """(cols, rows) of the tiling, as transformers' ``get_optimal_tiled_canvas``."""
    grids = sorted(((w, h) for w in range(1, cfg.max_patches + 1)
                    for h in range(1, cfg.max_patches + 1)
                    if cfg.min_patches <= w * h <= cfg.max_patches), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for g in grids:
        diff = abs(aspect - g[0] / g[1])
        if diff < best_diff:
            best, best_diff = g, diff
        elif diff == best_diff and area > 0.5 * cfg.tile * cfg.tile * g[0] * g[1]:
            best = g
    return best


def tiles_for_size(height: int, width: int, cfg: TilingConfig) -> int:
    """Tiles of one image: cols * rows, plus the thumbnail when that is more than one."""
    if height <= 0 or width <= 0:
        raise VlmoptError(f"image of {width}x{height} pixels: both sides must be positive")
    if not (cfg.crop_to_patches and cfg.max_patches > 1):
        return 1
    cols, rows = best_grid(height, width, cfg)
    return cols * rows + (cols * rows != 1)


def pixels(image: Image.Image, cfg: TilingConfig) -> np.ndarray:
    """One image -> its tiles [n, C, S, S] float32."""
    if not isinstance(image, Image.Image):
        raise VlmoptError(f"expected a PIL image, got {type(image).__name__}")
    arr = uint8_array(image, cfg)
    S = cfg.tile
    if cfg.crop_to_patches and cfg.max_patches > 1:
        cols, rows = best_grid(*arr.shape[:2], cfg)
        big = _resize(arr, rows * S, cols * S, cfg.resample)
        frames = [big[r * S:(r + 1) * S, c * S:(c + 1) * S]
                  for r in range(rows) for c in range(cols)]
        if len(frames) != 1:
            frames.append(_resize(arr, S, S, cfg.resample))
    else:
        frames = [_resize(arr, S, S, cfg.resample) if cfg.do_resize else arr]
    out = [chw_float(f, cfg) for f in frames]
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def image_prompt(n_tiles: int, tokens_per_tile: int, start: str = "<img>",
                 context: str = "<IMG_CONTEXT>", end: str = "</img>") -> str:
    """The text that stands for one image, as ``InternVLProcessor`` writes it."""
    return f"{start}{context * (tokens_per_tile * n_tiles)}{end}"
