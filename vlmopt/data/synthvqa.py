"""SynthVQA: a seeded generator of visual questions that can only be answered by looking.

A scene is a textured (never flat) background with 3-8 objects (shape x colour x size) and one
small glyph tile (a 5x7-pixel character on a white tile, its ink inside one 8-px grid cell).
Each record asks one question of one of seven types and has a single-word answer. Everything is
a pure function of the seed, so the ``calib`` and ``test`` splits are fixed datasets and the
``train`` split is generated on the fly.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 112
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "orange": (245, 140, 20),
}
SIZES = {"small": 5, "large": 9}  # half-extent in pixels
QUADRANTS = ("topleft", "topright", "bottomleft", "bottomright")
RELATIONS = ("left", "right", "above", "below")
QUESTION_TYPES = ("colour", "shape", "count", "spatial", "location", "exists", "glyph")

# 5x7 bitmaps, one string of 5 characters per row ("#" = ink). Our own drawing.
GLYPHS = {
    "0": [" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "],
    "1": ["  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
    "2": [" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"],
    "3": ["#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "],
    "4": ["   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "],
    "5": ["#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "],
    "6": ["  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "],
    "7": ["#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "],
    "8": [" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "],
    "9": [" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "],
    "a": [" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"],
    "e": ["#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"],
    "h": ["#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"],
    "k": ["#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"],
    "t": ["#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "],
    "x": ["#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"],
}
INK_CELL = 8  # the glyph's ink lies inside one cell of this grid (see random_scene)
COUNT_WORDS = tuple(str(i) for i in range(9))

# Bumped whenever the generator's output changes; names the cached builtin splits.
GENERATOR_VERSION = 4
# Fixed seeds that define the released splits. Changing them changes the datasets.
SPLIT_SEEDS = {"train": 0, "calib": 1_000_003, "test": 2_000_003}
SPLIT_SIZES = {"calib": 1024, "test": 1050}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    x: int  # centre
    y: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    objects: list[Obj]
    glyph: str
    glyph_xy: tuple[int, int]  # top-left corner of the tile
    texture: dict = field(default_factory=dict)


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def vocabulary() -> list[str]:
    """Every word a SynthVQA prompt or answer can contain (used to build the tokenizer)."""
    words = set()
    for t in QUESTION_TYPES:
        for q in _TEMPLATE_WORDS[t]:
            words.update(q.split())
    words.update(SHAPES, (plural(s) for s in SHAPES), COLOURS, SIZES, QUADRANTS, RELATIONS)
    words.update(COUNT_WORDS, GLYPHS, ("yes", "no", "?", ",", ".", ":"))
    return sorted(words)


_TEMPLATE_WORDS = {
    "colour": ["what colour is the"],
    "shape": ["what shape is the object"],
    "count": ["how many are there objects"],
    "spatial": ["where is the relative to"],
    "location": ["which quadrant of the image is in"],
    "exists": ["is there a in the image"],
    "glyph": ["what character is written on the white tile"],
}


# ----------------------------------------------------------------------------- rendering


def _background(rng: random.Random) -> tuple[np.ndarray, dict]:
    """Grey textured background: oriented stripes plus per-pixel noise (never flat)."""
    base = rng.uniform(95, 165)
    amp = rng.uniform(8, 18)
    theta = rng.uniform(0, math.pi)
    freq = rng.uniform(0.15, 0.45)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    wave = amp * np.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)))
    nrng = np.random.default_rng(rng.getrandbits(32))
    noise = nrng.normal(0, 6, size=(IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    tint = np.array([rng.uniform(-6, 6) for _ in range(3)], dtype=np.float32)
    img = base + wave[..., None] + noise + tint
    return np.clip(img, 0, 255).astype(np.uint8), {"base": base, "amp": amp, "freq": freq}


def _draw_object(draw: ImageDraw.ImageDraw, o: Obj) -> None:
    _draw_shape(draw, o, COLOURS[o.colour])


def render(scene: Scene) -> Image.Image:
    """Draw a scene. Pure function of the scene (the texture is re-derived from its seed)."""
    rng = random.Random(scene.texture["seed"])
    arr, _ = _background(rng)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_object(draw, o)
    gx, gy = scene.glyph_xy
    draw.rectangle([gx, gy, gx + 8, gy + 10], fill=(250, 250, 250))
    for row, bits in enumerate(GLYPHS[scene.glyph]):
        for col, ch in enumerate(bits):
            if ch == "#":
                draw.point((gx + 2 + col, gy + 2 + row), fill=(0, 0, 0))
    return img


def patch_labels(scene: Scene, patch: int, owners: bool = False) -> np.ndarray:
    """Per-patch ground truth [3, G, G] (row-major like ViT patches): colour id, shape id (0 =
    background, else 1 + index in COLOURS / SHAPES) and glyph id (0 = none, else 1 + index in
    GLYPHS) of what covers most of each patch (the glyph's id: on the patch under the centre
    of its ink only). Used as dense auxiliary supervision in training.
    ``owners``: instead [G, G] with the index + 1 of the object covering most of each patch
    (255 = the glyph tile, 0 = background)."""
    lab = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(lab)
    for i, o in enumerate(scene.objects):
        _draw_shape(draw, o, i + 1)
    gx, gy = scene.glyph_xy
    draw.rectangle([gx, gy, gx + 8, gy + 10], fill=255)
    arr = np.asarray(lab)
    G = IMAGE_SIZE // patch
    out = np.zeros((3, G, G), dtype=np.int64)
    own = np.zeros((G, G), dtype=np.int64)
    colours, glyphs = list(COLOURS), list(GLYPHS)
    for r in range(G):
        for c in range(G):
            cell = arr[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
            vals, counts = np.unique(cell[cell > 0], return_counts=True)
            if len(vals) == 0 or counts.max() < patch * patch // 8:
                continue
            v = int(vals[counts.argmax()])
            own[r, c] = v
            if v != 255:
                o = scene.objects[v - 1]
                out[0, r, c] = 1 + colours.index(o.colour)
                out[1, r, c] = 1 + SHAPES.index(o.shape)
    # the glyph's id goes on the patch that holds its ink (whole when patch == INK_CELL)
    out[2][glyph_patch(scene, patch)] = 1 + glyphs.index(scene.glyph)
    return own if owners else out


def glyph_patch(scene: Scene, patch: int) -> tuple[int, int]:
    """(row, column) of the patch under the centre of the glyph's 5x7 ink."""
    gx, gy = scene.glyph_xy
    return (gy + 2 + 3) // patch, (gx + 2 + 2) // patch


