"""Idefics3 / SmolVLM preprocessing for the ONNX runtime, without torch or transformers: the
image processor's resize and tiles (vlmopt.preprocess_idefics3), the chat template with the image
as a content part, and the image's prompt string (tile markers + image tokens). One prompt per
call: the graphs run at batch 1."""

from __future__ import annotations

import numpy as np

from vlmopt import preprocess_idefics3 as pi
from vlmopt.errors import VlmoptError
from vlmopt.runtime_pre import Preprocessor, image_parts, open_image


class TilePreprocessor(Preprocessor):
    def __init__(self, root, layout: dict):
        super().__init__(root)
        self.cfg = pi.image_config_of(self.image_cfg)
        self.tokens_per_tile = int(layout["tokens_per_tile"])
        if self.cfg.tile != int(layout["size"]):
            raise VlmoptError(f"{self.root}: the image processor's tile {self.cfg.tile} px is "
                              f"not the tower's {layout['size']} px")
        self.image_id = self.tokenizer.token_to_id(self.image_token)
        if self.image_id is None:
            raise VlmoptError(f"{self.root}: the tokenizer has no {self.image_token} token")

    def chat_text(self, prompt: str) -> str:
        if not self.chat_template:
            return prompt
        return self.render([{"role": "user", "content": image_parts(prompt)}])

    def encode(self, prompts: list[str], images: list) -> dict[str, np.ndarray]:
        if len(prompts) != 1 or len(images) != 1:
            raise VlmoptError("a dynamic-resolution artifact takes one prompt and image a call")
        prompt = prompts[0]
        if prompt.count(self.image_token) != 1:
            raise VlmoptError(f"prompt must contain {self.image_token} exactly once: {prompt!r}")
        tiles, mask, rows, cols = pi.pixels(open_image(images[0]), self.cfg)
        text = self.chat_text(prompt).replace(
            self.image_token, pi.image_prompt(rows, cols, self.tokens_per_tile), 1)
        ids = np.array([self.tokenizer.encode(text, add_special_tokens=True).ids],
                       dtype=np.int64)
        amask = np.ones_like(ids)
        return {"input_ids": ids, "attention_mask": amask,
                "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None],
                "pixel_values": tiles[None], "pixel_attention_mask": mask[None]}


class InternVLPreprocessor(Preprocessor):
    """InternVL preprocessing for the ONNX runtime (vlmopt.preprocess_internvl): the chat
    template renders the image part as the checkpoint's context token, which becomes
    ``<img>`` + one context token per visual token + ``</img>``."""

    def __init__(self, root, layout: dict):
        from vlmopt import preprocess_internvl as pv

        super().__init__(root)
        self.cfg = pv.image_config_of(self.image_cfg)
        self.tokens_per_tile = int(layout["tokens_per_tile"])
        if self.cfg.tile != int(layout["size"]):
            raise VlmoptError(f"{self.root}: the image processor's tile {self.cfg.tile} px is "
                              f"not the tower's {layout['size']} px")
        extra = self._json("tokenizer_config.json").get("extra_special_tokens") or {}
        self.marks = (extra.get("start_image_token", "<img>"),
                      extra.get("context_image_token", "<IMG_CONTEXT>"),
                      extra.get("end_image_token", "</img>"))
        for t in self.marks:
            if self.tokenizer.token_to_id(t) is None:
                raise VlmoptError(f"{self.root}: the tokenizer has no {t} token")

    def chat_text(self, prompt: str) -> str:
        if not self.chat_template:
            return prompt.replace("<image>", self.marks[1], 1)
        return self.render([{"role": "user", "content": image_parts(prompt)}])

    def encode(self, prompts: list[str], images: list) -> dict[str, np.ndarray]:
        from vlmopt import preprocess_internvl as pv

        if len(prompts) != 1 or len(images) != 1:
            raise VlmoptError("a dynamic-resolution artifact takes one prompt and image a call")
        if prompts[0].count("<image>") != 1:
            raise VlmoptError(f"prompt must contain <image> exactly once: {prompts[0]!r}")
        tiles = pv.pixels(open_image(images[0]), self.cfg)
        text = self.chat_text(prompts[0])
        if text.count(self.marks[1]) != 1:
            raise VlmoptError(f"{self.root}: the chat template does not render the image as "
                              f"one {self.marks[1]}")
        start, ctx, end = self.marks
        text = text.replace(ctx, pv.image_prompt(len(tiles), self.tokens_per_tile, start, ctx,
                                                 end), 1)
        ids = np.array([self.tokenizer.encode(text, add_special_tokens=True).ids],
                       dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None],
                "pixel_values": tiles}
