"""Idefics3 / SmolVLM family: tiles + pixel shuffle connector, a Llama decoder (vlmopt.frontend
.idefics3). Tiny random-weight checkpoints built here (tests/helpers_tiles.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_tiles import make_tiny_dir
from PIL import Image

from vlmopt import inputs
from vlmopt.frontend.load import load, model_shapes
from vlmopt.ir.capture import capture, graph_runner

SIZES = [(50, 70), (30, 30), (97, 41)]  # odd sizes: 3x4, 4x4 and 4x2 tiles + the global one


def _images(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def tiny(request, tmp_path_factory):
    return load(make_tiny_dir(tmp_path_factory.mktemp(request.param), request.param))


def _batch(lm, sizes=SIZES):
    prompts = [f"what colour is the shape {'?' * i} <image>" for i in range(len(sizes))]
    return inputs.encode(lm.processor, prompts, _images(sizes))


def test_identity_plan_is_bit_exact_with_padded_tiles(tiny):
    b = _batch(tiny)
    n = b["pixel_values"].shape[1]
    assert (b["pixel_values"][2, n - 1] == 0).all()  # sample 2 has fewer tiles: padding
    with torch.no_grad():
        ref = tiny.model(**b, logits_to_keep=1).logits[:, -1]
        got = graph_runner(capture(tiny))(b)
    assert torch.equal(ref, got)


@pytest.mark.parametrize("size", SIZES)
def test_cost_model_matches_flop_counter(tiny, size):
    from vlmopt import cost

    b = _batch(tiny, [size])
    grids = type(tiny.adapter).image_grids(tiny.path, tiny.config, *size)
    s = model_shapes(tiny.config, grids=grids)
    assert s.n_visual == int((b["input_ids"] == tiny.adapter.image_token_id).sum())
    n_text = int(b["input_ids"].shape[1]) - s.n_visual
    analytic = cost.prefill_flops(s, cost.baseline_layers(s, n_text))
    measured = cost.measure_prefill_breakdown(tiny.model, b, fake=False)
    for k in ("vision", "project", "layer_0", "layer_1", "head", "total"):
        assert measured[k] == analytic[k], (k, measured, analytic)


def test_cost_model_counts_every_parameter(tiny):
    from vlmopt import cost

    wb = cost.weight_bytes(model_shapes(tiny.config), bytes_per_el=4)
    assert wb["total"] == 4 * sum(p.numel() for p in tiny.model.parameters())


# ------------------------------------------------------------------ torch-free preprocessing

ODD = [(50, 70), (30, 30), (97, 41), (7, 300), (129, 128), (32, 32), (33, 31)]


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("size", ODD)
def test_numpy_preprocessing_matches_the_image_processor(tiny, size, split):
    from vlmopt import preprocess_idefics3 as pi

    ip = tiny.processor.image_processor
    cfg = pi.image_config(tiny.path)
    if not split:
        cfg = pi.TileImageConfig(**{**cfg.__dict__, "do_image_splitting": False})
    im = _images([size], seed=sum(size))[0]
    ref = ip(images=[[im]], return_tensors="np", return_row_col_info=True,
             do_image_splitting=split)
    tiles, mask, rows, cols = pi.pixels(im, cfg)
    assert tiles.dtype == np.float32 and np.array_equal(tiles, ref["pixel_values"][0])
    assert np.array_equal(mask, ref["pixel_attention_mask"][0])
    assert (rows, cols) == (ref["rows"][0][0], ref["cols"][0][0])
    assert pi.tiles_for_size(*size, cfg) == len(tiles)


@pytest.mark.parametrize("size", ODD[:4])
def test_image_prompt_is_the_processors(tiny, size):
    from vlmopt import preprocess_idefics3 as pi

    im = _images([size])[0]
    text = "what colour is the shape ? <image>"
    ref = tiny.processor(text=[text], images=[[im]], return_tensors="np")["input_ids"][0]
    _, _, rows, cols = pi.pixels(im, pi.image_config(tiny.path))
    mine = text.replace("<image>", pi.image_prompt(rows, cols, tiny.adapter.tokens_per_tile))
    ids = tiny.processor.tokenizer(mine, return_tensors="np")["input_ids"][0]
    assert np.array_equal(ids, ref)


# ------------------------------------------------------------------ passes, export, runtime

def _plan(lm, path, passes):
    import json

    path.write_text(json.dumps({"schema": "vlmopt.plan/1",
                                "model": {"name": str(lm.path), "fingerprint": lm.fingerprint},
                                "passes": passes}))
    return path


def test_plan_exports_with_parity_and_runs_without_torch(tiny, tmp_path):
    """apply (DivPrune at a quarter of each image's tokens + a drop after layer 0) -> ONNX
    parity on calibration prompts of two image sizes; the torch-free preprocessing gives the
    HF processor's inputs; ``vlmopt run`` answers from ONNX Runtime alone."""
    from helpers import write_jsonl

    from vlmopt import runtime
    from vlmopt.cli import main

    imgs = _images([(50, 70), (97, 41)])
    rows = []
    for i, im in enumerate(imgs):
        im.save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": "what colour is the shape ? <image>",
                     "answer": "red"})
    calib = write_jsonl(tmp_path / "calib.jsonl", rows)
    plan = _plan(tiny, tmp_path / "plan.json", [
        {"name": "select_visual", "config": {"method": "divprune", "keep": 0.25}},
        {"name": "drop_tokens", "config": {"keep": {"layer_1": 0.5}}}])
    out = tmp_path / "out"
    assert main(["apply", str(plan), str(tiny.path), "--out", str(out),
                 "--calib", str(calib)]) == 0
    art = runtime.Artifact(out)
    par = art.manifest["parity"]
    assert par["samples"] == 2 and par["max_abs_logit_diff"] <= 1e-4, par
    pre = runtime.preprocessor(art)
    for r in rows:
        im = Image.open(tmp_path / r["image"])
        mine = pre.encode([r["prompt"]], [im])
        ref = inputs.encode(tiny.processor, [r["prompt"]], [im])
        for k in ("input_ids", "attention_mask", "position_ids", "pixel_values",
                  "pixel_attention_mask"):
            assert np.array_equal(mine[k], ref[k].numpy()), k
    text = art.generate(pre, [rows[0]["prompt"]], [tmp_path / "0.png"], max_new_tokens=3)
    assert len(text) == 1 and isinstance(text[0], str)


def test_short_optimize_runs(tiny, tmp_path):
    from vlmopt.cli import main

    out = tmp_path / "opt"
    assert main(["optimize", str(tiny.path), "--target-flops", "0.3",
                 "--calib", "builtin:synthvqa-calib", "--calib-limit", "8",
                 "--eval", "builtin:synthvqa-test", "--eval-limit", "8", "--trials", "3",
                 "--finalists", "1", "--no-emit", "--out", str(out)]) == 0
    import json

    rep = json.loads((out / "report.json").read_text())
    assert rep["chosen"]["within_target"] and rep["chosen"]["ratio_llm"] <= 0.3 + 1e-9
