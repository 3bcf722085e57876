"""Tiny LLaVA-OneVision / LLaVA-NeXT checkpoints (random weights, seeded) with real processor
files: a SigLIP tower (no CLS, strategy "full") + Qwen2 decoder for OneVision, a CLIP tower
(CLS dropped, strategy "default", feature layer -2) + Llama decoder for NeXT. Tiles of 32 px,
patches of 8 px: 16 features a tile."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TILE, PATCH = 32, 8
# up to 4 x 4 tiles: a 128 x 128 grid has 16 x 16 = 256 features, over anyres_max_9's 9 x 16
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [64, 96], [96, 64],
             [96, 96], [128, 128], [64, 128], [128, 64]]


def vocabulary() -> list[str]:
    from vlmopt.data import synthvqa

    words = [w for w in synthvqa.vocabulary() if w not in SPECIALS]
    return SPECIALS + ["<|im_start|>", "<|im_end|>", "user", "assistant"] + words


def make_tokenizer(vocab: list[str]):
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in SPECIALS + ["<|im_start|>", "<|im_end|>"]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_config(model_type: str = "llava_onevision", n_layers: int = 2):
    import transformers as tf

    vocab = vocabulary()
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               image_size=TILE, patch_size=PATCH)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False)
    common = dict(image_grid_pinpoints=PINPOINTS, image_token_index=vocab.index("<image>"),
                  tie_word_embeddings=False)
    if model_type == "llava_onevision":
        cfg = tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(**vis, vision_use_head=False),
            text_config=tf.Qwen2Config(**text),
            video_token_index=vocab.index("<video>"), vision_feature_select_strategy="full",
            vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9", **common)
    else:
        cfg = tf.LlavaNextConfig(
            vision_config=tf.CLIPVisionConfig(**vis, projection_dim=32),
            text_config=tf.LlamaConfig(**text), vision_feature_select_strategy="default",
            vision_feature_layer=-2, image_seq_length=(TILE // PATCH) ** 2, **common)
    return cfg, vocab


def build_model(model_type: str = "llava_onevision", seed: int = 0, n_layers: int = 2):
    from vlmopt.frontend.llava_next import AnyResAdapter

    cfg, _ = make_config(model_type, n_layers)
    torch.manual_seed(seed)
    return AnyResAdapter.hf_class_for(model_type)(cfg).eval()


def make_image_processor(model_type: str):
    import transformers as tf

    if model_type == "llava_onevision":
        return tf.LlavaOnevisionImageProcessorPil(
            size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    return tf.LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=PINPOINTS)


def processor_fields(model_type: str) -> dict:
    """What the checkpoint's processor_config.json says besides the image processor."""
    n = (TILE // PATCH) ** 2
    if model_type == "llava_onevision":
        return {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": n,
                "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9",
                "image_token": "<image>"}
    return {"processor_class": "LlavaNextProcessor", "patch_size": PATCH,
            "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
            "image_token": "<image>"}


def make_tiny_dir(path, model_type: str = "llava_onevision", weights: bool = True) -> Path:
    """A tiny checkpoint directory (safetensors + processor files, or config.json only).
    Written by hand rather than by the Processor classes: LlavaOnevisionProcessor needs a
    video processor (torchvision), which this environment does not have."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg, vocab = make_config(model_type)
    if not weights:
        cfg.save_pretrained(path)
        return path
    build_model(model_type).save_pretrained(path, safe_serialization=True)
    make_tokenizer(vocab).save_pretrained(path)
    make_image_processor(model_type).save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps(processor_fields(model_type),
                                                           indent=1))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path
