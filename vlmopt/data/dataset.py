"""Datasets in the calibration format: JSONL, one object per line with ``image`` (a path relative
to the file), ``prompt`` (containing the ``<image>`` placeholder), optional ``answer`` and ``type``.

``builtin:synthvqa-calib`` and ``builtin:synthvqa-test`` name the fixed SynthVQA splits; they are
generated once into the cache directory (``$VLMOPT_CACHE``, default ``~/.cache/vlmopt``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlmopt.data import synthvqa
from vlmopt.errors import VlmoptError

log = logging.getLogger(__name__)
IMAGE_PLACEHOLDER = "<image>"
BUILTIN_DATASETS = {"builtin:synthvqa-calib": "calib", "builtin:synthvqa-test": "test"}


@dataclass(frozen=True)
class Record:
    image: Path
    prompt: str
    answer: str | None
    type: str | None
    where: str  # "file:line", for error messages

    def load_image(self) -> Image.Image:
        with open_image(self.image, self.where) as im:
            try:
                return im.convert("RGB")
            except (OSError, ValueError) as e:  # truncated or corrupt pixel data
                raise VlmoptError(f"{self.where}: cannot decode image {self.image}: "
                                  f"{e}") from None


def open_image(path: Path, where: str) -> Image.Image:
    """``Image.open`` (header only) with one error line naming ``where`` and the file.

    Images over Pillow's warning threshold (~89 Mpixels, e.g. 10000x10000) are opened: the
    processor resizes them. Over twice that Pillow refuses them as a decompression bomb."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except FileNotFoundError:
        raise VlmoptError(f"{where}: image not found: {path}") from None
    except IsADirectoryError:
        raise VlmoptError(f"{where}: image {path} is a directory, not an image file") from None
    except Image.DecompressionBombError as e:
        raise VlmoptError(f"{where}: image {path} refused as a decompression bomb "
                          f"({e})") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise VlmoptError(f"{where}: cannot decode image {path}: {e}") from None


def cache_dir() -> Path:
    return Path(os.environ.get("VLMOPT_CACHE", Path.home() / ".cache" / "vlmopt"))


def builtin_split(split: str) -> Path:
    """Path of the data.jsonl of a fixed SynthVQA split, generating it on first use."""
    n = synthvqa.SPLIT_SIZES[split]  # in the name too: a resized split is another dataset
    d = cache_dir() / f"synthvqa-{split}-v{synthvqa.GENERATOR_VERSION}-n{n}"
    if (d / "data.jsonl").exists():
        return d / "data.jsonl"
    d.parent.mkdir(parents=True, exist_ok=True)
    log.info("generating SynthVQA %s split into %s", split, d)
    tmp = Path(tempfile.mkdtemp(prefix=d.name + ".", dir=d.parent))
    try:
        synthvqa.write_dataset(tmp, n, synthvqa.SPLIT_SEEDS[split])
        try:
            tmp.rename(d)  # NOTE: atomic publish; a concurrent writer may have won the race
        except OSError:
            if not (d / "data.jsonl").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d / "data.jsonl"


def resolve(spec: str | os.PathLike) -> Path:
    spec = str(spec)
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_DATASETS:
            raise VlmoptError(f"unknown dataset {spec!r}; built-in datasets: "
                              + ", ".join(BUILTIN_DATASETS))
        return builtin_split(BUILTIN_DATASETS[spec])
    return Path(spec)


def load_records(spec: str | os.PathLike, limit: int | None = None,
                 check_images: bool = True) -> list[Record]:
    """Read and validate a JSONL dataset. Every error names the file and line.

    NOTE: every line is validated, also past ``limit``: a malformed line anywhere is an error,
    whatever the limit. Images are checked to exist; they are decoded when used
    (``Record.load_image``, whose errors name the record's line too)."""
    path = resolve(spec)
    if path.is_dir():
        if not (path / "data.jsonl").is_file():
            raise VlmoptError(f"{path}: is a directory without data.jsonl; give the JSONL file")
        path = path / "data.jsonl"
    if not path.exists():
        raise VlmoptError(f"{path}: dataset file not found")
    if not path.is_file():
        raise VlmoptError(f"{path}: not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise VlmoptError(f"{path}: cannot read ({e.strerror or e})") from None
    records: list[Record] = []
    for n, bline in enumerate(raw.split(b"\n"), 1):
        where = f"{path}:{n}"
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            raise VlmoptError(f"{where}: not UTF-8 text (byte 0x{bline[e.start]:02x} at column "
                              f"{e.start + 1})") from None
        if not line.strip():
            continue
        rec = _record(line, where, path, check_images)
        if limit is None or len(records) < limit:
            records.append(rec)
    if not records:
        raise VlmoptError(f"{path}: dataset is empty (no JSON lines)")
    return records


def _record(line: str, where: str, path: Path, check_images: bool) -> Record:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise VlmoptError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise VlmoptError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt, image = obj.get("prompt"), obj.get("image")
    if not isinstance(prompt, str) or not prompt:
        raise VlmoptError(f"{where}: missing 'prompt'" if prompt is None else
                          f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(image, str) or not image:
        raise VlmoptError(f"{where}: missing 'image'" if image is None else
                          f"{where}: 'image' must be a non-empty string (a path)")
    n_img = prompt.count(IMAGE_PLACEHOLDER)
    if n_img != 1:
        raise VlmoptError(f"{where}: prompt must contain the image placeholder "
                          f"{IMAGE_PLACEHOLDER} exactly once (found {n_img})")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise VlmoptError(f"{where}: 'answer' must be a string")
    qtype = obj.get("type")
    if qtype is not None and not isinstance(qtype, str):
        raise VlmoptError(f"{where}: 'type' must be a string")
    img = (path.parent / image).resolve()
    if check_images and not img.is_file():
        if img.is_dir():
            raise VlmoptError(f"{where}: image {img} is a directory, not an image file")
        raise VlmoptError(f"{where}: image not found: {img}")
    return Record(img, prompt, answer, qtype, where)
