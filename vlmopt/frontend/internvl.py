"""InternVL family adapter: ``InternVLForConditionalGeneration`` (InternVL 2.5 / 3 in
transformers v5 layout: InternViT with a CLS token, pixel shuffle by ``downsample_ratio``, a
LayerNorm + 2-layer MLP projector, a Qwen2/Llama-style decoder).

Quirks it owns:
- tiling: the image processor (GotOcr2's) picks a ``cols x rows`` grid of tiles of the tower's
  input size closest to the image's aspect ratio within ``min_patches .. max_patches``, resizes
  the image onto it and cuts it, plus a thumbnail of the whole image when there is more than
  one tile; every prompt's tiles are concatenated into one ``pixel_values`` [N_tiles, 3, S, S]
  (no padding tiles), so a sample's visual token count follows its image's aspect ratio;
- each tile gives ``image_seq_length`` = ((S / patch)^2) * ratio^2 LLM tokens (CLS dropped,
  pixel shuffle), in one ``<img>`` ... ``</img>`` run of ``<IMG_CONTEXT>`` tokens per image;
  the ``<img>`` / ``</img>`` markers stay text;
- the vision node yields LLM embeddings (the projector is applied inside it: ``project`` is the
  identity); one row of position ids, causal attention.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmopt.errors import VlmoptError
from vlmopt.frontend.family import Adapter, register_family
from vlmopt.frontend.idefics3 import TileInputs
from vlmopt.ir import blocks


def _side(v) -> int:
    v = v if isinstance(v, (int, float)) else v[0]
    return int(v)


@register_family
class InternVLAdapter(Adapter):
    family = "internvl"
    model_types = ("internvl",)
    # VisionZip ranks by received attention per pixel-shuffle group (vlmopt.ir.received_tiles);
    # not yet: the CLS-scored selections and MMTok (vlmopt compare skips them)
    refused_select = dict.fromkeys(
        ("vispruner", "vtc_cls", "mmtok", "vscan"),
        "its tower gives no per-LLM-token CLS attention or pre-projector feature yet (pixel "
        "shuffle merges patches)")
    architectures = ("InternVLForConditionalGeneration",)

    @classmethod
    def hf_class_for(cls, model_type: str):
        from transformers import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration

    @classmethod
    def load_processor(cls, path, model):
        return load_internvl_processor(path, cls(model).tokens_per_tile)

    # -- cost and image geometry ------------------------------------------------------------
    @classmethod
    def model_shapes(cls, config, *, bytes_per_el: int | None = None, grids=None):
        from vlmopt import cost
        from vlmopt.cost_vision import InternTower

        vc, tc = config.vision_config, config.text_config
        tower = InternTower.from_config(config)
        if grids is None:  # the reference image at the default tiling
            from vlmopt.preprocess_internvl import TilingConfig, tiles_for_size

            S = _side(vc.image_size)
            grids = [(tiles_for_size(*cls.reference_image_size(config),
                                     TilingConfig(tile=S)), tower.side, tower.side)]
        heads = tc.num_attention_heads
        s = cost.ModelShapes(
            vision_hidden=vc.hidden_size, vision_intermediate=vc.intermediate_size,
            vision_layers=vc.num_hidden_layers, vision_heads=vc.num_attention_heads,
            image_size=0, patch_size=_side(vc.patch_size), num_channels=vc.num_channels,
            n_vision_tokens=0, has_cls=True, n_feature_layers=1, proj_in=tower.proj_in,
            projector_bias=True, d=tc.hidden_size, m=tc.intermediate_size,
            n_layers=tc.num_hidden_layers, heads=heads,
            kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            vocab=tc.vocab_size, n_visual=0,
            qkv_bias=tc.model_type == "qwen2" or bool(getattr(tc, "attention_bias", False)),
            o_bias=tc.model_type != "qwen2" and bool(getattr(tc, "attention_bias", False)),
            mlp_bias=bool(getattr(tc, "mlp_bias", False)),
            tied_embeddings=bool(getattr(tc, "tie_word_embeddings", False)
                                 or getattr(config, "tie_word_embeddings", False)),
            bytes_per_el=(cost.decoder_bytes_per_el(config) if bytes_per_el is None
                          else bytes_per_el),
            tower=tower, qk_norm=tc.model_type == "qwen3")
        return s.at_grids(grids)

    @classmethod
    def reference_image_size(cls, config) -> tuple[int, int]:
        """A 2 x 2-tile square image (448 px tiles: 896 x 896)."""
        side = 2 * _side(config.vision_config.image_size)
        return side, side

    @classmethod
    def image_grids(cls, path, config, height: int, width: int) -> list:
        """One (n_tiles, S/p, S/p) per image: tiles of the tower's input size, thumbnail
        included."""
        from vlmopt.preprocess_internvl import image_config, tiles_for_size

        cfg = image_config(path, config)
        side = cfg.tile // _side(config.vision_config.patch_size)
        return [(tiles_for_size(height, width, cfg), side, side)]

    # -- parts --------------------------------------------------------------------------------
    @property
    def tokens_per_tile(self) -> int:
        vc = self.vision_config
        n = (_side(vc.image_size) // _side(vc.patch_size)) ** 2
        return int(n * self.config.downsample_ratio ** 2)

    def vision_block(self) -> nn.Module:
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise VlmoptError("vision_feature_layer lists several layers; not supported yet")
        return blocks.InternVision(self.model.model.vision_tower,
                                   self.model.model.multi_modal_projector, layer,
                                   self.config.vision_feature_select_strategy == "default",
                                   float(self.config.downsample_ratio))

    def project_block(self) -> nn.Module:
        return blocks.Identity()

    def vision_example(self) -> dict:
        """A reference input for shape checks: one image of 2 tiles."""
        v = self.vision_config
        return {"kind": "internvl", "tiles": 2, "size": _side(v.image_size),
                "channels": int(v.num_channels), "tokens_per_tile": self.tokens_per_tile}

    def layout_spec(self) -> dict:
        """No inputs beyond the common four; what the runtime needs to expand the prompt."""
        return {"kind": "internvl", "model_type": "internvl", "inputs": [],
                "tokens_per_tile": self.tokens_per_tile,
                "size": _side(self.vision_config.image_size)}

    @classmethod
    def example_visual_tokens(cls, v: dict) -> int:
        return v["tiles"] * v["tokens_per_tile"]

    @classmethod
    def example_inputs(cls, v, ids, amask, image_token_id, generator=None) -> dict:
        shape = (ids.shape[0] * v["tiles"], v["channels"], v["size"], v["size"])
        pix = torch.randn(*shape, generator=generator) if generator is not None else \
            torch.zeros(shape)
        return {"pixel_values": pix, "position_ids": (amask.cumsum(-1) - 1).clamp(min=0)}

    @classmethod
    def export_dims(cls, v: dict, prompt_len, unit: int | None) -> dict:
        tiles = torch.export.Dim("tiles", min=1, max=1 << 10)
        return {"input_ids": {1: prompt_len}, "pixel_values": {0: tiles},
                "attention_mask": {1: prompt_len}, "position_ids": {1: prompt_len}}


def load_internvl_processor(path, tokens_per_tile: int):
    """An InternVL checkpoint's processor (None without processor files), built image-only:
    transformers' ``InternVLProcessor`` with the checkpoint's tokenizer, GotOcr2's PIL image
    processor and chat template (``image_seq_length``: ``tokens_per_tile``, which the
    processor files may omit), without the video processor (it needs torchvision; the same
    construction as the Qwen-VL processors', vlmopt.frontend.qwen_processor)."""
    import json
    from pathlib import Path

    path = Path(path)
    pfile = path / "processor_config.json"
    if not (pfile.exists() or (path / "preprocessor_config.json").exists()):
        return None
    if not ((path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()):
        return None
    from transformers import AutoTokenizer, GotOcr2ImageProcessorPil

    from vlmopt.frontend.qwen_processor import image_only_class

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        ip = GotOcr2ImageProcessorPil.from_pretrained(path, local_files_only=True)
        pcfg = json.loads(pfile.read_text()) if pfile.is_file() else {}
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        n = int(pcfg.get("image_seq_length", tokens_per_tile))
        if n != tokens_per_tile:
            raise VlmoptError(f"{pfile}: image_seq_length {n} but the model makes "
                              f"{tokens_per_tile} tokens a tile")
        cls = image_only_class("InternVLProcessor")
        return TileInputs(cls(image_processor=ip, tokenizer=tok,
                              chat_template=template or pcfg.get("chat_template"),
                              image_seq_length=n))
    except (OSError, ValueError, ImportError, AttributeError, json.JSONDecodeError) as e:
        raise VlmoptError(f"{path}: cannot load processor: {str(e).splitlines()[0]}") from None