def _draw_shape(draw: ImageDraw.ImageDraw, o: Obj, fill: int) -> None:
    r, x, y = SIZES[o.size], o.x, o.y
    if o.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif o.shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    else:
        w = max(2, r // 2)
        draw.rectangle([x - r, y - w, x + r, y + w], fill=fill)
        draw.rectangle([x - w, y - r, x + w, y + r], fill=fill)


# ----------------------------------------------------------------------------- scenes


def _boxes_clear(box, boxes, gap=3) -> bool:
    x0, y0, x1, y1 = box
    return all(x1 + gap <= a0 or a1 + gap <= x0 or y1 + gap <= b0 or b1 + gap <= y0
               for a0, b0, a1, b1 in boxes)


def random_scene(rng: random.Random, min_objects: int = 3, max_objects: int = 8) -> Scene:
    """3-8 (or the given range of) non-overlapping objects and one glyph tile at random
    places. The defaults define the released splits."""
    n = rng.randint(min_objects, max_objects)
    boxes: list[tuple[int, int, int, int]] = []
    # NOTE: the glyph's ink (5x7 px at tile + (2, 2)) lies inside one 8-px grid cell, with a
    # little jitter (4 x 2 offsets): reading it is a one-token feature for a patch-8 ViT, so
    # glyph questions test whether a pruning method keeps the single token that matters. (Ink
    # straddling 2-4 patches was never learned by the 3-layer built-in ViT: probe accuracy at
    # chance after 72k training images.)
    cells = IMAGE_SIZE // INK_CELL
    gx = INK_CELL * rng.randint(1, cells - 2) + rng.randint(-2, 1)
    gy = INK_CELL * rng.randint(1, cells - 2) + rng.randint(-2, -1)
    boxes.append((gx, gy, gx + 8, gy + 10))
    objects: list[Obj] = []
    tries = 0
    while len(objects) < n and tries < 500:
        tries += 1
        size = rng.choice(tuple(SIZES))
        r = SIZES[size]
        x = rng.randint(r + 2, IMAGE_SIZE - r - 3)
        y = rng.randint(r + 2, IMAGE_SIZE - r - 3)
        box = (x - r, y - r, x + r, y + r)
        if _boxes_clear(box, boxes):
            boxes.append(box)
            objects.append(Obj(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), size, x, y))
    return Scene(objects, rng.choice(tuple(GLYPHS)), (gx, gy), {"seed": rng.getrandbits(32)})


