"""Tiny Idefics3 / SmolVLM checkpoints (random weights, seeded) with real processor files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<fake_token_around_image>",
            "<global-img>", "<end_of_utterance>"]
ROW_COL = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
TILE, PATCH, SCALE = 64, 8, 2  # tower input side, patch, pixel-shuffle scale: 16 tokens a tile


def vocabulary() -> list[str]:
    from vlmopt.data import synthvqa

    words = [w for w in synthvqa.vocabulary() if w not in SPECIALS]
    return SPECIALS + ROW_COL + ["<|im_start|>", "User", "Assistant", ":"] + words


def make_tokenizer(vocab: list[str]):
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in SPECIALS + ROW_COL + ["<|im_start|>"]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_config(model_type: str = "idefics3", n_layers: int = 2):
    import transformers as tf

    vocab = vocabulary()
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               image_size=TILE, patch_size=PATCH)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False)
    cls = tf.Idefics3Config if model_type == "idefics3" else tf.SmolVLMConfig
    cfg = cls(vision_config=vis, text_config=text, scale_factor=SCALE,
              image_token_id=vocab.index("<image>"), tie_word_embeddings=False)
    return cfg, vocab


def build_model(model_type: str = "idefics3", seed: int = 0, n_layers: int = 2):
    from vlmopt.frontend.idefics3 import Idefics3Adapter

    cfg, _ = make_config(model_type, n_layers)
    torch.manual_seed(seed)
    return Idefics3Adapter.hf_class_for(model_type)(cfg).eval()


def make_processor(vocab: list[str], longest_edge: int = 4 * TILE):
    import transformers as tf

    ip = tf.Idefics3ImageProcessorPil(size={"longest_edge": longest_edge},
                                      max_image_size={"longest_edge": TILE})
    return tf.Idefics3Processor(image_processor=ip, tokenizer=make_tokenizer(vocab),
                                image_seq_len=(TILE // PATCH // SCALE) ** 2,
                                chat_template=CHAT_TEMPLATE)


def make_tiny_dir(path, model_type: str = "idefics3", weights: bool = True) -> Path:
    """A tiny checkpoint directory (safetensors + processor files, or config.json only)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg, vocab = make_config(model_type)
    if not weights:
        cfg.save_pretrained(path)
        return path
    build_model(model_type).save_pretrained(path, safe_serialization=True)
    make_processor(vocab).save_pretrained(path)
    if model_type == "smolvlm":  # the files a SmolVLM checkpoint names its processor by
        for name in ("processor_config.json", "preprocessor_config.json"):
            f = path / name
            if f.is_file():
                d = json.loads(f.read_text())
                f.write_text(json.dumps(d).replace("Idefics3", "SmolVLM"))
    return path
