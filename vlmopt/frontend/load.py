"""Load a LLaVA-family checkpoint offline: safetensors only, no remote code, no network.

``load("builtin:synth-llava")`` or ``load("/path/to/hf/dir")``. A config-only directory (config.json
and no weights) loads with seeded random weights, or on the meta device with ``device="meta"``, so
cost estimates and benchmarks run at real shapes without the weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmopt.errors import VlmoptError

log = logging.getLogger(__name__)
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
BUILTIN_MODELS = {"builtin:synth-llava": BUILTIN_DIR / "synth-llava"}
LLAVA_TYPES = {"llava"}


@dataclass
class LlavaAdapter:
    """The one place that knows where a LLaVA model keeps its parts (transformers v5 layout)."""

    model: torch.nn.Module  # LlavaForConditionalGeneration

    @property
    def vision_tower(self):
        return self.model.model.vision_tower

    @property
    def projector(self):
        return self.model.model.multi_modal_projector

    @property
    def lm(self):
        return self.model.model.language_model

    @property
    def embed(self):
        return self.lm.embed_tokens

    @property
    def layers(self):
        return self.lm.layers

    @property
    def rotary(self):
        return self.lm.rotary_emb

    @property
    def norm(self):
        return self.lm.norm

    @property
    def lm_head(self):
        return self.model.lm_head

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def feature_layer(self) -> int:
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise VlmoptError("vision_feature_layer lists several layers; not supported yet")
        return layer

    @property
    def drops_cls(self) -> bool:
        return self.model.config.vision_feature_select_strategy == "default"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object | None  # transformers processor, None for a config-only directory
    path: Path
    name: str
    fingerprint: str
    has_weights: bool

    @property
    def adapter(self) -> LlavaAdapter:
        return LlavaAdapter(self.model)

    @property
    def config(self):
        return self.model.config


def resolve_model(spec: str | os.PathLike) -> Path:
    spec = str(spec)
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_MODELS:
            raise VlmoptError(f"unknown model {spec!r}; built-in models: "
                              + ", ".join(BUILTIN_MODELS))
        path = BUILTIN_MODELS[spec]
        if not (path / "config.json").exists():
            raise VlmoptError(f"{spec}: checkpoint missing at {path} "
                              "(train it with examples/train_synth_llava.py)")
        return path
    path = Path(spec)
    if not path.exists():
        raise VlmoptError(f"{path}: no such model directory")
    if not path.is_dir():
        raise VlmoptError(f"{path}: a model must be a checkpoint directory")
    return path


def read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise VlmoptError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise VlmoptError(f"{cfg_file}: not valid JSON ({e.msg})") from None
    mtype = cfg.get("model_type")
    if mtype not in LLAVA_TYPES:
        raise VlmoptError(f"{path}: not a LLaVA checkpoint (model_type {mtype!r}; "
                          f"supported: {', '.join(sorted(LLAVA_TYPES))})")
    return cfg


def fingerprint(path: Path) -> str:
    """Identity of a checkpoint: config + every weight file's safetensors header and size.

    Cheap for multi-GB checkpoints (headers only), and changes whenever shapes, dtypes, names or
    byte sizes change. Weight values that change in place at equal size are caught by the
    header's offsets only when the tensor set changes; that is the documented trade-off.
    """
    h = hashlib.sha256()
    h.update(json.dumps(json.loads((path / "config.json").read_text()), sort_keys=True).encode())
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, 1 << 26)))
        h.update(str(f.stat().st_size).encode())
        # the first and last MiB of data catch retrained weights of identical shape
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, f.stat().st_size - (1 << 20)))
            h.update(fh.read())
    return "sha256:" + h.hexdigest()[:16]


def load(spec: str | os.PathLike, *, device: str = "cpu", dtype: torch.dtype | None = None,
         seed: int = 0) -> LoadedModel:
    """Load a LLaVA checkpoint directory or a built-in model, offline."""
    from safetensors import SafetensorError
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    path = resolve_model(spec)
    read_config(path)
    weights = sorted(path.glob("*.safetensors"))
    pickles = [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if not weights and pickles:
        raise VlmoptError(f"{path}: only pickle weights ({pickles[0].name}); vlmopt loads "
                          "safetensors only - convert the checkpoint first")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = LlavaConfig.from_pretrained(path, local_files_only=True)
    config._attn_implementation = "sdpa"
    if weights:
        if device == "meta":
            raise VlmoptError(f"{path}: device 'meta' is for config-only directories")
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a library logs; it draws no bars on the user's tty
        try:
            model = LlavaForConditionalGeneration.from_pretrained(
                path, config=config, local_files_only=True, use_safetensors=True,
                trust_remote_code=False, dtype=dtype or torch.float32)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise VlmoptError(f"{path}: cannot load weights: {str(e).splitlines()[0]}") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
    else:
        log.info("%s has no weights: building with %s", path,
                 "meta tensors" if device == "meta" else f"random weights (seed {seed})")
        torch.manual_seed(seed)
        with torch.device(device if device == "meta" else "cpu"):
            model = LlavaForConditionalGeneration(config)
        if dtype is not None:
            model = model.to(dtype)
    if device not in ("cpu", "meta"):
        model = model.to(device)
    model.eval()
    processor = None
    if (path / "processor_config.json").exists() or (path / "preprocessor_config.json").exists():
        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True,
                                                      trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise VlmoptError(f"{path}: cannot load processor: {str(e).splitlines()[0]}") from None
    return LoadedModel(model, processor, path, str(spec), fingerprint(path), bool(weights))