# ----------------------------------------------------------------------------- questions


def _unique(objs, **attrs):
    hits = [o for o in objs if all(getattr(o, k) == v for k, v in attrs.items())]
    return hits[0] if len(hits) == 1 else None


def _quadrant(o: Obj) -> str | None:
    r, half = SIZES[o.size], IMAGE_SIZE / 2
    if abs(o.x - half) < r + 2 or abs(o.y - half) < r + 2:
        return None  # straddles a midline: no clear answer
    return ("top" if o.y < half else "bottom") + ("left" if o.x < half else "right")


def _relation(a: Obj, b: Obj) -> str | None:
    dx, dy = a.x - b.x, a.y - b.y
    if max(abs(dx), abs(dy)) < 12 or max(abs(dx), abs(dy)) < 2 * min(abs(dx), abs(dy)):
        return None  # not clearly along one axis
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def ask(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str] | None:
    """One (question, answer) of ``qtype`` about ``scene``; None if the scene can't support it."""
    objs = scene.objects
    named = [o for o in objs if _unique(objs, colour=o.colour, shape=o.shape)]
    if qtype == "colour":
        rng.shuffle(cands := list(objs))
        for o in cands:
            if _unique(objs, shape=o.shape):
                return f"What colour is the {o.shape}?", o.colour
            if _unique(objs, shape=o.shape, size=o.size):
                return f"What colour is the {o.size} {o.shape}?", o.colour
        return None
    if qtype == "shape":
        rng.shuffle(cands := list(objs))
        for o in cands:
            if _unique(objs, colour=o.colour):
                return f"What shape is the {o.colour} object?", o.shape
            if _unique(objs, colour=o.colour, size=o.size):
                return f"What shape is the {o.size} {o.colour} object?", o.shape
        return None
    if qtype == "count":
        if rng.random() < 0.5:
            s = rng.choice(SHAPES)
            return f"How many {plural(s)} are there?", str(sum(o.shape == s for o in objs))
        c = rng.choice(tuple(COLOURS))
        return f"How many {c} objects are there?", str(sum(o.colour == c for o in objs))
    if qtype == "spatial":
        pairs = [(a, b) for a in named for b in named if a is not b and _relation(a, b)]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        return f"Where is the {a.name} relative to the {b.name}?", _relation(a, b)
    if qtype == "location":
        cands = [o for o in named if _quadrant(o)]
        if not cands:
            return None
        o = rng.choice(cands)
        return f"Which quadrant of the image is the {o.name} in?", _quadrant(o)
    if qtype == "exists":
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            c, s = rng.choice(sorted(present))
            return f"Is there a {c} {s} in the image?", "yes"
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        c, s = rng.choice(absent)
        return f"Is there a {c} {s} in the image?", "no"
    if qtype == "glyph":
        return "What character is written on the white tile?", scene.glyph
    raise ValueError(f"unknown question type {qtype!r}")


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    question: str
    answer: str
    type: str
    scene: Scene | None = field(default=None, compare=False, repr=False)

    @property
    def prompt(self) -> str:
        # NOTE: question first, so visual tokens can attend to it (causal attention): each
        # visual token can tell whether it is what is asked about. Image-first prompts left a
        # from-scratch model stuck at the text prior (the last token must then gather the
        # question before it can form a question-specific query: a 2-hop circuit).
        return f"{self.question}\n<image>"


def sample(seed: int, index: int, objects: tuple[int, int] = (3, 8)) -> Sample:
    """The ``index``-th sample of the stream for ``seed``; question types cycle for balance.
    ``objects`` (min, max) narrows the scenes, e.g. for a training curriculum; min >= 2 so that
    every question type can be asked."""
    rng = random.Random(seed * 1_000_003 + index)
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    while True:
        scene = random_scene(rng, *objects)
        qa = ask(scene, qtype, rng)
        if qa is not None:
            return Sample(render(scene), qa[0], qa[1], qtype, scene)


def write_dataset(out: Path, n: int, seed: int) -> Path:
    """Write ``n`` samples as PNGs plus ``data.jsonl`` (calibration format) under ``out``."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        s = sample(seed, i)
        rel = f"images/{i:05d}.png"
        s.image.save(out / rel)
        lines.append(json.dumps({"image": rel, "prompt": s.prompt, "answer": s.answer,
                                 "type": s.type}))
    path = out / "data.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)  # NOTE: data.jsonl appears last, so a complete file means a complete set
    return path
