"""Qwen-VL family adapter: Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers v5 layout).

Quirks it owns:
- the vision tower (``model.model.visual``) takes flattened patches [N, C*tp*p*p] plus
  ``image_grid_thw`` [n_images, 3] and ends in the patch merger (2x2 patches -> one LLM token),
  so the ``project`` node is the identity: the merger *is* the projector, inside the tower;
- the number of visual tokens depends on the image size (dynamic resolution);
- M-RoPE: position ids are [3, B, T] (temporal, height, width rows) from the model's own
  ``get_rope_index``; text tokens carry equal rows, an image's tokens its grid coordinates;
- Qwen3-VL's deepstack: features of early ViT layers are added to the visual tokens' hidden
  states after the first decoder layers (the capture adds ``deepstack_i`` nodes for them).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vlmopt.frontend.family import Adapter, register_family, unnormalize
from vlmopt.ir import blocks

# reference image when none is given: 448 x 448 (the papers' and model cards' size)
REFERENCE_IMAGE_PX = 448


@register_family
class QwenVLAdapter(Adapter):
    family = "qwen_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                     "Qwen3VLForConditionalGeneration")
    extra_inputs = ("image_grid_thw",)
    position_rows = 3

    @classmethod
    def hf_class_for(cls, model_type: str):
        import transformers

        name = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                "qwen3_vl": "Qwen3VLForConditionalGeneration"}[model_type]
        return getattr(transformers, name)

    @classmethod
    def load_processor(cls, path, model):
        """Tokenizer + image processor + chat template from the checkpoint's files, without
        transformers' Qwen processor class (it needs torchvision for its video processor)."""
        from pathlib import Path

        path = Path(path)
        if not ((path / "preprocessor_config.json").exists()
                or (path / "processor_config.json").exists()):
            return None
        if not ((path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()):
            return None  # a config-only directory may carry just the image processor's sizes
        from vlmopt.frontend.qwen_processor import load_qwen_processor

        return QwenInputs(load_qwen_processor(path), cls(model))

    @classmethod
    def model_shapes(cls, config, *, bytes_per_el: int | None = None, grids=None):
        from vlmopt import cost
        from vlmopt.cost_vision import QwenTower

        vc, tc = config.vision_config, config.text_config
        heads = tc.num_attention_heads
        merge = vc.spatial_merge_size
        if grids is None:  # the reference image, rounded to whole merged cells
            side = max(1, round(REFERENCE_IMAGE_PX / (vc.patch_size * merge))) * merge
            grids = [(1, side, side)]
        qwen3 = config.model_type == "qwen3_vl"
        width = getattr(vc, "embed_dim", None) or vc.hidden_size  # Qwen2-VL: embed_dim
        bias = bool(getattr(tc, "attention_bias", False))
        s = cost.ModelShapes(
            vision_hidden=width, vision_intermediate=getattr(vc, "intermediate_size", 0) or 0,
            vision_layers=vc.depth, vision_heads=vc.num_heads, image_size=0,
            patch_size=vc.patch_size, num_channels=vc.in_channels, n_vision_tokens=0,
            has_cls=False, n_feature_layers=1, proj_in=width * merge ** 2,
            projector_bias=True, d=tc.hidden_size, m=tc.intermediate_size,
            n_layers=tc.num_hidden_layers, heads=heads,
            kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            vocab=tc.vocab_size, n_visual=0, qkv_bias=not qwen3 or bias, o_bias=qwen3 and bias,
            tied_embeddings=bool(getattr(tc, "tie_word_embeddings", False)
                                 or getattr(config, "tie_word_embeddings", False)),
            bytes_per_el=(cost.decoder_bytes_per_el(config) if bytes_per_el is None
                          else bytes_per_el),
            tower=QwenTower(vc), qk_norm=qwen3)
        return s.at_grids(grids)

    @classmethod
    def reference_image_size(cls, config) -> tuple[int, int]:
        return REFERENCE_IMAGE_PX, REFERENCE_IMAGE_PX

    @classmethod
    def image_grids(cls, path, config, height: int, width: int) -> list:
        return [image_grid(path, config.vision_config, height, width)]

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.visual

    @property
    def merge_size(self) -> int:
        return int(self.vision_config.spatial_merge_size)

    def vision_block(self) -> nn.Module:
        return blocks.QwenVision(self.vision_tower, self.deepstack_layers())

    def project_block(self) -> nn.Module:
        return blocks.Identity()

    def vision_example(self) -> dict:
        """A reference image for shape checks: 8 x 8 patches (16 LLM tokens at a 2x2 merge)."""
        v = self.vision_config
        return {"grid": [1, 4 * self.merge_size, 4 * self.merge_size], "merge": self.merge_size,
                "patch_dim": v.in_channels * v.temporal_patch_size * v.patch_size ** 2}

    @classmethod
    def example_visual_tokens(cls, v: dict) -> int:
        t, h, w = v["grid"]
        return t * h * w // v["merge"] ** 2

    @classmethod
    def example_inputs(cls, v, ids, amask, image_token_id, generator=None) -> dict:
        from vlmopt import qwen_layout

        B = ids.shape[0]
        t, h, w = v["grid"]
        shape = (B * t * h * w, v["patch_dim"])
        pix = torch.randn(*shape, generator=generator) if generator is not None else \
            torch.zeros(shape)
        grids = torch.tensor([v["grid"]] * B)
        pos = qwen_layout.mrope_positions(ids.numpy(), amask.numpy(), grids.numpy(),
                                          image_token_id, v["merge"])
        return {"pixel_values": pix, "image_grid_thw": grids,
                "position_ids": torch.from_numpy(pos)}

    @classmethod
    def export_dims(cls, v: dict, prompt_len, unit: int | None) -> dict:
        M = torch.export.Dim("visual_tokens", min=1, max=1 << 16)
        N = unit * M  # patches = merge^2 x the LLM's visual tokens
        return {"input_ids": {1: prompt_len}, "pixel_values": {0: N},
                "attention_mask": {1: prompt_len}, "position_ids": {2: prompt_len},
                "vision_pos": {0: N}, "frame_seg": {0: N}, "window_index": {0: M},
                "window_seg": {0: N}, "interp_idx": {0: N}, "interp_w": {0: N}}

    @classmethod
    def layout_inputs(cls, spec: dict, batch: dict) -> dict:
        from vlmopt.export_vision import layout_tensors

        return layout_tensors(spec, batch["image_grid_thw"])

    def layout_spec(self) -> dict:
        from vlmopt.export_vision import layout_spec

        return layout_spec(self.config)

    def deepstack_layers(self) -> int:
        return len(getattr(self.vision_config, "deepstack_visual_indexes", None) or [])

    def default_positions(self, batch: dict) -> torch.Tensor:
        """M-RoPE ids [3, B, T] with the model's own ``get_rope_index`` (needs the grids)."""
        ids, amask = batch["input_ids"], batch["attention_mask"]
        types = (ids == self.image_token_id).int()  # 0 text, 1 image
        pos, _ = self.model.model.get_rope_index(ids, image_grid_thw=batch["image_grid_thw"],
                                                 attention_mask=amask, mm_token_type_ids=types)
        return pos

    def token_grid(self, batch: dict, b: int) -> tuple[int, int]:
        """One image per sample: its merged grid (h/m, w/m), row-major, as M-RoPE numbers it."""
        t, h, w = (int(v) for v in batch["image_grid_thw"][b])
        return h // self.merge_size, w // self.merge_size

    def seen_image(self, batch: dict, b: int, processor) -> np.ndarray:
        """The resized image, from its patches: the processor lays them out m x m windows of
        (C, temporal, p, p) patches, row-major (vlmopt.preprocess_qwen); this undoes it."""
        grids = batch["image_grid_thw"]
        start = int(grids[:b].prod(-1).sum())
        t, gh, gw = (int(v) for v in grids[b])
        v, m = self.vision_config, self.merge_size
        p, tp, c = v.patch_size, v.temporal_patch_size, v.in_channels
        x = batch["pixel_values"][start:start + gh * gw].detach().float().numpy()
        x = x.reshape(gh // m, gw // m, m, m, c, tp, p, p)[:, :, :, :, :, 0]
        x = x.transpose(0, 2, 5, 1, 3, 6, 4).reshape(gh * p, gw * p, c)  # [H, W, C]
        return unnormalize(x, processor)


def image_grid(path, vision_config, height: int, width: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of a ``height`` x ``width`` image as the checkpoint's own image
    processor sizes it (its preprocessor_config.json; transformers' defaults without one)."""
    import json
    from pathlib import Path

    from vlmopt.preprocess_qwen import QwenImageConfig, grid_for_size, image_config

    for name in ("preprocessor_config.json", "processor_config.json"):
        f = Path(path) / name
        if f.is_file():
            cfg = image_config(json.loads(f.read_text()))
            break
    else:
        cfg = QwenImageConfig(patch_size=vision_config.patch_size,
                              merge_size=vision_config.spatial_merge_size)
    return grid_for_size(height, width, cfg)


class QwenInputs:
    """A Qwen processor whose batches also carry the M-RoPE position ids [3, B, T], computed by
    the model's own ``get_rope_index`` (they depend on the image grids, not on the text alone).
    Everything else is the wrapped processor's."""

    dynamic_resolution = True  # visual-token counts follow the image size
    content_parts = True  # the chat template takes the image as a content part

    def __init__(self, processor, adapter: QwenVLAdapter | None = None, *,
                 image_token_id: int | None = None, merge: int = 2):
        self._p, self._a = processor, adapter
        self._image_id, self._merge = image_token_id, merge

    def __getattr__(self, name):
        return getattr(self._p, name)

    def __call__(self, *args, **kwargs):
        enc = dict(self._p(*args, **kwargs))
        enc.pop("mm_token_type_ids", None)
        if self._a is not None:
            with torch.no_grad():
                enc["position_ids"] = self._a.default_positions(enc)
        else:  # no model at hand (an artifact): the same ids from vlmopt.qwen_layout
            from vlmopt.qwen_layout import mrope_positions

            enc["position_ids"] = torch.from_numpy(mrope_positions(
                enc["input_ids"].numpy(), enc["attention_mask"].numpy(),
                enc["image_grid_thw"].numpy(), self._image_id, self._merge))
        return enc
