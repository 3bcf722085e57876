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
        try:
            with Image.open(self.image) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise VlmoptError(f"{self.where}: image not found: {self.image}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise VlmoptError(f"{self.where}: cannot decode image {self.image}: {e}") from None


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
    """Read and validate a JSONL dataset. Every error names the file and line."""
    path = resolve(spec)
    if path.is_dir() and (path / "data.jsonl").exists():
        path = path / "data.jsonl"
    if not path.is_file():
        raise VlmoptError(f"{path}: dataset file not found")
    records: list[Record] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise VlmoptError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise VlmoptError(f"{where}: expected a JSON object")
            prompt, image = obj.get("prompt"), obj.get("image")
            if not isinstance(prompt, str) or not prompt:
                raise VlmoptError(f"{where}: missing 'prompt'")
            if not isinstance(image, str) or not image:
                raise VlmoptError(f"{where}: missing 'image'")
            if prompt.count(IMAGE_PLACEHOLDER) != 1:
                raise VlmoptError(f"{where}: prompt must contain the image placeholder "
                                  f"{IMAGE_PLACEHOLDER} exactly once")
            answer = obj.get("answer")
            if answer is not None and not isinstance(answer, str):
                raise VlmoptError(f"{where}: 'answer' must be a string")
            img = (path.parent / image).resolve()
            if check_images and not img.is_file():
                raise VlmoptError(f"{where}: image not found: {img}")
            records.append(Record(img, prompt, answer, obj.get("type"), where))
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise VlmoptError(f"{path}: dataset is empty")
    return records
