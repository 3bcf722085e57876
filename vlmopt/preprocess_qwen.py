"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL image preprocessing with numpy and Pillow alone.

NOTE: this module must never import torch or transformers: the ONNX runtime uses it, and its
tests run with torch unimportable. It reproduces transformers' ``Qwen2VLImageProcessorPil``
(which Qwen2.5-VL and Qwen3-VL checkpoints use too; Qwen3-VL only changes the numbers: patch 16,
mean/std 0.5, ``size: {shortest_edge, longest_edge}``) bit for bit:

    cfg = image_config(json.load(open("preprocessor_config.json")))
    patches, grid = pixels(image, cfg)        # [N, C*tp*p*p] float32, [3] int64 (t, h, w)
    text = expand_image_tokens(chat_text, n_tokens(grid, cfg.merge_size))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlmopt.errors import VlmoptError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200  # transformers' smart_resize rejects anything above
IMAGE_PAD = "<|image_pad|>"


@dataclass(frozen=True)
class QwenImageConfig:
    """What the Qwen-VL image processor reads from a checkpoint; defaults are transformers'."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = 3  # PIL.Image.Resampling.BICUBIC

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels",
                     "max_pixels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise VlmoptError(f"image processor config: {name} must be a positive integer, "
                                  f"got {v!r}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise VlmoptError(f"image processor config: image_mean {list(self.mean)} and "
                              f"image_std {list(self.std)} must have one value per channel")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merge window of patches."""
        return self.patch_size * self.merge_size


def image_config(preprocessor_config: dict) -> QwenImageConfig:
    """The image config of a ``preprocessor_config.json`` dict, or of a ``processor_config.json``
    dict (transformers 5 nests it under ``image_processor``).

    Pixel limits come from ``size: {shortest_edge, longest_edge}``; top-level ``min_pixels`` /
    ``max_pixels`` override them, as in transformers.
    """
    d = preprocessor_config
    if isinstance(d.get("image_processor"), dict):
        d = d["image_processor"]
    size = d.get("size")
    if size is None:
        size = {"shortest_edge": QwenImageConfig.min_pixels,
                "longest_edge": QwenImageConfig.max_pixels}
    if not isinstance(size, dict):
        raise VlmoptError(f"image processor config: size must be a dict, got {size!r}")
    limits = {}
    for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        v = d.get(key) if d.get(key) is not None else size.get(edge)
        if v is None:  # transformers fails here too, at the first image
            raise VlmoptError(f"image processor config: size needs '{edge}' (or a top-level "
                              f"'{key}'), got size={size}")
        limits[key] = v

    def get(key, default):
        return default if d.get(key) is None else d[key]

    return QwenImageConfig(
        patch_size=get("patch_size", 14), temporal_patch_size=get("temporal_patch_size", 2),
        merge_size=get("merge_size", 2), **limits,
        mean=tuple(float(v) for v in _per_channel(get("image_mean", OPENAI_CLIP_MEAN))),
        std=tuple(float(v) for v in _per_channel(get("image_std", OPENAI_CLIP_STD))),
        rescale_factor=float(get("rescale_factor", 1 / 255)),
        do_resize=bool(get("do_resize", True)), do_rescale=bool(get("do_rescale", True)),
        do_normalize=bool(get("do_normalize", True)),
        do_convert_rgb=bool(get("do_convert_rgb", True)), resample=int(get("resample", 3)),
    )


def _per_channel(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v] * 3


def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """(h, w) multiples of ``factor`` near the aspect ratio, h*w within the pixel limits.

    The same rounding as transformers' ``smart_resize`` (Python's half-to-even ``round``);
    one ``VlmoptError`` line where it would raise.
    """
    if height <= 0 or width <= 0:
        raise VlmoptError(f"image of {width}x{height} pixels: both sides must be positive")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise VlmoptError(f"image of {width}x{height} pixels: aspect ratio {ratio:.1f} is above "
                          f"{MAX_ASPECT_RATIO}, which Qwen-VL image processors reject")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:
        raise VlmoptError(f"image of {width}x{height} pixels resizes to {w_bar}x{h_bar} "
                          f"(min_pixels={min_pixels}): nothing left to encode")
    return h_bar, w_bar


def grid_for_size(height: int, width: int, cfg: QwenImageConfig) -> tuple[int, int, int]:
    """(t, h, w) patch grid of a ``height`` x ``width`` image, without the image."""
    if cfg.do_resize:
        height, width = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    elif height % cfg.factor or width % cfg.factor:
        raise VlmoptError(f"image of {width}x{height} pixels with do_resize=false: both sides "
                          f"must be multiples of patch_size*merge_size={cfg.factor}")
    return 1, height // cfg.patch_size, width // cfg.patch_size


def n_tokens(grid_thw, merge: int) -> int:
    """Image pad tokens for one image: t*h*w patches, merged ``merge`` x ``merge``."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // merge**2


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white, as transformers converts."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def pixels(image: Image.Image, cfg: QwenImageConfig) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (patches [N, C*tp*p*p] float32, grid_thw [3] int64), as transformers'
    Qwen2-VL image processor (PIL backend) computes them; N = t*h*w of the grid."""
    if not isinstance(image, Image.Image):
        raise VlmoptError(f"expected a PIL image, got {type(image).__name__}")
    if cfg.do_convert_rgb:
        image = to_rgb(image)
    t, gh, gw = grid_for_size(image.height, image.width, cfg)
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if cfg.do_resize:
        image = image.resize((gw * p, gh * p), resample=cfg.resample)
    arr = np.array(image)  # [H, W, C] uint8
    if arr.ndim == 2:
        arr = arr[:, :, None]
    c = arr.shape[-1]
    if c != len(cfg.mean):
        raise VlmoptError(f"image with {c} channels but image_mean has {len(cfg.mean)} values "
                          "(set do_convert_rgb)")
    if cfg.do_rescale:
        # NOTE: float64 multiply, then float32 - transformers' rescale, bit for bit
        x = (arr.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        x = arr.astype(np.float32)
    if cfg.do_normalize:  # float32 arithmetic, as transformers' normalize
        x = (x - np.array(cfg.mean, dtype=np.float32)) / np.array(cfg.std, dtype=np.float32)
    # x: [gh/m * m * p, gw/m * m * p, C] -> windows of m x m patches, each patch C, ph, pw
    x = x.reshape(gh // m, m, p, gw // m, m, p, c)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # [gh/m, gw/m, mh, mw, C, ph, pw]
    # NOTE: the still image is repeated over the temporal patch, after the channel axis
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tp, p, p))
    patches = np.ascontiguousarray(x.reshape(gh * gw, c * tp * p * p), dtype=np.float32)
    return patches, np.array([t, gh, gw], dtype=np.int64)


def expand_image_tokens(text: str, n_tokens: int | Sequence[int],
                        image_pad: str = IMAGE_PAD) -> str:
    """Each ``image_pad`` placeholder of ``text`` repeated to its image's token count.

    ``n_tokens`` is one count (the text must then hold exactly one placeholder) or one count per
    placeholder, in order - what the Qwen-VL processors do before tokenizing.
    """
    counts = [n_tokens] if isinstance(n_tokens, int) else [int(n) for n in n_tokens]
    parts = text.split(image_pad)
    if len(parts) - 1 != len(counts):
        raise VlmoptError(f"the prompt has {len(parts) - 1} {image_pad} placeholders for "
                          f"{len(counts)} images")
    out = [parts[0]]
    for n, rest in zip(counts, parts[1:]):
        out += [image_pad * n, rest]
    return "".join(out)
