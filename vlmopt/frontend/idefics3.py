"""Idefics3 / SmolVLM family adapter: ``Idefics3ForConditionalGeneration`` and
``SmolVLMForConditionalGeneration`` (transformers v5 layout).

Quirks it owns:
- image splitting: the processor resizes an image, cuts it into tiles of the tower's square
  input size (``rows x cols``, from the aspect ratio) and adds the whole image resized to one
  tile (the "global" image), so ``pixel_values`` is [B, n_tiles, 3, S, S] with a
  ``pixel_attention_mask`` [B, n_tiles, S, S]; samples with fewer tiles are padded with
  all-zero tiles, which the model skips;
- the connector (pixel shuffle by ``scale_factor`` + one linear) lives after the SigLIP-like
  tower, so the ``vision`` node yields LLM embeddings and the ``project`` node is the identity;
- every tile gives ``image_seq_len`` = (S / patch / scale)^2 LLM tokens, so a sample's visual
  token count follows its image's aspect ratio (tiles), not a fixed number: budgets are
  fractions, as on Qwen-VL;
- the prompt marks each tile with text tokens (``<fake_token_around_image>``,
  ``<row_i_col_j>``, ``<global-img>``) around its run of ``<image>`` tokens: those stay text;
- one row of position ids (a Llama-style decoder), causal attention.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmopt.errors import VlmoptError
from vlmopt.frontend.family import Adapter, register_family
from vlmopt.ir import blocks


@register_family
class Idefics3Adapter(Adapter):
    family = "idefics3"
    model_types = ("idefics3", "smolvlm")
    # VisionZip ranks by received attention per pixel-shuffle group (vlmopt.ir.received_tiles);
    # not yet: the CLS-scored selections and MMTok (vlmopt compare skips them)
    refused_select = dict.fromkeys(
        ("vispruner", "vtc_cls", "mmtok", "vscan"),
        "its tower gives no per-LLM-token CLS attention or pre-projector feature yet (pixel "
        "shuffle merges patches)")
    architectures = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    extra_inputs = ("pixel_attention_mask",)

    @classmethod
    def hf_class_for(cls, model_type: str):
        import transformers

        return getattr(transformers, {"idefics3": "Idefics3ForConditionalGeneration",
                                      "smolvlm": "SmolVLMForConditionalGeneration"}[model_type])

    @classmethod
    def load_processor(cls, path, model):
        return load_tile_processor(path, model.config.model_type)

    # -- cost and image geometry ------------------------------------------------------------
    @classmethod
    def model_shapes(cls, config, *, bytes_per_el: int | None = None, grids=None):
        from vlmopt import cost
        from vlmopt.cost_vision import TileTower

        vc, tc = config.vision_config, config.text_config
        tower = TileTower.from_config(config)
        if grids is None:  # the reference image at transformers' default split
            from vlmopt.preprocess_idefics3 import TileImageConfig, tiles_for_size

            side = int(vc.image_size)
            cfg = TileImageConfig(longest_edge=4 * side, tile=side)
            grids = [(tiles_for_size(*cls.reference_image_size(config), cfg), tower.side,
                      tower.side)]
        heads = tc.num_attention_heads
        s = cost.ModelShapes(
            vision_hidden=vc.hidden_size, vision_intermediate=vc.intermediate_size,
            vision_layers=vc.num_hidden_layers, vision_heads=vc.num_attention_heads,
            image_size=0, patch_size=vc.patch_size, num_channels=vc.num_channels,
            n_vision_tokens=0, has_cls=False, n_feature_layers=1,
            proj_in=vc.hidden_size * config.scale_factor ** 2, projector_bias=False,
            d=tc.hidden_size, m=tc.intermediate_size, n_layers=tc.num_hidden_layers,
            heads=heads, kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            vocab=tc.vocab_size, n_visual=0,
            qkv_bias=bool(getattr(tc, "attention_bias", False)),
            o_bias=bool(getattr(tc, "attention_bias", False)),
            mlp_bias=bool(getattr(tc, "mlp_bias", False)),
            tied_embeddings=bool(getattr(tc, "tie_word_embeddings", False)
                                 or getattr(config, "tie_word_embeddings", False)),
            bytes_per_el=(cost.decoder_bytes_per_el(config) if bytes_per_el is None
                          else bytes_per_el),
            tower=tower)
        return s.at_grids(grids)

    @classmethod
    def reference_image_size(cls, config) -> tuple[int, int]:
        """A square image: 4 x 4 tiles + the global one at the processor's default split."""
        side = int(config.vision_config.image_size) * 4
        return side, side

    @classmethod
    def image_grids(cls, path, config, height: int, width: int) -> list:
        """One (n_tiles, S/p, S/p) per image: tiles of the tower's input size, global included."""
        from vlmopt.preprocess_idefics3 import image_config, tiles_for_size

        cfg = image_config(path, config)
        p = int(config.vision_config.patch_size)
        side = cfg.tile // p
        return [(tiles_for_size(height, width, cfg), side, side)]

    # -- parts --------------------------------------------------------------------------------
    @property
    def lm(self) -> nn.Module:
        return self.model.model.text_model

    @property
    def tokens_per_tile(self) -> int:
        return int(self.model.model.image_seq_len)

    def vision_block(self) -> nn.Module:
        return blocks.TileVision(self.model.model.vision_model, self.model.model.connector,
                                 int(self.vision_config.patch_size),
                                 keep_one=self.config.model_type == "smolvlm")

    def project_block(self) -> nn.Module:
        return blocks.Identity()

    def vision_example(self) -> dict:
        """A reference input for shape checks: one image of 2 tiles (a 1 x 2 split; the
        processor adds no global tile to a 1-tile split, so 2 is the smallest split), each
        ``tokens_per_tile`` LLM tokens."""
        v = self.vision_config
        return {"kind": "tiles", "tiles": 2, "size": int(v.image_size),
                "channels": int(v.num_channels), "tokens_per_tile": self.tokens_per_tile}

    def layout_spec(self) -> dict:
        """The prefill graph's inputs beyond the common four: the tiles' pixel mask."""
        return {"kind": "tiles", "model_type": self.config.model_type,
                "inputs": ["pixel_attention_mask"],
                "tokens_per_tile": self.tokens_per_tile, "size": int(self.vision_config.image_size)}

    @classmethod
    def example_visual_tokens(cls, v: dict) -> int:
        return v["tiles"] * v["tokens_per_tile"]

    @classmethod
    def example_inputs(cls, v, ids, amask, image_token_id, generator=None) -> dict:
        B, n, S = ids.shape[0], v["tiles"], v["size"]
        shape = (B, n, v["channels"], S, S)
        pix = torch.randn(*shape, generator=generator) if generator is not None else \
            torch.ones(shape)  # NOTE: all-zero tiles are the processor's padding
        return {"pixel_values": pix,
                "pixel_attention_mask": torch.ones(B, n, S, S, dtype=torch.long),
                "position_ids": (amask.cumsum(-1) - 1).clamp(min=0)}

    @classmethod
    def export_dims(cls, v: dict, prompt_len, unit: int | None) -> dict:
        tiles = torch.export.Dim("tiles", min=1, max=1 << 10)
        return {"input_ids": {1: prompt_len}, "pixel_values": {1: tiles},
                "pixel_attention_mask": {1: tiles}, "attention_mask": {1: prompt_len},
                "position_ids": {1: prompt_len}}

    def default_positions(self, batch: dict) -> torch.Tensor:
        amask = batch["attention_mask"]
        return (amask.cumsum(-1) - 1).clamp(min=0)


