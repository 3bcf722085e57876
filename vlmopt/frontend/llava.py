"""LLaVA family adapter: ``LlavaForConditionalGeneration`` (CLIP/SigLIP tower, MLP projector,
Llama/Mistral/Qwen2-style decoder), transformers v5 layout. A SigLIP tower has no [CLS]
(strategy "full"): ``has_cls`` is False and CLS-ranked selections take their CLS-free variant.

Every image gives the same number of visual tokens (``image_seq_length``), one row of position
ids, and the image's tokens stand in one contiguous run of ``image_token_id`` in ``input_ids``.
"""

from __future__ import annotations

import math

import numpy as np
from torch import nn

from vlmopt.errors import VlmoptError
from vlmopt.frontend.family import Adapter, register_family, unnormalize
from vlmopt.ir import blocks


@register_family
class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)
    architectures = ("LlavaForConditionalGeneration",)

    @classmethod
    def hf_class_for(cls, model_type: str):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    @classmethod
    def model_shapes(cls, config, *, bytes_per_el: int | None = None, grids=None):
        from vlmopt.cost import ModelShapes

        if grids:
            raise ValueError("a fixed-resolution model has no image grids")
        return ModelShapes.from_llava_config(config, bytes_per_el=bytes_per_el)

    @classmethod
    def reference_image_size(cls, config) -> tuple[int, int]:
        return (int(config.vision_config.image_size),) * 2

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def feature_layer(self) -> int:
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise VlmoptError("vision_feature_layer lists several layers; not supported yet")
        return layer

    @property
    def drops_cls(self) -> bool:
        return self.model.config.vision_feature_select_strategy == "default"

    @property
    def has_cls(self) -> bool:
        from vlmopt.ir.select import has_cls

        return self.drops_cls and has_cls(self.vision_tower)

    def vision_block(self) -> nn.Module:
        return blocks.Vision(self.vision_tower, self.feature_layer, self.drops_cls)

    def project_block(self) -> nn.Module:
        return blocks.Project(self.projector)

    def image_size(self) -> int:
        return int(self.vision_config.image_size)

    def fixed_n_visual(self) -> int:
        return int(self.model.config.image_seq_length)

    def token_grid(self, batch: dict, b: int) -> tuple[int, int]:
        """The tower's square patch grid, row-major (CLS, if any, is not an LLM token)."""
        n = self.fixed_n_visual()
        side = math.isqrt(n)
        if side * side != n:
            raise VlmoptError(f"image_seq_length {n} is not a square patch grid")
        return side, side

    def seen_image(self, batch: dict, b: int, processor) -> np.ndarray:
        x = batch["pixel_values"][b].detach().float().permute(1, 2, 0).numpy()  # [H, W, C]
        return unnormalize(x, processor)
