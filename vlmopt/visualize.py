"""Which visual tokens a plan keeps, drawn on the image the model saw.

The kept sets come from running the (rewritten) graph, never from re-applying the rules: an fx
interpreter records the slot indices every keep-top-k returns and composes them back to the
original sequence's slots (as the verifier does), and at each decoder node which visual tokens
are present and which pass through it unchanged (frozen, ShortV). A kept token whose embedding
at the LLM input differs from the original model's embedding of the same patch carries merged
features (VisionZip's contextual tokens, pooling). The family adapter maps a sample's j-th
visual token to its cell of the patch grid and undoes the processor's normalization.

    stages = trace(lm, gm, batch)       # per sample: input, selection, each drop, frozen runs
    png = render(stages[0], title="FastV K=2")   # one panel per stage; layout in a PNG text chunk
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

log = logging.getLogger(__name__)

# outline colours: every one has a channel above DIM's brightest value, so a dropped (dimmed)
# cell can never read as a kept one
COLOURS = {"kept": (40, 220, 80), "merged": (255, 40, 220), "frozen": (30, 150, 255)}
DIM = 0.3  # dropped cells: pixel * DIM (<= 76 in every channel)
TINT = 0.35  # merged and frozen cells: this much of their colour over the image
LAYOUT_KEY = "vlmopt:layout"  # PNG text chunk: the panels' geometry, JSON


@dataclass
class Stage:
    """The visual tokens at one place where the plan changes them, in the image's token order
    (0..n-1, row-major on the grid)."""

    kind: str  # "input" | "select" | "drop" | "frozen"
    layers: tuple[int, int]  # the decoder layers it covers: (first, last)
    count: int  # visual tokens the graph declares there (meta)
    kept: list[int]  # tokens present
    merged: list[int] = field(default_factory=list)  # of kept: carrying merged features
    frozen: list[int] = field(default_factory=list)  # of kept: passed through unchanged

    @property
    def label(self) -> str:
        a, b = self.layers
        where = f"layer_{a}" if a == b else f"layers {a}-{b}"
        if self.kind == "input":
            return f"input: {self.count} tokens"
        if self.kind == "frozen":
            return f"{where}: {len(self.frozen)} frozen"
        text = f"{'select' if self.kind == 'select' else 'drop'} -> {where}: {self.count}"
        return text + (f" ({len(self.merged)} merged)" if self.merged else "")


@dataclass
class Trace:
    """One sample: its stages, the patch grid and the image the model saw."""

    stages: list[Stage]
    grid: tuple[int, int]  # (rows, cols)
    image: np.ndarray  # uint8 [H, W, 3]

    def to_json(self) -> dict:
        return {"grid": list(self.grid),
                "stages": [{"kind": s.kind, "layers": list(s.layers), "count": s.count,
                            "label": s.label, "kept": s.kept, "merged": s.merged,
                            "frozen": s.frozen} for s in self.stages]}


class _Stop(Exception):
    def __init__(self, value):
        super().__init__("stop")
        self.value = value


class _Embeddings(fx.Interpreter):
    """Runs a graph up to its merge node: the LLM input embeddings [B, T, D]."""

    def run_node(self, n):
        out = super().run_node(n)
        if n.meta.get("vlmopt", {}).get("block") == "merge":
            raise _Stop(out[0])
        return out


class _Recorder(fx.Interpreter):
    """Records the composed original slots of the tokens at every decoder node, whether a
    keep-top-k ran since the previous one, the layer-0 input hidden states, and which rows each
    decoder left unchanged."""

    def __init__(self, gm):
        super().__init__(gm)
        self.slots: torch.Tensor | None = None  # [B, T'] original sequence slots
        self.cut = False
        self.layers: list[dict] = []

    def run_node(self, n):
        from vlmopt.ir.tokens import KeepTopK

        mod = self.module.get_submodule(n.target) if n.op == "call_module" else None
        if mod is None or not (isinstance(mod, KeepTopK)
                               or getattr(mod, "is_decoder_block", False)):
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        out = super().run_node(n)
        if isinstance(mod, KeepTopK):
            B, T = args[3].shape  # visual_mask
            prev = self.slots if self.slots is not None else torch.arange(T).expand(B, T)
            self.slots = prev.gather(1, out[4])
            self.cut = True
            return out
        hidden = args[0]  # [B, T, D]
        B, T, _ = hidden.shape
        slots = self.slots if self.slots is not None else torch.arange(T).expand(B, T)
        self.layers.append({"layer": n.meta["vlmopt"]["layer"], "node": n,
                            "slots": slots.clone(), "visual": args[4].clone(),
                            "cut": self.cut, "hidden": hidden if not self.layers else None,
                            "unchanged": (out == hidden).all(-1)})  # [B, T]
        self.cut = False
        return out


def _n_visual_at(node: fx.Node, n0: int) -> int:
    from vlmopt.ir.rewrite import visual_tokens

    return visual_tokens(node.meta["vlmopt"], n0)


@torch.no_grad()
def trace(lm, gm: fx.GraphModule, batch: dict, base: fx.GraphModule | None = None
          ) -> list[Trace]:
    """Per sample of ``batch`` (one image each), the stages at which ``gm`` changes its visual
    tokens, from one run of ``gm`` (and of ``base``, the original graph, up to its LLM input).
    ``lm.processor`` undoes the pixels' normalization for the drawing."""
    from vlmopt.ir.capture import capture, complete_inputs

    for n in gm.graph.nodes:
        if n.meta.get("vlmopt", {}).get("reordered"):
            from vlmopt.errors import VlmoptError

            raise VlmoptError(f"node {n.name!r}: VisionZip with cls 'official' lays the kept "
                             "tokens out in the official order, not in their patches' slots, "
                             "so they cannot be drawn on the image (cls 'patches' can)")
    ex = complete_inputs(batch)
    names = gm.meta["vlmopt"]["inputs"]
    rec = _Recorder(gm)
    rec.run(*(ex[k] for k in names))
    base = base if base is not None else capture(lm)
    try:
        _Embeddings(base).run(*(ex[k] for k in base.meta["vlmopt"]["inputs"]))
        raise RuntimeError("the original graph has no merge node")
    except _Stop as s:
        emb0 = s.value  # [B, T, D]
    image_id = gm.meta["vlmopt"]["image_token_id"]
    has_select = any(n.meta.get("vlmopt", {}).get("block") == "select" for n in gm.graph.nodes)
    out = []
    for b in range(ex["input_ids"].shape[0]):
        vis = (ex["input_ids"][b] == image_id).nonzero()[:, 0].tolist()  # original slots
        j_of = {s: j for j, s in enumerate(vis)}
        grid = lm.adapter.token_grid(ex, b)
        if grid[0] * grid[1] != len(vis):
            raise ValueError(f"sample {b}: {len(vis)} visual tokens but a {grid[0]}x{grid[1]} "
                             "grid (one image per prompt)")
        n0 = len(vis)
        stages = [Stage("input", (0, 0), n0, list(range(n0)))]
        merged: set[int] = set()
        for i, L in enumerate(rec.layers):
            slots = L["slots"][b].tolist()
            rows = [r for r, s in enumerate(slots) if s in j_of]  # visual rows, in order
            present = [j_of[slots[r]] for r in rows]
            if i == 0:  # the LLM input: embeddings that are not the original patch's
                h = L["hidden"][b]
                merged = {j_of[slots[r]] for r in rows
                          if not torch.equal(h[r], emb0[b, slots[r]])}
            frozen = [j_of[slots[r]] for r in rows if bool(L["unchanged"][b, r])]
            count = _n_visual_at(L["node"], n0)
            if len(present) != count:
                raise ValueError(f"node {L['node'].name!r}: {len(present)} visual tokens "
                                 f"reach it but the graph declares {count}")
            layer = L["layer"]
            if L["cut"] or (i == 0 and merged):
                kind = "select" if (layer == 0 and has_select) else "drop"
                stages.append(Stage(kind, (layer, layer), count, present,
                                    sorted(merged & set(present))))
            if frozen:
                last = stages[-1]
                if last.kind == "frozen" and not L["cut"] and last.layers[1] == layer - 1 \
                        and last.frozen == frozen:
                    last.layers = (last.layers[0], layer)
                else:
                    stages.append(Stage("frozen", (layer, layer), count, present,
                                        sorted(merged & set(present)), frozen))
        out.append(Trace(stages, grid, lm.adapter.seen_image(ex, b, lm.processor)))
    return out


