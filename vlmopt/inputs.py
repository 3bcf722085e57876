"""Turn dataset records into model inputs with the checkpoint's own processor and chat template."""

from __future__ import annotations

import torch
from PIL import Image

from vlmopt.errors import VlmoptError


def chat_text(processor, prompt: str) -> str:
    """The prompt wrapped in the checkpoint's chat template (unchanged if it has none)."""
    if getattr(processor, "chat_template", None):
        content = prompt
        # Qwen-VL, Idefics3 / SmolVLM: the image is a content part of the message
        if getattr(processor, "content_parts", False):
            from vlmopt.runtime import image_parts

            content = image_parts(prompt)
        return processor.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True, tokenize=False)
    return prompt


def encode(processor, prompts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """Batch with left padding; position ids count real tokens only, so padding never shifts them.

    Returns input_ids/attention_mask/position_ids [B, T] and pixel_values [B, 3, H, W]; for
    families with dynamic resolution the processor's own layout (Qwen-VL: patches [N, C*tp*p*p],
    ``image_grid_thw`` [n_images, 3], M-RoPE position ids [3, B, T] from the model; Idefics3 /
    SmolVLM: tiles [B, n_tiles, 3, S, S] and ``pixel_attention_mask`` [B, n_tiles, S, S];
    LLaVA-NeXT / OneVision: tiles [B, n_tiles, 3, S, S] and ``image_sizes`` [B, 2]).
    """
    if processor is None:
        raise VlmoptError("this checkpoint has no processor files; cannot encode prompts")
    processor.tokenizer.padding_side = "left"
    texts = [chat_text(processor, p) for p in prompts]
    enc = processor(images=images, text=texts, padding=True, return_tensors="pt")
    mask = enc["attention_mask"]
    pos = enc.get("position_ids")
    out = {
        "input_ids": enc["input_ids"],
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0) if pos is None else pos,
        "pixel_values": enc["pixel_values"].float(),
    }
    # family inputs (Qwen-VL, Idefics3, LLaVA-NeXT / OneVision)
    for k in ("image_grid_thw", "pixel_attention_mask", "image_sizes"):
        if k in enc:
            out[k] = enc[k]
    return out


def blank_like(image: Image.Image) -> Image.Image:
    """A flat mid-grey image of the same size: the input that carries no visual information."""
    return Image.new("RGB", image.size, (128, 128, 128))
