"""LLaVA-NeXT / LLaVA-OneVision family adapter (AnyRes): ``LlavaNextForConditionalGeneration``
(model_type llava_next) and ``LlavaOnevisionForConditionalGeneration`` (llava_onevision),
transformers v5 layout, one image per prompt.

Quirks it owns:
- AnyRes: the processor picks a tile grid from ``image_grid_pinpoints`` by the image's size,
  so ``pixel_values`` is [B, n_tiles, 3, S, S] (a base tile of the whole image first; samples
  with fewer tiles are zero-padded) with ``image_sizes`` [B, 2]; the model reads the grid back
  from ``image_sizes``, stitches the tiles' features, cuts the padding away (unpadding), and
  OneVision's ``vision_aspect_ratio`` "anyres_max_N" shrinks a grid of more than ~N tiles
  bilinearly (vlmopt.preprocess_anyres has the whole rule, in numpy);
- the projector runs before the packing, so the ``vision`` node (tower + projector + packing,
  ``blocks.AnyResVision``) yields LLM embeddings and the ``project`` node is the identity;
- an ``image_newline`` embedding ends every row of the grid: it fills an ``<image>`` slot of
  ``input_ids`` but is no image feature. The vision node returns which rows are newlines and
  the capture's merge keeps them out of the visual mask (``vision_text_rows``), so they stay
  text: no selection or drop scores, keeps or removes them, and budgets count image features
  only;
- token budgets are global per image: a fraction of all the image's features (base tile and
  grid together), not per tile; the visual-token count follows the image size, so plans carry
  fractions, as on Qwen-VL;
- towers: NeXT's CLIP (its CLS dropped, "default" strategy), OneVision's SigLIP (no CLS,
  "full"). CLS-attention selections (VisionZip, VisPruner, VTC-CLS) and MMTok's pre-projector
  coverage are refused on them (``refused_select``); DivPrune, k-center and random work;
- export (batch 1): the tile selection and unpadding depend on ``image_sizes`` values, so the
  packing is fed as layout inputs computed in numpy (``anyres_index`` / ``anyres_weight``
  [N, 4]: the table rows each slot takes and their weights, ``anyres_visual`` [Nv]: the slots
  that hold image features); the ONNX graph has no data-dependent Python;
- one row of position ids (Llama / Mistral / Qwen2 decoders), causal attention.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from vlmopt.errors import VlmoptError
from vlmopt.frontend.family import Adapter, register_family
from vlmopt.ir import blocks

LAYOUT_INPUTS = ("anyres_index", "anyres_weight", "anyres_visual")
_CLS = ("ranks patches by [CLS] attention, which is not defined on AnyRes tiles yet (NeXT's "
        "CLS is dropped per tile, OneVision's SigLIP has none); divprune, kcenter or random "
        "select on this family")
REFUSED = {
    "visionzip": _CLS, "vispruner": _CLS, "vtc_cls": _CLS,
    "mmtok": ("its vision-coverage term needs one pre-projector feature per LLM token; "
              "AnyRes unpads, downsamples and adds newline rows after the projector"),
}


@register_family
class AnyResAdapter(Adapter):
    family = "llava_next"
    model_types = ("llava_next", "llava_onevision")
    architectures = ("LlavaNextForConditionalGeneration",
                     "LlavaOnevisionForConditionalGeneration")
    extra_inputs = ("image_sizes",)
    vision_text_rows = True
    refused_select = REFUSED

    @classmethod
    def hf_class_for(cls, model_type: str):
        import transformers

        return getattr(transformers, {"llava_next": "LlavaNextForConditionalGeneration",
                                      "llava_onevision": "LlavaOnevisionForConditionalGeneration"
                                      }[model_type])

    @classmethod
    def load_processor(cls, path, model):
        return load_anyres_processor(path, model.config.model_type)

    # -- cost and image geometry ------------------------------------------------------------
    @classmethod
    def layout_of(cls, config, height: int, width: int):
        """The AnyRes layout (vlmopt.preprocess_anyres.Layout) of one image, as the model's
        config packs it."""
        from vlmopt.preprocess_anyres import layout

        return layout(height, width, **layout_params(config))

    @classmethod
    def model_shapes(cls, config, *, bytes_per_el: int | None = None, grids=None):
        from vlmopt import cost
        from vlmopt.cost_vision import AnyResTower

        vc, tc = config.vision_config, config.text_config
        if config.vision_feature_select_strategy == "full" and \
                vc.model_type == "clip_vision_model":
            raise VlmoptError("vision_feature_select_strategy 'full' on a CLIP tower keeps the "
                              "CLS in every tile; AnyRes packing needs square tile grids")
        tower = AnyResTower.from_config(config)
        if grids is None:
            grids = cls.image_grids(None, config, *cls.reference_image_size(config))
        heads = tc.num_attention_heads
        qwen2 = tc.model_type == "qwen2"
        bias = bool(getattr(tc, "attention_bias", False))
        s = cost.ModelShapes(
            vision_hidden=vc.hidden_size, vision_intermediate=vc.intermediate_size,
            vision_layers=vc.num_hidden_layers, vision_heads=vc.num_attention_heads,
            image_size=0, patch_size=vc.patch_size, num_channels=vc.num_channels,
            n_vision_tokens=tower.side ** 2 + int(tower.has_cls), has_cls=tower.has_cls,
            n_feature_layers=tower.proj_in // vc.hidden_size, proj_in=tower.proj_in,
            projector_bias=tower.proj_bias,
            d=tc.hidden_size, m=tc.intermediate_size, n_layers=tc.num_hidden_layers,
            heads=heads, kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            vocab=tc.vocab_size, n_visual=0, qkv_bias=qwen2 or bias, o_bias=bias and not qwen2,
            mlp_bias=bool(getattr(tc, "mlp_bias", False)),
            tied_embeddings=bool(getattr(tc, "tie_word_embeddings", False)
                                 or getattr(config, "tie_word_embeddings", False)),
            bytes_per_el=(cost.decoder_bytes_per_el(config) if bytes_per_el is None
                          else bytes_per_el),
            tower=tower)
        return s.at_grids(grids)

    @classmethod
    def reference_image_size(cls, config) -> tuple[int, int]:
        """A square image of 2 x 2 tiles (672 px on NeXT, 768 px on OneVision)."""
        side = 2 * int(config.vision_config.image_size)
        return side, side

    @classmethod
    def image_grids(cls, path, config, height: int, width: int) -> list:
        """One (n_tiles, rows, cols) per image: the tiles the tower runs (base included) and
        the packed feature grid (after unpadding and downsampling), from the model's config
        (its ``image_grid_pinpoints`` decide the tiles the model reads back)."""
        lay = cls.layout_of(config, height, width)
        return [(lay.n_tiles, *lay.features)]

    # -- parts --------------------------------------------------------------------------------
    def vision_block(self) -> nn.Module:
        m = self.model.model
        cfg = self.config
        if cfg.vision_feature_select_strategy == "full" and self.vision_config.model_type \
                == "clip_vision_model":
            raise VlmoptError("vision_feature_select_strategy 'full' on a CLIP tower: not "
                              "supported (the CLS would enter every tile's grid)")
        if not isinstance(cfg.vision_feature_layer, int):
            raise VlmoptError("vision_feature_layer lists several layers; not supported yet")
        return blocks.AnyResVision(
            m.vision_tower, m.multi_modal_projector, m.image_newline, cfg,
            type(m).pack_image_features,
            functools.partial(type(self).layout_of, cfg),
            onevision=cfg.model_type == "llava_onevision")

    def project_block(self) -> nn.Module:
        return blocks.Identity()

    def vision_example(self) -> dict:
        """A reference input for shape checks: one S x 2S image (a 1 x 2 tile grid + the base
        tile)."""
        v = self.vision_config
        S = int(v.image_size)
        lay = self.layout_of(self.config, S, 2 * S)
        return {"kind": "anyres", "image": [S, 2 * S], "tiles": lay.n_tiles, "size": S,
                "channels": int(v.num_channels), "visual": lay.n_visual, "slots": lay.n_slots}

    def layout_spec(self) -> dict:
        """What the prefill graph's layout inputs are computed from (vlmopt.preprocess_anyres)."""
        return {"kind": "anyres", "model_type": self.config.model_type,
                "inputs": list(LAYOUT_INPUTS), **layout_params(self.config)}

    @classmethod
    def example_visual_tokens(cls, v: dict) -> int:
        return v["visual"]

    @classmethod
    def example_image_tokens(cls, v: dict) -> int:
        return v["slots"]

    @classmethod
    def example_inputs(cls, v, ids, amask, image_token_id, generator=None) -> dict:
        B, n, S = ids.shape[0], v["tiles"], v["size"]
        shape = (B, n, v["channels"], S, S)
        pix = torch.randn(*shape, generator=generator) if generator is not None else \
            torch.ones(shape)
        return {"pixel_values": pix, "image_sizes": torch.tensor([v["image"]] * B),
                "position_ids": (amask.cumsum(-1) - 1).clamp(min=0)}

    @classmethod
    def export_dims(cls, v: dict, prompt_len, unit: int | None) -> dict:
        tiles = torch.export.Dim("tiles", min=1, max=1 << 10)
        n = torch.export.Dim("image_tokens", min=2, max=1 << 18)
        nv = torch.export.Dim("image_features", min=2, max=1 << 18)
        return {"input_ids": {1: prompt_len}, "pixel_values": {1: tiles},
                "attention_mask": {1: prompt_len}, "position_ids": {1: prompt_len},
                "anyres_index": {0: n}, "anyres_weight": {0: n}, "anyres_visual": {0: nv}}

    @classmethod
    def layout_inputs(cls, spec: dict, batch: dict) -> dict:
        sizes = batch["image_sizes"]
        if sizes.shape[0] != 1:
            raise VlmoptError(f"AnyRes layout inputs are per image (batch 1); got "
                              f"{sizes.shape[0]} images")
        from vlmopt.preprocess_anyres import layout_feeds

        h, w = (int(x) for x in sizes[0].tolist())
        return {k: torch.from_numpy(a) for k, a in layout_feeds(spec, h, w).items()}