# ----------------------------------------------------------------------------- drawing


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _panel(image: np.ndarray, grid: tuple[int, int], stage: Stage, scale: int) -> np.ndarray:
    """The image (scaled by ``scale``, nearest) with the stage's cells: dropped ones dimmed,
    kept ones outlined (merged and frozen ones also tinted)."""
    rows, cols = grid
    H, W = image.shape[:2]
    ch, cw = H // rows, W // cols
    img = image.repeat(scale, 0).repeat(scale, 1).astype(np.float32)
    ch, cw = ch * scale, cw * scale
    t = max(1, min(ch, cw) // 8)  # outline thickness
    if stage.kind == "input":  # every token: the plain image under a faint grid
        img[::ch] = img[::ch] * 0.5 + 127
        img[:, ::cw] = img[:, ::cw] * 0.5 + 127
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)
    state = np.zeros(rows * cols, dtype=np.int8)  # 0 dropped, 1 kept, 2 merged, 3 frozen
    state[stage.kept] = 1
    state[stage.merged] = 2
    state[stage.frozen] = 3
    colour = [None, COLOURS["kept"], COLOURS["merged"], COLOURS["frozen"]]
    for j, s in enumerate(state):
        y, x = (j // cols) * ch, (j % cols) * cw
        cell = img[y:y + ch, x:x + cw]
        if s == 0:
            cell *= DIM
            continue
        c = np.asarray(colour[s], dtype=np.float32)
        if s >= 2:
            cell[:] = cell * (1 - TINT) + c * TINT
        cell[:t], cell[-t:], cell[:, :t], cell[:, -t:] = c, c, c, c
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(tr: Trace, title: str | None = None, max_side: int = 336) -> bytes:
    """One PNG, one panel per stage left to right, each titled; a legend below. The panels'
    geometry is in the PNG text chunk ``vlmopt:layout`` (x, y, cell size, grid, state per
    stage), so a reader can find every cell."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    H, W = tr.image.shape[:2]
    rows, cols = tr.grid
    if H % rows or W % cols:
        raise ValueError(f"image {W}x{H} is not a whole {cols}x{rows} grid of cells")
    scale = max(1, max_side // max(H, W))
    pw, ph = W * scale, H * scale
    gap, head = 12, 34 if title else 20
    foot = 26
    n = len(tr.stages)
    canvas = Image.new("RGB", (gap + n * (pw + gap), head + ph + foot + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    if title:
        draw.text((gap, 4), title, fill=(0, 0, 0), font=_font(14))
    panels = []
    for k, st in enumerate(tr.stages):
        x, y = gap + k * (pw + gap), head
        canvas.paste(Image.fromarray(_panel(tr.image, tr.grid, st, scale)), (x, y))
        draw.text((x, y - 15), st.label, fill=(0, 0, 0), font=font)
        panels.append({"x": x, "y": y, "cell_h": (H // rows) * scale,
                       "cell_w": (W // cols) * scale, "rows": rows, "cols": cols,
                       "kind": st.kind, "layers": list(st.layers), "count": st.count,
                       "label": st.label})
    lx, ly = gap, head + ph + 8
    for name, c in (("kept", COLOURS["kept"]), ("merged (contextual/pooled)", COLOURS["merged"]),
                    ("frozen (ShortV)", COLOURS["frozen"]), ("dropped", None)):
        fill = (60, 60, 60) if c is None else c
        draw.rectangle((lx, ly, lx + 12, ly + 12), outline=fill, width=3,
                       fill=(40, 40, 40) if c is None else None)
        draw.text((lx + 17, ly), name, fill=(0, 0, 0), font=font)
        lx += 26 + int(draw.textlength(name, font=font))
    info = PngInfo()
    info.add_text(LAYOUT_KEY, json.dumps({"panels": panels, "colours": COLOURS}))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_cells(png: bytes | str) -> list[dict]:
    """Decode a PNG written by ``render``: per panel its layout and each cell's state ("kept",
    "merged", "frozen" or "dropped"), read from the outline pixels alone (the input panel,
    drawn plain, holds every token)."""
    from PIL import Image

    im = Image.open(png if isinstance(png, str) else io.BytesIO(png))
    layout = json.loads(im.text[LAYOUT_KEY])
    arr = np.asarray(im.convert("RGB"))
    by_colour = {tuple(c): k for k, c in layout["colours"].items()}
    out = []
    for p in layout["panels"]:
        if p["kind"] == "input":  # drawn plain: every token is there
            out.append({**p, "cells": ["kept"] * (p["rows"] * p["cols"])})
            continue
        states = []
        for j in range(p["rows"] * p["cols"]):
            y = p["y"] + (j // p["cols"]) * p["cell_h"] + p["cell_h"] // 2
            x = p["x"] + (j % p["cols"]) * p["cell_w"]  # on the left outline
            states.append(by_colour.get(tuple(int(v) for v in arr[y, x]), "dropped"))
        out.append({**p, "cells": states})
    return out


# ----------------------------------------------------------------------------- entry points


def encode_one(lm, prompt: str, image) -> dict:
    """One prompt and its image as graph inputs, with the checkpoint's own processor."""
    from vlmopt import inputs
    from vlmopt.ir.capture import complete_inputs

    return complete_inputs(inputs.encode(lm.processor, [prompt], [image]))


