"""compare --targets: every method fitted to the same FLOPs target (vlmopt.compare_targets)."""

from __future__ import annotations

import json

import pytest

from vlmopt.compare import Method
from vlmopt.compare_targets import Fitter, at_targets, family_name, scale_steps


def test_scaling_keeps_each_methods_shape():
    pdrop = [("drop_tokens", {"keep": {"layer_8": 288, "layer_16": 144, "layer_24": 72},
                              "score_at": "next"})]
    got = scale_steps(pdrop, 0.5)[0][1]
    assert got["keep"] == {"layer_8": 144, "layer_16": 72, "layer_24": 36}
    assert got["score_at"] == "next" and pdrop[0][1]["keep"]["layer_8"] == 288  # a copy
    zip_ = [("select_visual", {"method": "visionzip", "keep": 64, "contextual": 10})]
    z = scale_steps(zip_, 0.5)[0][1]
    assert (z["keep"], z["contextual"]) == (32, 5)
    # fractions are of what reaches each cut: only the first one scales
    dyn = [("select_visual", {"method": "divprune", "keep": 0.5}),
           ("drop_tokens", {"keep": {"layer_4": 0.5}})]
    d = scale_steps(dyn, 0.5)
    assert d[0][1]["keep"] == 0.25 and d[1][1]["keep"] == {"layer_4": 0.5}
    assert scale_steps([("drop_tokens", {"keep": {"layer_2": 0}})], 3)[0][1]["keep"] == \
        {"layer_2": 0}  # dropping every token stays so
    assert scale_steps(pdrop, 1e-9)[0][1]["keep"]["layer_24"] == 1  # at least one token


def test_family_names_lose_only_the_budget():
    assert family_name("DivPrune 64/576, original positions") == "DivPrune, original positions"
    assert family_name("FastV K=2 R=75%") == "FastV K=2"
    assert family_name("SparseVLM 192/576 schedule") == "SparseVLM"
    assert family_name("VScan 96/576 -> 32/576, original positions") == \
        "VScan, original positions"
    assert family_name("VisionZip 11% (received attention, dominant only)") == \
        "VisionZip (received attention, dominant only)"


@pytest.fixture(scope="module")
def lm(tiny_llava):
    from vlmopt.frontend.load import load

    return load(str(tiny_llava))


METHODS = [
    Method("FastV K=1 R=50%", [("drop_tokens", {"keep": {"layer_1": 8}})]),
    Method("FastV K=1 R=75%", [("drop_tokens", {"keep": {"layer_1": 4}})]),
    Method("DivPrune 4/16", [("select_visual", {"method": "divprune", "keep": 4})]),
    Method("PyramidDrop", [("drop_tokens", {"keep": {"layer_1": 8, "layer_2": 4},
                                            "score_at": "next"})]),
    Method("ShortV 2/3 layers", [("freeze_visual", {"layers": ["layer_1", "layer_2"]})]),
]


def test_each_method_is_the_largest_budget_within_the_target(lm):
    n_visual = lm.adapter.fixed_n_visual()
    f = Fitter(lm, n_text=12, image_sizes=None, n_visual=n_visual)
    for target in (0.5, 0.3):
        rows = {r.name: r for r in at_targets(f, METHODS, [target])[target]}
        assert "FastV K=1" in rows and len([n for n in rows if n.startswith("FastV")]) == 1
        for name, r in rows.items():
            if r.method is None:
                assert r.ratio > target, name  # it really cannot get there
                continue
            assert r.ratio <= target, (name, r.ratio)
            top = max(v for v in _counts(r.method.steps))
            if top < n_visual:  # one more token in its largest budget would not fit
                bigger = scale_steps(r.method.steps, (top + 1) / top)
                assert f.ratio(bigger) > target, name
        assert rows["ShortV 2/3 layers"].method is None  # freezing keeps every token's FLOPs


def _counts(steps):
    for _, fields in steps:
        k = fields.get("keep")
        if isinstance(k, dict):
            yield from k.values()
        elif isinstance(k, int):
            yield k


def test_cli_prints_one_table_per_target(tiny_llava, synth_data, capsys):
    from vlmopt.cli import main

    code = main(["compare", str(tiny_llava), "--data", str(synth_data), "--calib",
                 str(synth_data), "--limit", "3", "--batch-size", "3", "--targets", "0.3",
                 "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    (table,) = out["targets"]
    assert table["target"] == 0.3 and table["methods"][0]["method"] == "original"
    rows = table["methods"][1:]
    reached = [r for r in rows if not r.get("unreachable")]
    assert len(reached) >= 8
    for r in reached:
        assert r["ratio_llm"] <= 0.3 + 1e-9, r["method"]
    for r in rows:
        if r.get("unreachable"):
            assert r["lowest_ratio_llm"] > 0.3
    assert any(r["published"] for r in rows)  # FastV's / PyramidDrop's paper figures


def test_bad_targets_are_one_error(tiny_llava, capsys):
    from vlmopt.cli import main

    assert main(["compare", str(tiny_llava), "--targets", "0"]) != 0
    assert "--targets" in capsys.readouterr().err
    assert main(["compare", str(tiny_llava), "--ort-latency"]) != 0


def test_ort_latency_times_every_exportable_plan(lm, synth_data):
    from vlmopt import compare_targets
    from vlmopt.data.dataset import load_records

    records = load_records(str(synth_data), limit=3)
    tables = compare_targets.run(lm, records, METHODS[:3], [0.5], batch_size=3, ort=True,
                                 repeats=1)
    for r in tables[0.5]:
        if not r.get("unreachable"):
            assert r["ort_latency_ms"] > 0 and r["ort_latency_ratio"] > 0, r["method"]
