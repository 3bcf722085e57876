"""Family adapters: the one place that knows a VLM family's module names and quirks.

An adapter answers, for one loaded transformers model: which class builds it, where the vision
tower, projector, embedding, decoder layers, rotary embedding, final norm and LM head live, how
visual tokens are marked in ``input_ids``, which graph inputs the family needs beyond the
common four (``image_grid_thw`` for Qwen-VL), how position ids are built, and which block
modules the capture puts at the vision/project nodes. Everything after capture is
family-agnostic. A new family is one module with one ``@register_family`` class plus tests.

The loader picks the adapter from ``config.json`` (``model_type``); a family it does not know,
or one that looks like a supported one but is not (``llava_next_video`` is not
``llava_next``), is refused with one error line listing the supported families - never loaded
into the wrong class.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from vlmopt.errors import VlmoptError

FAMILIES: dict[str, type[Adapter]] = {}  # model_type -> adapter class
# model types people will try that vlmopt does not read yet (and what they are)
NOT_YET = {
    "llava_next_video": "LLaVA-NeXT-Video",
    "gemma3": "Gemma 3",
    "paligemma": "PaliGemma",
    "mllama": "Llama 3.2 Vision",
}


def adapter_of_graph(meta: dict) -> type[Adapter]:
    """The adapter class of a captured graph, from its ``gm.meta["vlmopt"]``."""
    return adapter_class({"model_type": meta["model_type"]}, "graph")


def register_family(cls: type[Adapter]) -> type[Adapter]:
    for t in cls.model_types:
        if t in FAMILIES:
            raise ValueError(f"model_type {t!r} registered twice")
        FAMILIES[t] = cls
    return cls


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def adapter_class(cfg: dict, where: str) -> type[Adapter]:
    """The adapter for a checkpoint's config.json dict; ``where`` names it in errors."""
    mtype = cfg.get("model_type")
    if mtype in FAMILIES:
        cls = FAMILIES[mtype]
        archs = cfg.get("architectures") or []
        if archs and not any(a in cls.architectures for a in archs):
            raise VlmoptError(f"{where}: architectures {archs} do not match model_type {mtype!r} "
                              f"(expected {', '.join(cls.architectures)})")
        return cls
    what = f" ({NOT_YET[mtype]}: not supported yet)" if mtype in NOT_YET else ""
    raise VlmoptError(f"{where}: unsupported model family (model_type {mtype!r}{what}; "
                      f"supported: {supported()})")