def overlays(lm, graphs: dict, records: list, base: fx.GraphModule | None = None
             ) -> tuple[dict, dict[str, bytes]]:
    """For ``graphs`` {name: (title, graph)} and a few records: (JSON summary, {file name:
    PNG}), one PNG per graph and record, named ``{name}-{i}.png``."""
    from vlmopt.ir.capture import capture

    base = base if base is not None else capture(lm)
    meta: dict = {"images": [], "plans": {}}
    files: dict[str, bytes] = {}
    for i, r in enumerate(records):
        batch = encode_one(lm, r.prompt, r.load_image())
        meta["images"].append({"image": str(getattr(r, "image", "")), "prompt": r.prompt})
        for name, (title, gm) in graphs.items():
            tr = trace(lm, gm, batch, base)[0]
            fname = f"{name}-{i}.png"
            files[fname] = render(tr, title)
            meta["plans"].setdefault(name, {"title": title, "files": [], "traces": []})
            meta["plans"][name]["files"].append(fname)
            meta["plans"][name]["traces"].append(tr.to_json())
    return meta, files


def best_baseline(rows: list[dict]) -> dict | None:
    """The report's best published method at the target: highest calibration fidelity, then
    lowest KL (``optimize``'s method rows; not the original, not vlmopt's own)."""
    cands = [m for m in rows if not m.get("unreachable") and m.get("steps")
             and m["method"] != "original" and not m["method"].startswith("vlmopt")]
    if not cands:
        return None
    return max(cands, key=lambda m: (m["calib"]["fidelity"], -m["calib"]["kl"]))


def report_overlays(lm, rows: list[dict], chosen: fx.GraphModule, build, records: list,
                    n_images: int = 3) -> tuple[dict, dict[str, bytes]]:
    """The report's drawings: the chosen plan's graph (the ``vlmopt`` row) and the best
    baseline's on the first ``n_images`` records; ``build(steps)`` makes a row's graph. A
    model whose geometry cannot be drawn gives a summary that says why, and no files."""
    from vlmopt.report import plan_label

    ours = next(m for m in rows if m["method"].startswith("vlmopt"))
    graphs = {"chosen": (f"{ours['method']}: {plan_label(ours['steps'])}", chosen)}
    base = best_baseline(rows)
    if base is not None:
        graphs["baseline"] = (f"best baseline, {base['method']}: {plan_label(base['steps'])}",
                              build(base["steps"]))
    try:
        return overlays(lm, graphs, records[:n_images])
    except (NotImplementedError, ValueError) as e:
        log.warning("kept-token drawings skipped: %s", e)
        return {"skipped": str(e)}, {}