def layout_params(config) -> dict:
    """The config fields the AnyRes layout reads (vlmopt.preprocess_anyres.layout)."""
    from vlmopt.preprocess_anyres import max_patches_of

    vc = config.vision_config
    S = int(vc.image_size)
    return {"pinpoints": [list(map(int, p)) for p in config.image_grid_pinpoints], "tile": S,
            "side": S // int(vc.patch_size),
            "max_patches": max_patches_of(getattr(config, "vision_aspect_ratio", None))
            if config.model_type == "llava_onevision" else None}


class AnyResInputs:
    """The checkpoint's processor, marked for ``vlmopt.inputs``: visual-token counts follow
    the image and the chat template takes the image as a content part."""

    dynamic_resolution = True
    content_parts = True

    def __init__(self, processor):
        self._p = processor

    def __getattr__(self, name):
        return getattr(self._p, name)

    def __call__(self, *args, **kwargs):
        return self._p(*args, **kwargs)


def load_anyres_processor(path, model_type: str):
    """The processor of a LLaVA-NeXT / OneVision checkpoint directory (None without processor
    files), as an ``AnyResInputs``. Built from its parts - tokenizer, the Pillow image
    processor, processor_config.json's fields and the chat template - because transformers'
    LlavaOnevisionProcessor also loads a video processor, which needs torchvision, and
    AutoProcessor may pick the torchvision image processor; an image prompt uses neither."""
    import json
    from pathlib import Path

    path = Path(path)
    pfile = path / "processor_config.json"
    if not (pfile.exists() or (path / "preprocessor_config.json").exists()):
        return None
    if not ((path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()):
        return None  # a config-only directory may carry just the image processor's sizes
    import transformers as tf

    try:
        tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True,
                                               trust_remote_code=False)
        pcfg = json.loads(pfile.read_text()) if pfile.is_file() else {}
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        template = template or pcfg.get("chat_template")
        keep = {k: pcfg[k] for k in ("vision_feature_select_strategy", "image_token")
                if k in pcfg}
        if model_type == "llava_onevision":
            ip = tf.LlavaOnevisionImageProcessorPil.from_pretrained(path, local_files_only=True)
            extra = {k: pcfg[k] for k in ("num_image_tokens", "vision_aspect_ratio")
                     if k in pcfg}
            proc = _image_only_onevision()(image_processor=ip, tokenizer=tok,
                                           chat_template=template, **keep, **extra)
        else:
            ip = tf.LlavaNextImageProcessorPil.from_pretrained(path, local_files_only=True)
            extra = {k: pcfg[k] for k in ("patch_size", "num_additional_image_tokens")
                     if k in pcfg}
            proc = tf.LlavaNextProcessor(image_processor=ip, tokenizer=tok,
                                         chat_template=template, **keep, **extra)
        return AnyResInputs(proc)
    except (OSError, ValueError, TypeError, ImportError, json.JSONDecodeError) as e:
        raise VlmoptError(f"{path}: cannot load processor: {str(e).splitlines()[0]}") from None


@functools.cache
def _image_only_onevision():
    """transformers' LlavaOnevisionProcessor without its video processor attribute: the
    prompt expansion and image processing are its own; the video processor class, which
    ProcessorMixin checks for even when None is passed, needs torchvision."""
    from transformers import LlavaOnevisionProcessor

    class ImageOnlyOnevisionProcessor(LlavaOnevisionProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return ImageOnlyOnevisionProcessor