class TileInputs:
    """The checkpoint's processor, marked for ``vlmopt.inputs``: visual-token counts follow
    the image (tiles) and the chat template takes the image as a content part."""

    dynamic_resolution = True
    content_parts = True

    def __init__(self, processor):
        self._p = processor

    def __getattr__(self, name):
        return getattr(self._p, name)

    def __call__(self, *args, **kwargs):
        return self._p(*args, **kwargs)


def load_tile_processor(path, model_type: str):
    """The processor of an Idefics3 / SmolVLM checkpoint directory (None without processor
    files), as a ``TileInputs``. Idefics3: its own (AutoProcessor). SmolVLM: transformers'
    SmolVLMProcessor also builds a video processor (torchvision) and needs num2words, neither
    of which an image prompt uses, so its tokenizer, image processor, ``image_seq_len`` and
    chat template go into an ``Idefics3Processor``, whose image prompt is the same string."""
    import json
    from pathlib import Path

    path = Path(path)
    pfile = path / "processor_config.json"
    if not (pfile.exists() or (path / "preprocessor_config.json").exists()):
        return None
    if not ((path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()):
        return None  # a config-only directory may carry just the image processor's sizes
    if model_type != "smolvlm":
        return TileInputs(Adapter.load_processor(path, None))
    from transformers import AutoTokenizer, Idefics3Processor, SmolVLMImageProcessorPil

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        ip = SmolVLMImageProcessorPil.from_pretrained(path, local_files_only=True)
        pcfg = json.loads(pfile.read_text()) if pfile.is_file() else {}
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        kwargs = {"image_seq_len": int(pcfg["image_seq_len"])} if "image_seq_len" in pcfg else {}
        return TileInputs(Idefics3Processor(image_processor=ip, tokenizer=tok,
                                            chat_template=template or pcfg.get("chat_template"),
                                            **kwargs))
    except (OSError, ValueError, ImportError, json.JSONDecodeError) as e:
        raise VlmoptError(f"{path}: cannot load processor: {str(e).splitlines()[0]}") from None
