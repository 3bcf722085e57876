"""LLaVA-NeXT / LLaVA-OneVision (AnyRes) preprocessing for the ONNX runtime, without torch or
transformers: the image processor's tiles (vlmopt.preprocess_anyres), the chat template with
the image as a content part, the image token expanded to the image's slot count (features +
newlines) and the packing's layout inputs. One prompt per call: the graphs run at batch 1."""

from __future__ import annotations

import numpy as np

from vlmopt import preprocess_anyres as pa
from vlmopt.errors import VlmoptError
from vlmopt.runtime_pre import Preprocessor, image_parts, open_image


class AnyResPreprocessor(Preprocessor):
    def __init__(self, root, layout: dict):
        super().__init__(root)
        self.cfg = pa.image_config_of(self.image_cfg)
        self.layout = layout
        if self.cfg.tile != int(layout["tile"]):
            raise VlmoptError(f"{self.root}: the image processor's tile {self.cfg.tile} px is "
                              f"not the tower's {layout['tile']} px")
        if self.tokenizer.token_to_id(self.image_token) is None:
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
        image = open_image(images[0])
        tiles = pa.pixels(image, self.cfg)
        w, h = image.size
        feeds = pa.layout_feeds(self.layout, h, w)
        n_tiles = int(feeds["anyres_index"].max()) // (int(self.layout["side"]) ** 2)
        if n_tiles != len(tiles):
            raise VlmoptError(f"{self.root}: the image processor cut {len(tiles)} tiles from a "
                              f"{w}x{h} image, the model's pinpoints read {n_tiles}")
        n_slots = len(feeds["anyres_index"])
        text = self.chat_text(prompt).replace(self.image_token, self.image_token * n_slots, 1)
        ids = np.array([self.tokenizer.encode(text, add_special_tokens=True).ids],
                       dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None],
                "pixel_values": tiles[None], **feeds}
