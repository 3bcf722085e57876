"""SynthVQA: determinism, answer correctness on hand-built scenes, rendering, dataset files."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlmopt.data import synthvqa
from vlmopt.data.synthvqa import COLOURS, GLYPHS, IMAGE_SIZE, QUESTION_TYPES, SHAPES, Obj, Scene
from vlmopt.frontend import synth_llava

# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("index", [0, 3, 6])
def test_same_seed_and_index_give_identical_samples(index):
    a, b = synthvqa.sample(11, index), synthvqa.sample(11, index)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.question, a.answer, a.type) == (b.question, b.answer, b.type)


def test_different_seeds_give_different_images():
    images = {synthvqa.sample(seed, 0).image.tobytes() for seed in range(5)}
    assert len(images) == 5


def test_different_indices_of_one_seed_give_different_images():
    images = {synthvqa.sample(0, i).image.tobytes() for i in range(5)}
    assert len(images) == 5


def test_render_is_a_pure_function_of_the_scene():
    scene = synthvqa.random_scene(random.Random(4))
    assert synthvqa.render(scene).tobytes() == synthvqa.render(scene).tobytes()


# ----------------------------------------------------------------------------- hand-built scenes

# green circle (top left), blue circle (top right, large), red square (bottom left), glyph "7".
GREEN_CIRCLE = Obj("circle", "green", "small", 20, 20)
BLUE_CIRCLE = Obj("circle", "blue", "large", 90, 20)
RED_SQUARE = Obj("square", "red", "small", 20, 90)
SCENE = Scene([GREEN_CIRCLE, BLUE_CIRCLE, RED_SQUARE], "7", (80, 80), {"seed": 123})

EXPECTED_COLOUR = {
    "What colour is the square?": "red",
    "What colour is the small circle?": "green",
    "What colour is the large circle?": "blue",
}
EXPECTED_SHAPE = {
    "What shape is the red object?": "square",
    "What shape is the green object?": "circle",
    "What shape is the blue object?": "circle",
}
EXPECTED_COUNT = {"circle": "2", "square": "1", "triangle": "0", "cross": "0",
                  "red objects": "1", "green objects": "1", "blue objects": "1",
                  "yellow objects": "0", "purple objects": "0", "orange objects": "0"}
# blue circle vs red square is diagonal (dx = 70, dy = -70): never asked
EXPECTED_SPATIAL = {
    ("green circle", "blue circle"): "left",
    ("blue circle", "green circle"): "right",
    ("green circle", "red square"): "above",
    ("red square", "green circle"): "below",
}
EXPECTED_LOCATION = {"green circle": "topleft", "blue circle": "topright",
                     "red square": "bottomleft"}
PRESENT = {("green", "circle"), ("blue", "circle"), ("red", "square")}


def _asked(qtype, scene=SCENE, n=60):
    """Every (question, answer) ask() produces for ``qtype`` over n rng seeds."""
    out = [synthvqa.ask(scene, qtype, random.Random(s)) for s in range(n)]
    assert all(qa is not None for qa in out), f"{qtype}: the scene supports this question"
    return out


def test_colour_questions_name_a_unique_object_and_answer_its_colour():
    asked = _asked("colour")
    for q, a in asked:
        assert EXPECTED_COLOUR[q] == a
    assert {q for q, _ in asked} == set(EXPECTED_COLOUR)


def test_shape_questions_name_a_unique_colour_and_answer_its_shape():
    asked = _asked("shape")
    for q, a in asked:
        assert EXPECTED_SHAPE[q] == a
    assert {q for q, _ in asked} == set(EXPECTED_SHAPE)


def test_shape_of_the_red_object_is_square():
    assert ("What shape is the red object?", "square") in _asked("shape")


def test_count_questions_count_shapes_and_colours():
    asked = _asked("count", n=200)
    seen = set()
    for q, a in asked:
        m = re.fullmatch(r"How many (\w+(?: objects)?) are there\?", q)
        assert m, q
        what = m.group(1)
        if not what.endswith(" objects"):  # a plural shape name (see test_plural_of_cross)
            what = next(s for s in SHAPES if what == synthvqa.plural(s))
        assert EXPECTED_COUNT[what] == a, q
        seen.add(what)
    assert {"circle", "square"} <= seen  # both shape and colour questions occur
    assert any(s.endswith("objects") for s in seen)


def test_plural_of_cross_is_crosses():
    questions = {synthvqa.ask(SCENE, "count", random.Random(s))[0] for s in range(200)}
    assert "How many crosses are there?" in questions
    assert not any("crosss" in q for q in questions)
    assert "crosses" in synthvqa.vocabulary() and "crosss" not in synthvqa.vocabulary()


def test_spatial_relation_follows_the_coordinates_and_skips_diagonal_pairs():
    asked = _asked("spatial", n=100)
    seen = set()
    for q, a in asked:
        m = re.fullmatch(r"Where is the (\w+ \w+) relative to the (\w+ \w+)\?", q)
        assert m, q
        assert EXPECTED_SPATIAL[(m.group(1), m.group(2))] == a, q
        seen.add(a)
    assert seen == {"left", "right", "above", "below"}


def test_location_answers_the_quadrant_of_the_object():
    asked = _asked("location")
    for q, a in asked:
        m = re.fullmatch(r"Which quadrant of the image is the (\w+ \w+) in\?", q)
        assert m, q
        assert EXPECTED_LOCATION[m.group(1)] == a
    assert {a for _, a in asked} == set(EXPECTED_LOCATION.values())


def test_bottomright_quadrant():
    scene = Scene([Obj("cross", "purple", "small", 95, 95)], "a", (2, 2), {"seed": 0})
    assert synthvqa.ask(scene, "location", random.Random(0)) == (
        "Which quadrant of the image is the purple cross in?", "bottomright")


def test_exists_says_yes_exactly_for_present_colour_shape_pairs():
    asked = _asked("exists", n=100)
    for q, a in asked:
        m = re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", q)
        assert m, q
        assert a == ("yes" if (m.group(1), m.group(2)) in PRESENT else "no"), q
    assert {a for _, a in asked} == {"yes", "no"}


def test_glyph_question_answers_the_scene_glyph():
    assert _asked("glyph", n=3)[0] == ("What character is written on the white tile?", "7")


def test_ask_returns_none_when_no_object_is_unambiguous():
    twins = Scene([Obj("circle", "red", "small", 20, 20), Obj("circle", "red", "small", 90, 90)],
                  "x", (50, 2), {"seed": 0})
    rng = random.Random(0)
    assert synthvqa.ask(twins, "colour", rng) is None
    assert synthvqa.ask(twins, "shape", rng) is None
    assert synthvqa.ask(twins, "spatial", rng) is None  # no uniquely named objects
    assert synthvqa.ask(twins, "location", rng) is None


def test_objects_on_a_midline_have_no_quadrant_and_diagonal_pairs_no_relation():
    half = IMAGE_SIZE // 2
    scene = Scene([Obj("square", "blue", "small", half, 20),
                   Obj("triangle", "green", "small", 20, half)], "e", (90, 90), {"seed": 0})
    rng = random.Random(0)
    assert synthvqa.ask(scene, "location", rng) is None
    assert synthvqa.ask(scene, "spatial", rng) is None


def test_objects_closer_than_12_pixels_have_no_relation():
    scene = Scene([Obj("circle", "blue", "small", 30, 80),
                   Obj("cross", "green", "small", 41, 80)], "e", (90, 10), {"seed": 0})
    assert synthvqa.ask(scene, "spatial", random.Random(0)) is None
    far = Scene([Obj("circle", "blue", "small", 30, 80),
                 Obj("cross", "green", "small", 42, 80)], "e", (90, 10), {"seed": 0})
    assert synthvqa.ask(far, "spatial", random.Random(0))[1] in ("left", "right")


def test_unknown_question_type_is_rejected():
    with pytest.raises(ValueError, match="unknown question type"):
        synthvqa.ask(SCENE, "texture", random.Random(0))


# ----------------------------------------------------------------------------- rendering


def test_rendered_images_are_rgb_and_at_least_112_pixels():
    for i in range(len(QUESTION_TYPES)):
        im = synthvqa.sample(2, i).image
        assert im.mode == "RGB"
        assert min(im.size) >= 112


def _free_mask(scene: Scene) -> np.ndarray:
    """True where neither an object (plus margin) nor the glyph tile is drawn."""
    free = np.ones((IMAGE_SIZE, IMAGE_SIZE), bool)
    for o in scene.objects:
        r = synthvqa.SIZES[o.size] + 2
        free[max(0, o.y - r):o.y + r + 1, max(0, o.x - r):o.x + r + 1] = False
    gx, gy = scene.glyph_xy
    free[gy - 1:gy + 12, gx - 1:gx + 10] = False
    return free


@pytest.mark.parametrize("seed", range(5))
def test_background_is_textured_not_flat(seed):
    scene = synthvqa.random_scene(random.Random(seed))
    arr = np.asarray(synthvqa.render(scene), dtype=np.float32)
    free = _free_mask(scene)
    assert free.sum() > 1000
    bg = arr[free]  # [N, 3]
    assert bg.std(axis=0).min() > 4.0
    # texture everywhere: every 16x16 block that is fully free is itself non-flat
    for y in range(0, IMAGE_SIZE - 16, 16):
        for x in range(0, IMAGE_SIZE - 16, 16):
            if free[y:y + 16, x:x + 16].all():
                assert arr[y:y + 16, x:x + 16].std() > 3.0


def test_objects_are_drawn_in_their_colour_at_their_centre():
    arr = np.asarray(synthvqa.render(SCENE))
    for o in SCENE.objects:
        assert tuple(arr[o.y, o.x]) == COLOURS[o.colour], o
    for shape in SHAPES:
        scene = Scene([Obj(shape, "orange", "large", 30, 30)], "1", (90, 90), {"seed": 1})
        assert tuple(np.asarray(synthvqa.render(scene))[30, 30]) == COLOURS["orange"], shape


def test_glyph_is_drawn_in_black_ink_on_a_white_tile():
    arr = np.asarray(synthvqa.render(SCENE)).astype(int)
    gx, gy = SCENE.glyph_xy
    for row, bits in enumerate(GLYPHS["7"]):
        for col, ch in enumerate(bits):
            px = arr[gy + 2 + row, gx + 2 + col]
            assert (px == 0).all() if ch == "#" else (px == 250).all(), (row, col)


def test_glyph_ink_lies_in_one_grid_cell_and_its_label_is_on_that_patch():
    seen = set()
    for seed in range(100):
        scene = synthvqa.random_scene(random.Random(seed))
        gx, gy = scene.glyph_xy
        seen.add(((gx + 2) % synthvqa.INK_CELL, (gy + 2) % synthvqa.INK_CELL))
        r0, r1 = (gy + 2) // synthvqa.INK_CELL, (gy + 8) // synthvqa.INK_CELL
        c0, c1 = (gx + 2) // synthvqa.INK_CELL, (gx + 6) // synthvqa.INK_CELL
        assert (r0, c0) == (r1, c1), scene.glyph_xy
        lab = synthvqa.patch_labels(scene, synthvqa.INK_CELL)[2]
        assert lab[r0, c0] == 1 + list(GLYPHS).index(scene.glyph)
        assert (lab > 0).sum() == 1
    assert len(seen) == 8  # jitter: 4 column x 2 row offsets inside the cell


def test_glyph_bitmaps_are_5x7_and_distinct():
    for g, rows in GLYPHS.items():
        assert len(rows) == 7 and all(len(r) == 5 for r in rows), g
    assert len({tuple(r) for r in GLYPHS.values()}) == len(GLYPHS)


# ----------------------------------------------------------------------------- scenes


def test_random_scenes_have_3_to_8_non_overlapping_objects_inside_the_image():
    counts = Counter()
    for seed in range(200):
        scene = synthvqa.random_scene(random.Random(seed))
        counts[len(scene.objects)] += 1
        boxes = [(o.x - synthvqa.SIZES[o.size], o.y - synthvqa.SIZES[o.size],
                  o.x + synthvqa.SIZES[o.size], o.y + synthvqa.SIZES[o.size])
                 for o in scene.objects]
        gx, gy = scene.glyph_xy
        boxes.append((gx, gy, gx + 8, gy + 10))
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert x0 >= 0 and y0 >= 0 and x1 < IMAGE_SIZE and y1 < IMAGE_SIZE
            for a0, b0, a1, b1 in boxes[i + 1:]:
                assert x1 < a0 or a1 < x0 or y1 < b0 or b1 < y0, "objects overlap"
        assert scene.glyph in GLYPHS
    assert set(counts) == set(range(3, 9))


def test_question_types_cycle_so_every_type_is_equally_frequent():
    types = [synthvqa.sample(9, i).type for i in range(2 * len(QUESTION_TYPES))]
    assert types == list(QUESTION_TYPES) * 2


# ----------------------------------------------------------------------------- dataset files


def test_write_dataset_writes_pngs_and_a_jsonl_in_calibration_format(tmp_path):
    n = len(QUESTION_TYPES)
    path = synthvqa.write_dataset(tmp_path, n, seed=4)
    assert path == tmp_path / "data.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == n
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        f"{i:05d}.png" for i in range(n)]
    assert not list(tmp_path.glob("*.tmp"))
    types = []
    for i, line in enumerate(lines):
        rec = json.loads(line)
        assert set(rec) == {"image", "prompt", "answer", "type"}
        assert rec["prompt"].count("<image>") == 1
        s = synthvqa.sample(4, i)
        assert (rec["prompt"], rec["answer"], rec["type"]) == (s.prompt, s.answer, s.type)
        with Image.open(tmp_path / rec["image"]) as im:
            assert im.format == "PNG"
            assert im.convert("RGB").tobytes() == s.image.tobytes()  # lossless
        types.append(rec["type"])
    assert Counter(types) == Counter(QUESTION_TYPES)


@pytest.fixture(scope="module")
def tokenizer():
    _, vocab = synth_llava.make_config()
    return synth_llava.make_processor(vocab).tokenizer


def test_every_prompt_and_answer_word_is_in_the_tokenizer_vocabulary(tokenizer):
    unk = tokenizer.unk_token_id
    assert unk == 1
    for i in range(140):
        s = synthvqa.sample(1, i)
        ids = tokenizer(s.prompt)["input_ids"] + tokenizer(s.answer)["input_ids"]
        assert unk not in ids, (s.question, s.answer)
    assert unk in tokenizer("zebra")["input_ids"]  # the check above can fail


def test_every_possible_answer_is_a_single_known_token(tokenizer):
    answers = ([*SHAPES, *COLOURS, *synthvqa.QUADRANTS, *synthvqa.RELATIONS, *GLYPHS,
                *synthvqa.COUNT_WORDS, "yes", "no"])
    for a in answers:
        ids = tokenizer(" " + a, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, a
    assert len({tokenizer.convert_tokens_to_ids(a) for a in answers}) == len(set(answers))
