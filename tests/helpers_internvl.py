"""A tiny InternVL checkpoint (random weights, seeded) with real processor files."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<img>", "</img>", "<IMG_CONTEXT>",
            "<video>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TILE, PATCH = 64, 8  # 8 x 8 patches, pixel shuffle 0.5: 16 tokens a tile


def vocabulary() -> list[str]:
    from vlmopt.data import synthvqa

    return SPECIALS + ["user", "assistant"] + [w for w in synthvqa.vocabulary()
                                                if w not in SPECIALS]


def make_tokenizer(vocab: list[str]):
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens={"start_image_token": "<img>",
                                                 "end_image_token": "</img>",
                                                 "context_image_token": "<IMG_CONTEXT>",
                                                 "video_token": "<video>"})


def make_config(n_layers: int = 2):
    import transformers as tf

    vocab = vocabulary()
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               image_size=[TILE, TILE], patch_size=[PATCH, PATCH], use_mean_pooling=True)
    text = dict(model_type="qwen2", vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                eos_token_id=vocab.index("<|im_end|>"), tie_word_embeddings=False)
    cfg = tf.InternVLConfig(vision_config=vis, text_config=text, downsample_ratio=0.5,
                            image_token_id=vocab.index("<IMG_CONTEXT>"), image_seq_length=16)
    return cfg, vocab


def build_model(seed: int = 0):
    from transformers import InternVLForConditionalGeneration

    cfg, _ = make_config()
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration(cfg).eval()


def make_processor(vocab: list[str], max_patches: int = 6):
    import transformers as tf

    ip = tf.GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True,
                                     min_patches=1, max_patches=max_patches)
    from vlmopt.frontend.qwen_processor import image_only_class

    return image_only_class("InternVLProcessor")(
        image_processor=ip, tokenizer=make_tokenizer(vocab), image_seq_length=16,
        chat_template=CHAT_TEMPLATE)


def make_tiny_dir(path, weights: bool = True) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg, vocab = make_config()
    if not weights:
        cfg.save_pretrained(path)
        return path
    build_model().save_pretrained(path, safe_serialization=True)
    make_processor(vocab).save_pretrained(path)
    return path
