"""Definition of the built-in model ``builtin:synth-qwen``: config, tokenizer and processor files.

The checkpoint is a plain Hugging Face ``Qwen2_5_VLForConditionalGeneration`` directory (dynamic
resolution: the number of visual tokens follows the image size); this module only *creates* it
(for ``examples/train_synth.py --family qwen``). Loading it needs transformers alone.

The processor files are written with the tokenizers library and json, not with transformers'
``Qwen2_5_VLProcessor``: that class also builds a video processor, which needs torchvision.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmopt.data import synthvqa

PATCH = 4  # ViT patch (px)
MERGE = 2  # 2x2 patches -> one LLM token
TOKEN_PX = PATCH * MERGE  # one LLM token covers 8x8 px: 196 tokens at 112x112, like synth-llava
TEMPORAL = 2
WINDOW = 56  # px: a 112-px image is exactly 2x2 attention windows (7x7 tokens each)
# smart_resize keeps an image's own size (rounded to multiples of 8) between these areas:
# 80x80 .. 160x160 px (64 .. 400 visual tokens); larger or smaller images are rescaled
MIN_PIXELS, MAX_PIXELS = 80 * 80, 160 * 160

PAD, UNK = "<|endoftext|>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
SPECIALS = [PAD, UNK, IM_START, IM_END, VISION_START, VISION_END, IMAGE_TOKEN, VIDEO_TOKEN]
IMAGE = VISION_START + IMAGE_TOKEN + VISION_END

# Qwen2.5-VL's template without the default system turn (its words are not in the vocabulary).
# A string content may hold vlmopt's ``<image>`` placeholder (the dataset format), which becomes
# the vision span in place; list content is rendered in its own order.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | replace('<image>', '" + IMAGE + "') }}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' or 'image' in c -%}{{ '" + IMAGE + "' }}"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def vocabulary() -> list[str]:
    """Special tokens first (ids 0-7), then the chat roles and SynthVQA's words."""
    return SPECIALS + ["user", "assistant"] + [w for w in synthvqa.vocabulary()
                                                 if w not in ("user", "assistant")]


def make_config(**text_overrides):
    """(Qwen2_5_VLConfig, vocabulary): a 4-block windowed ViT (patch 4, last block global) with
    the 2x2 merger, and an 8-layer GQA decoder (hidden 128, 4 heads, 2 KV heads) with M-RoPE."""
    from transformers import Qwen2_5_VLConfig

    vocab = vocabulary()
    ids = {t: vocab.index(t) for t in SPECIALS}
    vision = dict(
        depth=4, hidden_size=96, intermediate_size=256, num_heads=4, in_channels=3,
        patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
        window_size=WINDOW, fullatt_block_indexes=[3], out_hidden_size=128, hidden_act="silu",
        tokens_per_second=2,
    )
    text = dict(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=352, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False,
        # head_dim 32: mrope_section (temporal, height, width) sums to head_dim / 2
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": [4, 6, 6]},
        bos_token_id=None, eos_token_id=ids[IM_END], pad_token_id=ids[PAD],
    )
    text.update(text_overrides)
    cfg = Qwen2_5_VLConfig(
        vision_config=vision, text_config=text, image_token_id=ids[IMAGE_TOKEN],
        video_token_id=ids[VIDEO_TOKEN], vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END], tie_word_embeddings=False,
    )
    cfg.pad_token_id = ids[PAD]
    cfg.eos_token_id = ids[IM_END]
    return cfg, vocab


def image_processor_config() -> dict:
    """``preprocessor_config.json`` in Qwen2VLImageProcessor's format."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_convert_rgb": True, "do_resize": True, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "patch_size": PATCH, "temporal_patch_size": TEMPORAL, "merge_size": MERGE,
    }


def make_tokenizer(vocab: list[str]):
    """A word-level ``tokenizers.Tokenizer``: lowercase, split on whitespace and punctuation; the
    special tokens are matched first, so ``<|image_pad|>`` repeats need no spaces."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "backend": "tokenizers",
        "eos_token": IM_END, "pad_token": PAD, "unk_token": UNK, "bos_token": None,
        "padding_side": "left", "model_max_length": 512, "split_special_tokens": False,
        "extra_special_tokens": {"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN,
                                 "vision_bos_token": VISION_START,
                                 "vision_eos_token": VISION_END},
        "processor_class": "Qwen2_5_VLProcessor",
    }


def save_processor(out: Path, vocab: list[str]) -> None:
    """Write tokenizer.json, tokenizer_config.json, chat_template.jinja and
    preprocessor_config.json into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(vocab).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "preprocessor_config.json").write_text(
        json.dumps(image_processor_config(), indent=2) + "\n")


def prompt_text(prompt: str) -> str:
    """The chat-templated text of a SynthVQA prompt (the same string the template renders)."""
    return (f"{IM_START}user\n" + prompt.replace("<image>", IMAGE) + f"{IM_END}\n"
            f"{IM_START}assistant\n")
