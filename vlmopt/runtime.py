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
from vlmopt.runtime_pre import (  # noqa: F401  (re-exported: the preprocessing API)
    Preprocessor,
    image_parts,
    open_image,
)

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
