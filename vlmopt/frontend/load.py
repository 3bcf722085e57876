"""Load a VLM checkpoint offline (any family with an adapter, vlmopt.frontend.family):
safetensors only, no remote code, no network.

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
from vlmopt.frontend import idefics3 as _idefics3  # noqa: F401
from vlmopt.frontend import internvl as _internvl  # noqa: F401
from vlmopt.frontend import llava as _llava  # noqa: F401  (registers the family)
from vlmopt.frontend import llava_next as _llava_next  # noqa: F401
from vlmopt.frontend import qwen_vl as _qwen_vl  # noqa: F401
from vlmopt.frontend.builtins import BUILTIN_DIR, BUILTIN_MODELS  # noqa: F401
from vlmopt.frontend.family import Adapter, adapter_class

log = logging.getLogger(__name__)


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The family adapter of a loaded transformers model."""
    return adapter_class(model.config.to_dict(), type(model).__name__)(model)


def model_shapes(config, *, bytes_per_el: int | None = None, grids=None):
    """``vlmopt.cost.ModelShapes`` of a transformers config, built by its family's adapter."""
    cls = adapter_class({"model_type": config.model_type}, "config")
    return cls.model_shapes(config, bytes_per_el=bytes_per_el, grids=grids)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object | None  # transformers processor, None for a config-only directory
    path: Path
    name: str
    fingerprint: str
    has_weights: bool

    @property
    def adapter(self) -> Adapter:
        return adapter_for(self.model)

    @property
    def config(self):
        return self.model.config

    def shapes(self, grids=None):
        """The cost model's shapes of this checkpoint (one sample's image grids, if given)."""
        return type(self.adapter).model_shapes(self.config, grids=grids)


def resolve_model(spec: str | os.PathLike) -> Path:
    spec = str(spec)
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_MODELS:
            raise VlmoptError(f"unknown model {spec!r}; built-in models: "
                              + ", ".join(BUILTIN_MODELS))
        path = BUILTIN_MODELS[spec]
        if not (path / "config.json").exists():
            raise VlmoptError(f"{spec}: checkpoint missing at {path} "
                              f"(train it with examples/train_synth.py --family "
                              f"{spec.rsplit('-', 1)[-1]})")
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
    except UnicodeDecodeError:
        raise VlmoptError(f"{cfg_file}: not UTF-8 text") from None
    if not isinstance(cfg, dict):
        raise VlmoptError(f"{cfg_file}: not a config object (a JSON {type(cfg).__name__})")
    if "model_type" not in cfg:
        raise VlmoptError(f"{cfg_file}: no 'model_type' field; not a Hugging Face model config")
    if not isinstance(cfg["model_type"], str):
        raise VlmoptError(f"{cfg_file}: field 'model_type' must be a string, got "
                          f"{type(cfg['model_type']).__name__}")
    archs = cfg.get("architectures")
    if archs is not None and not (isinstance(archs, list)
                                  and all(isinstance(a, str) for a in archs)):
        raise VlmoptError(f"{cfg_file}: field 'architectures' must be a list of class names")
    for sub in ("text_config", "vision_config"):
        if cfg.get(sub) is not None and not isinstance(cfg[sub], dict):
            raise VlmoptError(f"{cfg_file}: field '{sub}' must be an object, got "
                              f"{type(cfg[sub]).__name__}")
    if cfg.get("auto_map"):
        raise VlmoptError(f"{cfg_file}: needs remote code (auto_map); vlmopt never runs it")
    adapter_class(cfg, str(path))  # refuses unknown and not-yet-supported families
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
    """Load a checkpoint directory of a supported family, or a built-in model, offline."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError
    from transformers import AutoConfig

    path = resolve_model(spec)
    cfg_dict = read_config(path)
    family = adapter_class(cfg_dict, str(path))
    hf_class = family.hf_class_for(cfg_dict["model_type"])
    weights = sorted(path.glob("*.safetensors"))
    pickles = [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if not weights and pickles:
        raise VlmoptError(f"{path}: only pickle weights ({pickles[0].name}); vlmopt loads "
                          "safetensors only - convert the checkpoint first")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, StrictDataclassError) as e:
        raise VlmoptError(f"{path / 'config.json'}: not a valid {cfg_dict['model_type']} config "
                          f"({str(e).splitlines()[0]})") from None
    config._attn_implementation = "sdpa"
    if weights:
        if device == "meta":
            raise VlmoptError(f"{path}: device 'meta' is for config-only directories")
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a library logs; it draws no bars on the user's tty
        try:
            model = hf_class.from_pretrained(
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
            model = hf_class(config)
        if dtype is not None:
            model = model.to(dtype)
    if device not in ("cpu", "meta"):
        model = model.to(device)
    model.eval()
    processor = family.load_processor(path, model)
    return LoadedModel(model, processor, path, str(spec), fingerprint(path), bool(weights))
