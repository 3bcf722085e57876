"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL processors from a local checkpoint, without torchvision.

transformers' own processor classes do the work (placeholder expansion, tokenizing, padding,
``mm_token_type_ids``); only their construction is changed. Without torchvision
``AutoProcessor.from_pretrained`` fails: it always builds the video processor, whose classes need
torchvision, and even ``video_processor=None`` fails the constructor's class check (the base class
``VideoProcessorMixin`` cannot be resolved). So the processor is rebuilt image-only: a subclass
whose ``__init__`` has no ``video_processor`` (ProcessorMixin reads its sub-processors from that
signature), the PIL image processor ``Qwen2VLImageProcessorPil`` - always, so its numbers equal
``vlmopt.preprocess_qwen`` bit for bit whether or not torchvision is installed - and the
checkpoint's tokenizer and chat template. Local files only; never remote code or pickles.

    processor = load_qwen_processor("ckpt")
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(images=[image], text=[text], padding=True, return_tensors="pt")
    # input_ids, attention_mask, mm_token_type_ids [B, T]; pixel_values [sum N, C*tp*p*p];
    # image_grid_thw [n_images, 3]
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from vlmopt import preprocess_qwen
from vlmopt.errors import VlmoptError

log = logging.getLogger(__name__)

PROCESSOR_CLASSES = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor")
MODEL_TYPE_PROCESSOR = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                        "qwen3_vl": "Qwen3VLProcessor", "qwen3_vl_moe": "Qwen3VLProcessor"}


@functools.cache
def image_only_class(name: str) -> type:
    """transformers' processor class ``name`` without a video processor."""
    import transformers

    base = getattr(transformers, name)

    class ImageOnly(base):
        # NOTE: ProcessorMixin takes its sub-processors from this signature: no video_processor
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template,
                             **kwargs)

    # save_pretrained writes the class name as processor_class: keep transformers' name
    ImageOnly.__name__ = name
    ImageOnly.__qualname__ = f"image_only_class.<{name}>"
    return ImageOnly


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VlmoptError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise VlmoptError(f"{path}: expected a JSON object")
    return d


def processor_class_name(path: Path, proc: dict, pre: dict) -> str:
    """The Qwen processor class the checkpoint names (processor configs, tokenizer config, or
    the model type in config.json); Qwen2VLProcessor when it names none."""
    names = [proc.get("processor_class"), pre.get("processor_class"),
             _json(path / "tokenizer_config.json").get("processor_class")]
    model_type = _json(path / "config.json").get("model_type")
    names.append(MODEL_TYPE_PROCESSOR.get(model_type))
    name = next((n for n in names if n), None)
    if name is None:
        log.info("%s names no processor class: using Qwen2VLProcessor", path)
        return "Qwen2VLProcessor"
    if name not in PROCESSOR_CLASSES:
        raise VlmoptError(f"{path}: processor class {name} is not a Qwen-VL processor "
                          f"({', '.join(PROCESSOR_CLASSES)})")
    return name


def chat_template(path: Path, proc: dict, tokenizer) -> str | None:
    """The checkpoint's chat template, looked up where transformers' processors look."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    ct = _json(path / "chat_template.json").get("chat_template") or proc.get("chat_template")
    return ct or getattr(tokenizer, "chat_template", None)


def load_qwen_processor(path):
    """The checkpoint's Qwen-VL processor (a transformers ``ProcessorMixin``) for images and text.

    It has ``.tokenizer`` (padding side from the checkpoint), ``.chat_template``,
    ``.apply_chat_template``, ``.image_token``, ``.decode``/``.batch_decode``, and calling it
    returns input_ids/attention_mask/mm_token_type_ids [B, T] (1 on image pads, 0 elsewhere),
    pixel_values [sum N, C*tp*p*p] float32 and image_grid_thw [n_images, 3] int64.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    path = Path(path)
    if not path.is_dir():
        raise VlmoptError(f"{path}: no such checkpoint directory")
    proc = _json(path / "processor_config.json")
    pre = _json(path / "preprocessor_config.json")
    img = proc.get("image_processor") if isinstance(proc.get("image_processor"), dict) else pre
    if not img:
        raise VlmoptError(f"{path}: no image processor config "
                          "(processor_config.json or preprocessor_config.json)")
    preprocess_qwen.image_config(img)  # one-line errors for what transformers fails on later
    cls = image_only_class(processor_class_name(path, proc, pre))
    try:
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                  trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise VlmoptError(f"{path}: cannot load the Qwen-VL processor: "
                          f"{str(e).strip().splitlines()[0]}") from None
    processor = cls(image_processor=image_processor, tokenizer=tokenizer,
                    chat_template=chat_template(path, proc, tokenizer))
    if processor.image_token not in tokenizer.get_vocab():
        raise VlmoptError(f"{path}: the tokenizer has no {processor.image_token} token")
    return processor