class Adapter:
    """Base adapter. Subclasses set the class attributes and the part locations."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    architectures: ClassVar[tuple[str, ...]]
    # graph inputs beyond input_ids, pixel_values, attention_mask, position_ids
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    position_rows: ClassVar[int] = 1  # 1: [B, T] position ids; 3: M-RoPE [3, B, T]
    # the vision block returns (features, text_rows [N] bool): rows that fill image-token
    # slots but are not image features (AnyRes newlines), which the merge keeps out of the
    # visual mask so no token pass scores, selects or drops them
    vision_text_rows: ClassVar[bool] = False
    # select_visual methods this family's tower cannot serve: {method: why}
    refused_select: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def hf_class_for(cls, model_type: str):
        """The transformers class that builds a checkpoint of this ``model_type``."""
        raise NotImplementedError

    @classmethod
    def load_processor(cls, path, model):
        """The checkpoint's own processor (tokenizer, image processor, chat template), or None
        for a config-only directory. Default: transformers' AutoProcessor."""
        from pathlib import Path

        from transformers import AutoProcessor

        path = Path(path)
        if not ((path / "processor_config.json").exists()
                or (path / "preprocessor_config.json").exists()):
            return None
        try:
            return AutoProcessor.from_pretrained(path, local_files_only=True,
                                                 trust_remote_code=False)
        except (OSError, ValueError, ImportError) as e:
            raise VlmoptError(f"{path}: cannot load processor: {str(e).splitlines()[0]}") from None

    # -- cost and image geometry (vlmopt.cost, vlmopt flops --image-size) -----------------
    @classmethod
    def model_shapes(cls, config, *, bytes_per_el: int | None = None, grids=None):
        """``vlmopt.cost.ModelShapes`` of a config of this family; ``grids``: one sample's
        (t, h, w) patch grids (dynamic resolution; None: ``reference_image_size``)."""
        raise NotImplementedError

    @classmethod
    def reference_image_size(cls, config) -> tuple[int, int]:
        """(height, width) costed when no image size is given."""
        raise NotImplementedError

    @classmethod
    def image_grids(cls, path, config, height: int, width: int) -> list:
        """The patch grids of one ``height`` x ``width`` image as the checkpoint's own image
        processor sizes it (dynamic-resolution families only)."""
        raise NotImplementedError(f"{cls.family}: fixed resolution, no image grids")

    # -- dynamic resolution: the reference input and the export (``vision_example`` dicts) ----
    @classmethod
    def example_visual_tokens(cls, v: dict) -> int:
        """LLM visual tokens of one image of the reference input ``v`` (``vision_example``)."""
        raise NotImplementedError(f"{cls.family}: fixed resolution, no reference input")

    @classmethod
    def example_image_tokens(cls, v: dict) -> int:
        """Image-token slots of one reference image: its visual tokens, plus the slots the
        vision node fills with rows that stay text (AnyRes newlines, ``vision_text_rows``)."""
        return cls.example_visual_tokens(v)

    @classmethod
    def example_inputs(cls, v: dict, ids: torch.Tensor, amask: torch.Tensor,
                       image_token_id: int, generator=None) -> dict:
        """The vision inputs and position ids of ``ids`` [B, T] (one reference image a row);
        ``generator``: random pixels from it, else ones (zeros may read as padding)."""
        raise NotImplementedError(f"{cls.family}: fixed resolution, no reference input")

    @classmethod
    def export_dims(cls, v: dict, prompt_len, unit: int | None) -> dict:
        """``torch.export`` dynamic shapes of the batch-1 prefill's inputs (prompt length
        ``prompt_len``; ``unit``: pixel rows per LLM visual token where the family has it)."""
        raise NotImplementedError(f"{cls.family}: fixed resolution, exported at any batch")

    @classmethod
    def layout_inputs(cls, spec: dict, batch: dict) -> dict:
        """The prefill graph's inputs beyond the common four, from an encoded batch."""
        return {k: batch[k] for k in spec.get("inputs", [])}

    # -- parts (every family has them; names differ) ---------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def vision_config(self):
        return self.model.config.vision_config

    @property
    def lm(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def embed(self) -> nn.Module:
        return self.lm.embed_tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.lm.layers

    @property
    def rotary(self) -> nn.Module:
        return self.lm.rotary_emb

    @property
    def norm(self) -> nn.Module:
        return self.lm.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    # -- what the capture needs -----------------------------------------------------------
    def vision_block(self) -> nn.Module:
        """The module at the graph's ``vision`` node."""
        raise NotImplementedError

    def project_block(self) -> nn.Module:
        """The module at the graph's ``project`` node: vision output -> LLM embeddings."""
        raise NotImplementedError

    def image_size(self) -> int | None:
        """The fixed square input size of the vision tower, None for dynamic resolution."""
        return None

    def fixed_n_visual(self) -> int | None:
        """Visual tokens per image when every image has the same count (LLaVA), else None."""
        return None

    @property
    def has_cls(self) -> bool:
        """The tower has a [CLS] token that is not an LLM token, so CLS attention can rank the
        visual tokens (VisionZip, VisPruner, VTC-CLS). False (SigLIP, Qwen-VL, a CLIP whose
        CLS the LLM reads): those methods rank by the attention tokens receive, or refuse."""
        return False

    def deepstack_layers(self) -> int:
        """Decoder layers that receive extra visual features after them (Qwen3-VL)."""
        return 0

    def default_positions(self, batch: dict) -> torch.Tensor:
        """Position ids when an encoded batch carries none: real tokens counted from 0."""
        amask = batch["attention_mask"]
        return (amask.cumsum(-1) - 1).clamp(min=0)

    # -- geometry (vlmopt.visualize draws the kept tokens on the image) -------------------
    def token_grid(self, batch: dict, b: int) -> tuple[int, int]:
        """(rows, cols) of sample ``b``'s visual tokens: its j-th visual token covers cell
        (j // cols, j % cols) of the image the model saw (``seen_image``)."""
        raise NotImplementedError(f"{self.family}: no token grid")

    def seen_image(self, batch: dict, b: int, processor) -> np.ndarray:
        """Sample ``b``'s image as the model saw it (after the processor's resize and crop),
        undone from the encoded ``pixel_values``: uint8 [H, W, 3]."""
        raise NotImplementedError(f"{self.family}: no image geometry")


def unnormalize(x: np.ndarray, processor) -> np.ndarray:
    """float pixels [H, W, C] normalized by ``processor``'s image processor -> uint8 [H, W, C]."""
    ip = processor.image_processor
    if getattr(ip, "do_normalize", True):
        x = x * np.asarray(ip.image_std, dtype=np.float32) + np.asarray(ip.image_mean,
                                                                       dtype=np.float32)
    scale = ip.rescale_factor if getattr(ip, "do_rescale", True) else 1.0
    return np.clip(np.rint(x / scale), 0, 255).astype(np.uint8)
