"""The artifact's preprocessing base, without torch or transformers: images opened safely, the
chat template rendered as transformers renders it, ``tokenizers`` from tokenizer.json, and
LLaVA's image processing (``Preprocessor``). The family preprocessors (``runtime.QwenPreprocessor``,
``runtime_tiles``, ``runtime_anyres``) build on it; ``runtime.preprocessor`` picks one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlmopt.errors import VlmoptError


def open_image(image, what: str | None = None):
    """A PIL image, or the file at a path opened and decoded as one (one error line naming
    ``what``, e.g. "--image x.png", or the path, if it is not). Images over Pillow's warning
    threshold (~89 Mpixels) are decoded, to be resized; twice over it they are refused as a
    decompression bomb."""
    import warnings

    from PIL import Image

    if isinstance(image, (str, Path)):
        what = what or str(image)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(image)
            im.load()
            return im
        except FileNotFoundError:
            raise VlmoptError(f"{what}: no such file") from None
        except Image.DecompressionBombError as e:
            raise VlmoptError(f"{what}: refused as a decompression bomb ({e})") from None
        except (OSError, ValueError) as e:
            raise VlmoptError(f"{what}: not an image ({e})") from None
    return image


def _token_str(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


class Preprocessor:
    """The checkpoint's LLaVA processor without transformers: CLIP-style image processing per
    the processor config, the chat template rendered with jinja2, `tokenizers` from
    tokenizer.json, and the image token expanded to the model's visual token count."""

    def __init__(self, root):
        from tokenizers import Tokenizer

        self.root = Path(root)
        if not (self.root / "tokenizer.json").is_file():
            raise VlmoptError(f"{self.root}: no tokenizer.json; the artifact has no processor "
                              "files (vlmopt run needs them)")
        try:
            self.tokenizer = Tokenizer.from_file(str(self.root / "tokenizer.json"))
        except Exception as e:  # tokenizers raises plain Exception on a malformed file
            raise VlmoptError(f"{self.root / 'tokenizer.json'}: cannot load the tokenizer "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                              ) from None
        proc = self._json("processor_config.json")
        img = proc.get("image_processor") or self._json("preprocessor_config.json")
        if not img:
            raise VlmoptError(f"{self.root}: no image processor config "
                              "(processor_config.json or preprocessor_config.json)")
        self.image_cfg = img
        tcfg = self._json("tokenizer_config.json")
        self.special = {k: _token_str(tcfg.get(k)) for k in
                        ("bos_token", "eos_token", "pad_token", "unk_token")
                        if tcfg.get(k) is not None}
        self.image_token = proc.get("image_token") or tcfg.get("image_token") or "<image>"
        self.patch_size = int(proc.get("patch_size") or 14)
        self.n_extra = int(proc.get("num_additional_image_tokens", 0))
        self.strategy = proc.get("vision_feature_select_strategy", "default")
        self.chat_template = self._chat_template(proc, tcfg)
        pad = self.special.get("pad_token")
        self.pad_id = self.tokenizer.token_to_id(pad) if pad else 0
        if self.pad_id is None:
            self.pad_id = 0

    def _json(self, name: str) -> dict:
        f = self.root / name
        if not f.is_file():
            return {}
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VlmoptError(f"{f}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise VlmoptError(f"{f}: expected a JSON object")
        return obj

    def _chat_template(self, proc: dict, tcfg: dict) -> str | None:
        if (self.root / "chat_template.jinja").is_file():
            return (self.root / "chat_template.jinja").read_text()
        ct = self._json("chat_template.json").get("chat_template")
        return ct or proc.get("chat_template") or tcfg.get("chat_template")

    # -- text
    def chat_text(self, prompt: str) -> str:
        if not self.chat_template:
            return prompt
        return self.render([{"role": "user", "content": prompt}])

    def render(self, messages: list[dict]) -> str:
        """The chat template rendered as transformers renders it."""
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        # NOTE: the environment transformers renders chat templates in
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, \
            sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                        separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True, **self.special)

    def n_image_tokens(self, height: int, width: int) -> int:
        n = (height // self.patch_size) * (width // self.patch_size) + self.n_extra
        return n - 1 if self.strategy == "default" else n

    # -- image
    def pixels(self, image) -> np.ndarray:
        """One image -> [3, H, W] float32, as CLIPImageProcessor (PIL backend) computes it."""
        from PIL import Image

        image = open_image(image)
        if not isinstance(image, Image.Image):
            raise VlmoptError(f"expected a PIL image, got {type(image).__name__}")
        c = self.image_cfg
        if c.get("do_convert_rgb", True):  # transparency composited onto white, as HF does
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, rgba).convert("RGB")
            else:
                image = image.convert("RGB")
        if c.get("do_resize", True):
            w, h = image.size
            size = c.get("size", {})
            if "shortest_edge" in size:
                s = int(size["shortest_edge"])
                short, long = (w, h) if w <= h else (h, w)
                new_long = int(s * long / short)
                nh, nw = (new_long, s) if w <= h else (s, new_long)
            else:
                nh, nw = int(size["height"]), int(size["width"])
            # NOTE: PIL's resize of the RGB image, as HF's (which goes through numpy first)
            image = image.resize((nw, nh), resample=int(c.get("resample", 3)))
        arr = np.moveaxis(np.array(image), -1, 0)  # [3, H, W] uint8
        if c.get("do_center_crop", False):
            ch, cw = int(c["crop_size"]["height"]), int(c["crop_size"]["width"])
            h, w = arr.shape[1:]
            if ch > h or cw > w:
                raise VlmoptError(f"image {w}x{h} smaller than the crop {cw}x{ch}: not supported")
            top, left = (h - ch) // 2, (w - cw) // 2
            arr = arr[:, top:top + ch, left:left + cw]
        x = arr.astype(np.float32)
        if c.get("do_rescale", True):
            # NOTE: float64 multiply, then float32 - transformers' rescale, bit for bit
            x = (arr.astype(np.float64) * float(c.get("rescale_factor", 1 / 255))).astype(
                np.float32)
        if c.get("do_normalize", True):
            mean = np.array(c["image_mean"], dtype=x.dtype)
            std = np.array(c["image_std"], dtype=x.dtype)
            x = ((x.T - mean) / std).T
        return np.ascontiguousarray(x, dtype=np.float32)

    # -- batch
    def encode(self, prompts: list[str], images: list) -> dict[str, np.ndarray]:
        """Same arrays as ``vlmopt.inputs.encode`` with the HF processor (left padding)."""
        if len(prompts) != len(images):
            raise VlmoptError("one image per prompt")
        pix = np.stack([self.pixels(im) for im in images])  # [B, 3, H, W]
        n_img = self.n_image_tokens(pix.shape[2], pix.shape[3])
        rows = []
        for p in prompts:
            if p.count(self.image_token) != 1:
                raise VlmoptError(f"prompt must contain {self.image_token} exactly once: {p!r}")
            text = self.chat_text(p).replace(self.image_token, self.image_token * n_img)
            rows.append(self.tokenizer.encode(text, add_special_tokens=True).ids)
        T = max(len(r) for r in rows)
        ids = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), T), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, T - len(r):] = r
            mask[i, T - len(r):] = 1
        pos = np.clip(mask.cumsum(-1) - 1, 0, None).astype(np.int64)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                "pixel_values": pix}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def image_parts(prompt: str) -> list[dict]:
    """A prompt with one ``<image>`` as chat content parts: text, image, text."""
    before, _, after = prompt.partition("<image>")
    parts = [{"type": "text", "text": before}] if before else []
    parts.append({"type": "image"})
    return parts + ([{"type": "text", "text": after}] if after else [])
