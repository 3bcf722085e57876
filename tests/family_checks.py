"""Checks every model family passes, on a tiny random-weight checkpoint (tests/test_idefics3.py,
tests/test_internvl.py): identity bit for bit, cost == FlopCounterMode, parameters counted,
apply -> ONNX parity with the torch-free preprocessing equal to the HF processor's, vlmopt run,
a short optimize."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from vlmopt import inputs
from vlmopt.frontend.load import model_shapes
from vlmopt.ir.capture import capture, graph_runner


def images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def batch(lm, sizes):
    prompts = [f"what colour is the shape {'?' * i} <image>" for i in range(len(sizes))]
    return inputs.encode(lm.processor, prompts, images(sizes))


def identity_is_bit_exact(lm, b):
    with torch.no_grad():
        ref = lm.model(**b, logits_to_keep=1).logits[:, -1]
        got = graph_runner(capture(lm))(b)
    assert torch.equal(ref, got)


def cost_matches_flop_counter(lm, size, layers=("layer_0", "layer_1")):
    from vlmopt import cost

    b = batch(lm, [size])
    grids = type(lm.adapter).image_grids(lm.path, lm.config, *size)
    s = model_shapes(lm.config, grids=grids)
    assert s.n_visual == int((b["input_ids"] == lm.adapter.image_token_id).sum())
    n_text = int(b["input_ids"].shape[1]) - s.n_visual
    analytic = cost.prefill_flops(s, cost.baseline_layers(s, n_text))
    measured = cost.measure_prefill_breakdown(lm.model, b, fake=False)
    for k in ("vision", "project", *layers, "head", "total"):
        assert measured[k] == analytic[k], (k, measured, analytic)


def every_parameter_counted(lm):
    from vlmopt import cost

    wb = cost.weight_bytes(model_shapes(lm.config), bytes_per_el=4)
    assert wb["total"] == 4 * sum(p.numel() for p in lm.model.parameters())


def write_plan(lm, path, passes):
    path.write_text(json.dumps({"schema": "vlmopt.plan/1",
                                "model": {"name": str(lm.path), "fingerprint": lm.fingerprint},
                                "passes": passes}))
    return path


def exports_with_parity_and_runs_without_torch(lm, tmp_path, sizes, keys, passes=None):
    """apply ``passes`` (default: DivPrune at a quarter of each image's tokens + a drop after
    layer 0) -> ONNX parity on calibration prompts of two image sizes; the torch-free
    preprocessing gives the HF processor's inputs (``keys``); ``vlmopt run`` answers from ONNX
    Runtime alone."""
    from helpers import write_jsonl

    from vlmopt import runtime
    from vlmopt.cli import main

    rows = []
    for i, im in enumerate(images(sizes)):
        im.save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": "what colour is the shape ? <image>",
                     "answer": "red"})
    calib = write_jsonl(tmp_path / "calib.jsonl", rows)
    plan = write_plan(lm, tmp_path / "plan.json", passes or [
        {"name": "select_visual", "config": {"method": "divprune", "keep": 0.25}},
        {"name": "drop_tokens", "config": {"keep": {"layer_1": 0.5}}}])
    out = tmp_path / "out"
    assert main(["apply", str(plan), str(lm.path), "--out", str(out),
                 "--calib", str(calib)]) == 0
    art = runtime.Artifact(out)
    par = art.manifest["parity"]
    assert par["samples"] == len(sizes) and par["max_abs_logit_diff"] <= 1e-4, par
    pre = runtime.preprocessor(art)
    for r in rows:
        im = Image.open(tmp_path / r["image"])
        mine = pre.encode([r["prompt"]], [im])
        ref = inputs.encode(lm.processor, [r["prompt"]], [im])
        for k in keys:
            assert np.array_equal(mine[k], ref[k].numpy()), k
    text = art.generate(pre, [rows[0]["prompt"]], [tmp_path / "0.png"], max_new_tokens=3)
    assert len(text) == 1 and isinstance(text[0], str)
    return out


def short_optimize_runs(lm, tmp_path):
    from vlmopt.cli import main

    out = tmp_path / "opt"
    assert main(["optimize", str(lm.path), "--target-flops", "0.3",
                 "--calib", "builtin:synthvqa-calib", "--calib-limit", "8",
                 "--eval", "builtin:synthvqa-test", "--eval-limit", "8", "--trials", "3",
                 "--finalists", "1", "--no-emit", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["chosen"]["within_target"] and rep["chosen"]["ratio_llm"] <= 0.3 + 1e-9
