"""Idefics3 / SmolVLM image preprocessing and prompt expansion with numpy and Pillow alone.

NOTE: this module must never import torch or transformers: the ONNX runtime uses it. It
reproduces transformers' ``Idefics3ImageProcessorPil`` (SmolVLM's is the same rule) and the
processors' image prompt string bit for bit:

    cfg = image_config_of(json.load(open("preprocessor_config.json")))
    tiles, mask, rows, cols = pixels(image, cfg)   # [n, 3, S, S] float32, [n, S, S] int64
    text = text.replace("<image>", image_prompt(rows, cols, tokens_per_tile), 1)

The rule: resize the longest edge to ``size["longest_edge"]`` (the short edge rounded up to
even), then each side up to a multiple of the tile ``S = max_image_size["longest_edge"]``; if the
result is larger than one tile, cut it into ``rows x cols`` tiles of S x S and append the whole
image resized to S x S (the "global" image); otherwise the one S x S image. Every resize is a
Pillow resize of the uint8 image (LANCZOS by default) from the previous step's result.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlmopt.errors import VlmoptError
from vlmopt.preprocess_qwen import to_rgb

MAX_IMAGE_SIZE = 4096  # transformers' absolute bound on a resized side


@dataclass(frozen=True)
class TileImageConfig:
    """What the Idefics3 / SmolVLM image processor reads; defaults are transformers'."""

    longest_edge: int = 4 * 364  # size["longest_edge"]
    tile: int = 364  # max_image_size["longest_edge"]: the tower's input side
    do_image_splitting: bool = True
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    rescale_factor: float = 1 / 255
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: int = 1  # PIL.Image.Resampling.LANCZOS

    def __post_init__(self):
        for name in ("longest_edge", "tile"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise VlmoptError(f"image processor config: {name} must be a positive integer, "
                                  f"got {v!r}")


def image_config_of(d: dict) -> TileImageConfig:
    """The config of a ``preprocessor_config.json`` dict (or a ``processor_config.json`` one,
    which nests it under ``image_processor``)."""
    if isinstance(d.get("image_processor"), dict):
        d = d["image_processor"]

    def get(key, default):
        return default if d.get(key) is None else d[key]

    def edge(key, default):
        v = get(key, {"longest_edge": default})
        if not isinstance(v, dict) or "longest_edge" not in v:
            raise VlmoptError(f"image processor config: {key} must be a dict with "
                              f"'longest_edge', got {v!r}")
        return v["longest_edge"]

    def per(v):
        return tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))

    return TileImageConfig(
        longest_edge=edge("size", TileImageConfig.longest_edge),
        tile=edge("max_image_size", TileImageConfig.tile),
        do_image_splitting=bool(get("do_image_splitting", True)),
        do_resize=bool(get("do_resize", True)), do_rescale=bool(get("do_rescale", True)),
        do_normalize=bool(get("do_normalize", True)),
        do_convert_rgb=bool(get("do_convert_rgb", True)),
        rescale_factor=float(get("rescale_factor", 1 / 255)),
        mean=per(get("image_mean", (0.5, 0.5, 0.5))), std=per(get("image_std", (0.5, 0.5, 0.5))),
        resample=int(get("resample", 1)))


