"""Definition of the built-in model ``builtin:synth-llava``: config, tokenizer and processor files.

The checkpoint is a plain Hugging Face ``LlavaForConditionalGeneration`` directory; this module only
*creates* it (for ``examples/train_synth_llava.py``). Loading it needs transformers alone.
"""

from __future__ import annotations

from pathlib import Path

from vlmopt.data import synthvqa

PATCH = 8
IMAGE_TOKEN = "<image>"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}USER:"
    "{%- if message['content'] is string -%}{{ ' ' + message['content'] }}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{ ' <image>\n' }}"
    "{%- elif c['type'] == 'text' -%}{{ ' ' + c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ ' ASSISTANT: ' + (message['content'] if message['content'] is string "
    "else message['content'][0]['text']) + '</s>' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)


def make_config(**text_overrides):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = SPECIALS + ["user", "assistant"] + [w for w in synthvqa.vocabulary()
                                                 if w not in ("user", "assistant")]
    vision = CLIPVisionConfig(
        hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
        image_size=synthvqa.IMAGE_SIZE, patch_size=PATCH, projection_dim=96,
        hidden_act="quick_gelu",
    )
    text = dict(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=352, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=2, eos_token_id=3,
        pad_token_id=0,
    )
    text.update(text_overrides)
    cfg = LlavaConfig(
        vision_config=vision, text_config=LlamaConfig(**text),
        image_token_index=SPECIALS.index(IMAGE_TOKEN), projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=(synthvqa.IMAGE_SIZE // PATCH) ** 2,
    )
    cfg.pad_token_id = 0
    return cfg, vocab


def make_processor(vocab: list[str]):
    """A real LlavaProcessor: word-level tokenizer + CLIP image processor + chat template."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left", model_max_length=512,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    size = synthvqa.IMAGE_SIZE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
    )


def save_skeleton(out: Path, model, processor) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
