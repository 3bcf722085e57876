"""Run an emitted artifact with ONNX Runtime alone. NOTE: this module and everything it imports
must never import torch (tests run it with torch unimportable): numpy, onnxruntime, Pillow,
jinja2 and tokenizers only.

    art = Artifact("OUT")                      # checks manifest.json and every file's sha256
    pre = Preprocessor(art.root / "processor")  # the checkpoint's own processor files
    print(art.generate(pre, ["What colour is the circle?\\n<image>"], [image])[0])
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from vlmopt.errors import VlmoptError

log = logging.getLogger(__name__)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def is_artifact(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "manifest.json").is_file()


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MANIFEST_SCHEMA = "vlmopt.artifact/1"
CHECKED_DIRS = ("onnx", "processor")  # every file under these is listed with its sha256


def manifest_digest(m: dict) -> str:
    """sha256 of a manifest's content without its own ``manifest_sha256`` (canonical JSON), so
    an edited or damaged manifest.json is caught like any other file of the artifact."""
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def _field(m: dict, dotted: str, typ, mf: Path):
    v = m
    for k in dotted.split("."):
        if not isinstance(v, dict) or k not in v:
            raise VlmoptError(f"{mf}: field '{dotted}' is missing (not a complete "
                              f"{MANIFEST_SCHEMA} manifest)")
        v = v[k]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        names = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
        raise VlmoptError(f"{mf}: field '{dotted}' must be {names}, got {type(v).__name__}")
    return v


def _inside(root: Path, rel: str, mf: Path, what: str) -> Path:
    f = root / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise VlmoptError(f"{mf}: {what} {rel!r} lies outside the artifact directory")
    return f


def read_manifest(root: Path, verify: bool = True) -> dict:
    """The manifest of artifact ``root``, its structure checked; with ``verify`` also its own
    checksum and every file's: each listed file must match, and every file under onnx/ and
    processor/ (and every .onnx graph anywhere) must be listed."""
    root = Path(root)
    mf = root / "manifest.json"
    if not root.exists():
        raise VlmoptError(f"{root}: no such artifact directory")
    if not is_artifact(root):
        raise VlmoptError(f"{root}: not a vlmopt artifact (no manifest.json)")
    raw = mf.read_bytes()
    try:
        m = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise VlmoptError(f"{mf}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); the "
                          "manifest is damaged") from None
    except json.JSONDecodeError as e:
        raise VlmoptError(f"{mf}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(m, dict) or m.get("schema") != MANIFEST_SCHEMA:
        raise VlmoptError(f"{mf}: not a {MANIFEST_SCHEMA} manifest")
    for key, typ in (("model.name", str), ("model.fingerprint", str),
                     ("graphs.prefill.file", str), ("graphs.decode.file", str),
                     ("kv.n_layers", int), ("tokens", dict)):
        _field(m, key, typ, mf)
    for key, typ in (("processor", (str, type(None))), ("image", dict)):
        if key in m:
            _field(m, key, typ, mf)
    graphs = {g: _inside(root, m["graphs"][g]["file"], mf, "graph file")
              for g in ("prefill", "decode")}
    for f in graphs.values():
        if not f.is_file():
            raise VlmoptError(f"{root}: graph file {f.relative_to(root)} is missing")
    if verify:
        _verify(root, m, mf, graphs)
    return m


def _verify(root: Path, m: dict, mf: Path, graphs: dict) -> None:
    recorded = _field(m, "manifest_sha256", str, mf)
    actual = manifest_digest(m)
    if recorded != actual:
        raise VlmoptError(f"{mf}: checksum mismatch: the manifest was edited or damaged "
                          f"(it records sha256 {recorded}, its content has {actual})")
    files = _field(m, "files", dict, mf)
    for rel, info in files.items():
        f = _inside(root, rel, mf, "file")
        if not f.is_file():
            raise VlmoptError(f"{root}: file {rel} listed in manifest.json is missing")
        want = info.get("sha256") if isinstance(info, dict) else None
        if not isinstance(want, str):
            raise VlmoptError(f"{mf}: files[{rel!r}] has no sha256")
        got = sha256(f)
        if got != want:
            raise VlmoptError(f"{root}: checksum mismatch for {rel} (manifest.json says "
                              f"sha256 {want}, the file has {got})")
    on_disk = [p for d in CHECKED_DIRS for p in (root / d).rglob("*") if p.is_file()]
    on_disk += [p for p in root.rglob("*.onnx") if p.is_file()]
    on_disk += list(graphs.values())
    for p in sorted(set(on_disk)):
        rel = p.relative_to(root).as_posix()
        if rel not in files:
            raise VlmoptError(f"{root}: {rel} is not listed in manifest.json's files, so its "
                              "checksum cannot be checked (remove it or export again)")


def new_tokens_room(manifest: dict, feeds: dict) -> tuple[int, int] | None:
    """(positions the prompt takes, the model's position limit), or None if the manifest does
    not record the limit."""
    limit = (manifest.get("tokens") or {}).get("max_position_embeddings")
    if not isinstance(limit, int):
        return None
    return int(np.max(feeds["position_ids"])) + 1, limit


def session(path: Path, provider: str = "cpu", threads: int | None = None,
            spinning: bool = True):
    """An InferenceSession of ``path``. ``spinning=False`` stops the intra-op workers from
    spinning after each run (ONNX Runtime's default keeps them busy-waiting for the next run):
    what a benchmark needs when several sessions run in turn on few cores, else the idle
    sessions' spinning workers steal the cores from the one being timed."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise VlmoptError(f"--provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    ep = PROVIDERS[provider]
    if ep not in ort.get_available_providers():
        raise VlmoptError(f"--provider {provider}: {ep} is not available in this onnxruntime "
                          "(install onnxruntime-gpu for cuda)")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [ep] if ep == "CPUExecutionProvider" else [ep, "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        raise VlmoptError(f"{path}: onnxruntime cannot load this graph: "
                          f"{str(e).splitlines()[0]}") from None


class Artifact:
    """The two graphs of an artifact and greedy generation over them."""

    def __init__(self, root, *, provider: str = "cpu", verify: bool = True,
                 threads: int | None = None, spinning: bool = True):
        self.root = Path(root)
        self.manifest = read_manifest(self.root, verify=verify)
        self.provider, self.threads, self.spinning = provider, threads, spinning
        self.n_layers = int(self.manifest["kv"]["n_layers"])
        self._sessions: dict = {}  # loaded on first use

    def _session(self, graph: str):
        if graph not in self._sessions:
            f = self.root / self.manifest["graphs"][graph]["file"]
            self._sessions[graph] = session(f, self.provider, self.threads, self.spinning)
        return self._sessions[graph]

    @property
    def prefill(self):
        return self._session("prefill")

    @property
    def decode(self):
        return self._session("decode")

    def release(self, graph: str) -> None:
        """Free one graph's session (large models: time prefill and decode in turn)."""
        self._sessions.pop(graph, None)

    def run_prefill(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = [i.name for i in self.prefill.get_inputs()]
        return self.prefill.run(None, {k: feeds[k] for k in names})

    def step(self, tok: np.ndarray, pos: np.ndarray, past: list[np.ndarray]) -> list:
        feeds = {"input_ids": tok, "position_ids": pos}
        feeds.update(zip([i.name for i in self.decode.get_inputs()][2:], past))
        return self.decode.run(None, feeds)

    def generate_ids(self, feeds: dict[str, np.ndarray], max_new_tokens: int,
                     eos: int | None = -1) -> tuple[np.ndarray, list[np.ndarray]]:
        """Greedy: (tokens [B, N], logits [B, V] per step). Finished rows repeat their EOS."""
        if eos == -1:
            eos = self.manifest["tokens"].get("eos_token_id")
        eos = -1 if eos is None else eos
        room = new_tokens_room(self.manifest, feeds)
        if room is not None and room[0] + max_new_tokens > room[1]:
            raise VlmoptError(f"{max_new_tokens} new tokens after a prompt of {room[0]} "
                              f"positions exceed the model's {room[1]} positions")
        out = self.run_prefill(feeds)
        steps = [out[0]]
        tok = out[0].argmax(-1)  # [B]
        toks, done = [tok], tok == eos
        for _ in range(max_new_tokens - 1):
            if done.all():
                break
            out = self.step(tok[:, None].astype(np.int64), out[1], out[2:])
            steps.append(out[0])
            tok = np.where(done, tok, out[0].argmax(-1))
            done = done | (tok == eos)
            toks.append(tok)
        return np.stack(toks, 1), steps

    def logits(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Last-position logits [B, V] of the prompt (the first generated token's)."""
        return self.run_prefill(feeds)[0]

    @property
    def dynamic(self) -> bool:
        """Dynamic resolution (Qwen-VL): the graphs take one prompt at a time."""
        return bool(self.manifest.get("image", {}).get("dynamic"))

    def generate(self, pre: Preprocessor, prompts: list[str], images: list,
                 max_new_tokens: int = 16) -> list[str]:
        if self.dynamic:
            rows = [self.generate_ids(pre.encode([p], [im]), max_new_tokens)[0][0].tolist()
                    for p, im in zip(prompts, images)]
        else:
            rows = self.generate_ids(pre.encode(prompts, images), max_new_tokens)[0].tolist()
        eos = self.manifest["tokens"].get("eos_token_id")
        texts = []
        for row in rows:
            if eos in row:
                row = row[:row.index(eos)]
            texts.append(pre.decode(row))
        return texts


# ----------------------------------------------------------------------------- preprocessing


def preprocessor(art: Artifact) -> Preprocessor:
    """The artifact's own preprocessing: LLaVA's, Qwen-VL's, Idefics3's or LLaVA-NeXT /
    OneVision's (the manifest's image layout says which)."""
    if not art.manifest.get("processor"):
        raise VlmoptError(f"{art.root}: the artifact has no processor files")
    root = art.root / art.manifest["processor"]
    if art.dynamic:
        layout = art.manifest["image"]["layout"]
        if layout.get("kind") == "tiles":  # Idefics3 / SmolVLM
            from vlmopt.runtime_tiles import TilePreprocessor

            return TilePreprocessor(root, layout)
        if layout.get("kind") == "internvl":
            from vlmopt.runtime_tiles import InternVLPreprocessor

            return InternVLPreprocessor(root, layout)
        if layout.get("kind") == "anyres":  # LLaVA-NeXT / OneVision
            from vlmopt.runtime_anyres import AnyResPreprocessor

            return AnyResPreprocessor(root, layout)
        return QwenPreprocessor(root, layout)
    return Preprocessor(root)


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


class QwenPreprocessor(Preprocessor):
    """Qwen-VL preprocessing without transformers: the image processor's resize and patches
    (vlmopt.preprocess_qwen), the chat template with the image as a content part, the image pad
    expanded to the image's token count, M-RoPE positions and the vision layout inputs
    (vlmopt.qwen_layout). One prompt per call: the graphs run at batch 1."""

    def __init__(self, root, layout: dict):
        super().__init__(root)
        from vlmopt import preprocess_qwen

        self.qcfg = preprocess_qwen.image_config(self.image_cfg)
        self.layout = layout
        tcfg = self._json("tokenizer_config.json")
        extra = tcfg.get("extra_special_tokens") or {}
        self.pad_token = extra.get("image_token") if isinstance(extra, dict) else None
        self.pad_token = self.pad_token or preprocess_qwen.IMAGE_PAD
        self.image_id = self.tokenizer.token_to_id(self.pad_token)
        if self.image_id is None:
            raise VlmoptError(f"{self.root}: the tokenizer has no {self.pad_token} token")

    def chat_text(self, prompt: str) -> str:
        if not self.chat_template:
            return prompt.replace("<image>", self.pad_token)
        return self.render([{"role": "user", "content": image_parts(prompt)}])

    def encode(self, prompts: list[str], images: list) -> dict[str, np.ndarray]:

        from vlmopt import preprocess_qwen, qwen_layout
        from vlmopt.export_vision import layout_feeds

        if len(prompts) != 1 or len(images) != 1:
            raise VlmoptError("a dynamic-resolution artifact takes one prompt and image a call")
        prompt, image = prompts[0], images[0]
        if prompt.count("<image>") != 1:
            raise VlmoptError(f"prompt must contain <image> exactly once: {prompt!r}")
        image = open_image(image)
        patches, grid = preprocess_qwen.pixels(image, self.qcfg)
        n = preprocess_qwen.n_tokens(grid, self.qcfg.merge_size)
        text = preprocess_qwen.expand_image_tokens(self.chat_text(prompt), n, self.pad_token)
        ids = np.array([self.tokenizer.encode(text, add_special_tokens=True).ids],
                       dtype=np.int64)
        mask = np.ones_like(ids)
        grids = grid[None]
        pos = qwen_layout.mrope_positions(ids, mask, grids, self.image_id, self.qcfg.merge_size)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                "pixel_values": patches, **layout_feeds(self.layout, grids)}


def image_parts(prompt: str) -> list[dict]:
    """A prompt with one ``<image>`` as chat content parts: text, image, text."""
    before, _, after = prompt.partition("<image>")
    parts = [{"type": "text", "text": before}] if before else []
    parts.append({"type": "image"})
    return parts + ([{"type": "text", "text": after}] if after else [])