def read_config_file(path, parse, default):
    """``parse`` of a checkpoint directory's preprocessor (or processor) config JSON; ``default``
    when it has neither file."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = Path(path) / name
        if f.is_file():
            try:
                d = json.loads(f.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise VlmoptError(f"{f}: not valid JSON ({e})") from None
            if not isinstance(d, dict):
                raise VlmoptError(f"{f}: expected a JSON object, got {type(d).__name__}")
            try:
                return parse(d)
            except VlmoptError as e:
                raise VlmoptError(f"{f}: {e}") from None
    return default


def image_config(path, config=None) -> TileImageConfig:
    """The image config of a checkpoint directory (transformers' defaults without one, with the
    tile side from the vision config when given)."""
    default = TileImageConfig()
    if config is not None:
        side = int(config.vision_config.image_size)
        default = TileImageConfig(longest_edge=4 * side, tile=side)
    return read_config_file(path, image_config_of, default)


def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    """transformers' ``_resize_output_size_rescale_to_max_len`` (the short side made even)."""
    aspect = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect)
        height += height % 2
    else:
        height = max_len
        width = int(height * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def _below_upper_bound(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def first_size(height: int, width: int, cfg: TileImageConfig) -> tuple[int, int]:
    """(h, w) after the first resize (longest edge to ``size``)."""
    h, w = _rescale_to_max_len(height, width, cfg.longest_edge)
    return _below_upper_bound(h, w, MAX_IMAGE_SIZE)


def encoder_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(h, w) after ``resize_for_vision_encoder``: each side up to a multiple of the tile."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def split_for_size(height: int, width: int, cfg: TileImageConfig) -> tuple[int, int]:
    """(rows, cols) of the split of a ``height`` x ``width`` image; (0, 0): one tile, no split."""
    if height <= 0 or width <= 0:
        raise VlmoptError(f"image of {width}x{height} pixels: both sides must be positive")
    if not cfg.do_image_splitting:
        return 0, 0
    if cfg.do_resize:
        height, width = first_size(height, width, cfg)
    h, w = encoder_size(height, width, cfg.tile)
    if h > cfg.tile or w > cfg.tile:
        return (h - cfg.tile) // cfg.tile + 1, (w - cfg.tile) // cfg.tile + 1
    return 0, 0


def tiles_for_size(height: int, width: int, cfg: TileImageConfig) -> int:
    """Tiles the tower runs for one image: rows * cols + the global one, or 1."""
    rows, cols = split_for_size(height, width, cfg)
    return rows * cols + 1 if rows else 1


def _resize(arr: np.ndarray, h: int, w: int, resample: int) -> np.ndarray:
    """Pillow's resize of a uint8 [H, W, C] array, as transformers' PIL backend does it."""
    if arr.shape[:2] == (h, w):
        return arr
    return np.array(Image.fromarray(arr).resize((w, h), resample=resample))


def uint8_array(image: Image.Image, cfg) -> np.ndarray:
    """The image as transformers' PIL backends take it: RGB if ``do_convert_rgb``, [H, W, C]."""
    if cfg.do_convert_rgb:
        image = to_rgb(image)
    arr = np.array(image)
    return arr[:, :, None] if arr.ndim == 2 else arr


def chw_float(frame: np.ndarray, cfg) -> np.ndarray:
    """One uint8 [H, W, C] frame rescaled and normalised as transformers does, [C, H, W]."""
    x = frame.astype(np.float32)
    if cfg.do_rescale:  # NOTE: float64 multiply, then float32 - transformers' rescale
        x = (frame.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        x = (x - np.array(cfg.mean, dtype=np.float32)) / np.array(cfg.std, dtype=np.float32)
    return np.moveaxis(x, -1, 0)


def pixels(image: Image.Image, cfg: TileImageConfig):
    """One image -> (tiles [n, C, S, S] float32, pixel mask [n, S, S] int64, rows, cols)."""
    if not isinstance(image, Image.Image):
        raise VlmoptError(f"expected a PIL image, got {type(image).__name__}")
    arr = uint8_array(image, cfg)
    S = cfg.tile
    if cfg.do_image_splitting:
        if cfg.do_resize:
            arr = _resize(arr, *first_size(*arr.shape[:2], cfg), cfg.resample)
        arr = _resize(arr, *encoder_size(*arr.shape[:2], S), cfg.resample)
        h, w = arr.shape[:2]
        if h > S or w > S:
            rows, cols = (h - S) // S + 1, (w - S) // S + 1
            frames = [arr[r * S:(r + 1) * S, c * S:(c + 1) * S]
                      for r in range(rows) for c in range(cols)]
            frames.append(_resize(arr, S, S, cfg.resample))
        else:
            rows, cols, frames = 0, 0, [arr]
    else:
        if cfg.do_resize:
            arr = _resize(arr, *first_size(*arr.shape[:2], cfg), cfg.resample)
        rows, cols, frames = 0, 0, [_resize(arr, S, S, cfg.resample)]
    out = [chw_float(f, cfg) for f in frames]
    tiles = np.ascontiguousarray(np.stack(out), dtype=np.float32)
    if tiles.shape[2:] != (S, S):
        raise VlmoptError(f"image resized to {tiles.shape[3]}x{tiles.shape[2]}, not the "
                          f"{S}x{S} tile the tower takes")
    return tiles, np.ones((len(out), S, S), dtype=np.int64), rows, cols


@dataclass(frozen=True)
class PromptTokens:
    image: str = "<image>"
    fake: str = "<fake_token_around_image>"
    global_image: str = "<global-img>"


def image_prompt(rows: int, cols: int, tokens_per_tile: int,
                 t: PromptTokens = PromptTokens()) -> str:
    """The text that stands for one image in the prompt, as the Idefics3 / SmolVLM processors
    write it: per tile ``<fake><row_r_col_c>`` + image tokens, a newline after each row, then
    ``\\n<fake><global-img>`` + image tokens + ``<fake>``; one tile: ``<fake><global-img>`` +
    image tokens + ``<fake>``."""
    run = t.image * tokens_per_tile
    if not rows:
        return f"{t.fake}{t.global_image}{run}{t.fake}"
    text = ""
    for r in range(rows):
        for c in range(cols):
            text += f"{t.fake}<row_{r + 1}_col_{c + 1}>{run}"
        text += "\n"
    return text + f"\n{t.fake}{t.global_image}{run}{t.fake}"
