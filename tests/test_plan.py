"""plan.json: round-trips for every registered pass; every malformed plan names what is wrong."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import vlmopt
from vlmopt import pipeline
from vlmopt.cli import main
from vlmopt.errors import PlanError
from vlmopt.plan import SCHEMA, Plan

EXAMPLES = {  # a non-identity config per pass, to round-trip real content
    "drop_tokens": {"keep": {"layer_1": 50}, "scorer": "text_mean"},
    "freeze_visual": {"layers": ["layer_0", "re:layer_1"]},
    "select_visual": {"method": "divprune", "keep": 49},
}


def _plan_json(passes, fingerprint="sha256:x"):
    return {"schema": SCHEMA, "model": {"name": "m", "fingerprint": fingerprint},
            "target": None, "passes": passes, "provenance": {}}


@pytest.mark.parametrize("name", sorted(pipeline.registry()))
def test_every_registered_pass_round_trips_through_json(name):
    info = pipeline.registry()[name]
    for fields in ({}, EXAMPLES.get(name, {})):
        cfg = pipeline.make_config(name, fields)
        assert cfg == info.config(**fields)
        plan = Plan("m", "sha256:x", [(name, cfg)])
        again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
        assert again.passes == [(name, cfg)]
        assert dataclasses.asdict(again.passes[0][1]) == dataclasses.asdict(cfg)


def test_default_config_of_every_pass_is_the_identity(tiny_llava):
    lm = vlmopt.load(tiny_llava)
    base = vlmopt.capture(lm)
    from vlmopt import inputs
    from vlmopt.data import synthvqa

    s = synthvqa.sample(1, 0)
    batch = inputs.encode(lm.processor, [s.prompt], [s.image])
    for name, info in sorted(pipeline.registry().items()):
        gm, rep = pipeline.run_passes(base, [(name, info.config())], example=batch)
        assert rep[0]["changed"] is False, name
        with torch.no_grad():
            assert torch.equal(base(**batch), gm(**batch)), name


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p["passes"].append({"name": "prune_everything", "config": {}}), "unknown pass"),
    (lambda p: p["passes"].append({"name": "drop_tokens", "config": {"scorer": "oracle"}}),
     "passes\\[0\\].*scorer"),
    (lambda p: p["passes"].append({"name": "drop_tokens", "config": {"kep": {}}}),
     "unknown field 'kep'"),
    (lambda p: p.update(schema="vlmopt.plan/99"), "schema"),
    (lambda p: p.pop("model"), "model"),
    (lambda p: p["passes"].extend([{"name": "freeze_visual", "config": {}},
                                   {"name": "drop_tokens", "config": {}}]),
     "'drop_tokens' must run before pass 'freeze_visual'"),
])
def test_malformed_plans_are_rejected_naming_the_field(mutate, message):
    p = _plan_json([])
    mutate(p)
    with pytest.raises(PlanError, match=message):
        Plan.from_json(p)


def test_plan_for_another_model_is_rejected(tiny_llava, tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan_json([], fingerprint="sha256:someothermodel")))
    code = main(["apply", str(path), str(tiny_llava), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fingerprint" in err[0]
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_apply_writes_plan_graph_and_dumps_after_each_pass(tiny_llava, tmp_path, capsys):
    lm = vlmopt.load(tiny_llava)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan_json(
        [{"name": "drop_tokens", "config": {"keep": {"layer_1": 20}}},
         {"name": "freeze_visual", "config": {"layers": ["layer_1"]}}], lm.fingerprint)))
    out, dump = tmp_path / "out", tmp_path / "dump"
    assert main(["apply", str(path), str(tiny_llava), "--out", str(out),
                 "--dump-dir", str(dump), "--no-onnx"]) == 0  # the ONNX package: test_emit.py
    assert sorted(p.name for p in out.iterdir()) == ["graph.txt", "passes.json", "plan.json"]
    assert Plan.load(out / "plan.json").passes == Plan.load(path).passes
    dumps = sorted(p.name for p in dump.iterdir())
    assert dumps == ["00_captured.txt", "01_drop_tokens.txt", "02_freeze_visual.txt"]
    text = (dump / "02_freeze_visual.txt").read_text()
    assert "drop_1" in text and "frozen_1" in text
    import re

    for line in text.splitlines():  # one line per block: "name = module(args)  # info"
        assert re.fullmatch(r"(input|output) +\w+|\w+ += \w+\([\w, ]*\)(  # .*)?", line), line
    assert "hidden_1" in text and "getitem" not in text
    cost = json.loads((out / "passes.json").read_text())
    assert 0 < cost["ratio_llm"] < cost["ratio_total"] < 1  # the tower's fixed cost in the total


def test_apply_refuses_a_nonempty_out_dir(tiny_llava, tmp_path, capsys):
    lm = vlmopt.load(tiny_llava)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan_json([], lm.fingerprint)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    assert main(["apply", str(path), str(tiny_llava), "--out", str(out)]) == 2
    assert (out / "mine.txt").read_text() == "user data"
    assert "not empty" in capsys.readouterr().err


def test_flops_json_on_config_only_dir_reports_ratio_one_and_a_plan_lowers_it(
        tiny_config_only, tmp_path, capsys):
    assert main(["flops", str(tiny_config_only), "--json", "--prompt-tokens", "10"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["ratio"] == 1.0 and base["n_text"] == 10
    assert base["total"] == sum(v for k, v in base["per_node"].items() if k != "total")
    lm = vlmopt.load(tiny_config_only, device="meta")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan_json(
        [{"name": "drop_tokens", "config": {"keep": {"layer_1": 49}}}], lm.fingerprint)))
    assert main(["flops", str(tiny_config_only), "--plan", str(path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["visual_tokens_per_layer"] == [196, 49]
    assert res["ratio"] < 1.0
    assert res["kv_cache_bytes_per_layer"][1] < res["kv_cache_bytes_per_layer"][0]


def test_analyze_ranks_layers_by_layer_contribution(tiny_llava, tmp_path, capsys):
    from helpers import write_jsonl

    from vlmopt.data import synthvqa

    rows = []
    for i in range(4):
        s = synthvqa.sample(2, i)
        s.image.save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": s.prompt, "answer": s.answer})
    data = write_jsonl(tmp_path / "calib.jsonl", rows)
    assert main(["analyze", str(tiny_llava), "--calib", str(data), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    lc = res["layer_contribution"]
    assert set(lc) == {"layer_0", "layer_1"} and all(v >= 0 for v in lc.values())
    assert res["freeze_order"] == sorted(lc, key=lc.get)


def test_eval_with_a_plan_measures_agreement_against_the_original(tiny_llava, synth_data,
                                                                   tmp_path, capsys):
    lm = vlmopt.load(tiny_llava)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan_json(
        [{"name": "drop_tokens", "config": {"keep": {"layer_1": 5}, "scorer": "random"}}],
        lm.fingerprint)))
    assert main(["eval", str(tiny_llava), "--data", str(synth_data), "--plan", str(path),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["reference"] == "original" and res["plan"] == str(path)
    assert res["kl"] > 0  # dropping 191 of 196 visual tokens moves the distribution


def test_api_functions_stay_callable_after_first_use(tiny_llava, synth_data):
    """Regression: a submodule named like an API function shadowed it after first import."""
    lm = vlmopt.load(tiny_llava)
    first = vlmopt.evaluate(lm, str(synth_data), limit=2)
    again = vlmopt.evaluate(lm, str(synth_data), limit=2)
    assert first.predictions == again.predictions
    assert callable(vlmopt.capture) and callable(vlmopt.flops) and callable(vlmopt.apply_plan)


def test_plan_that_does_not_fit_the_model_is_one_error_line(tiny_llava, tmp_path, capsys):
    lm = vlmopt.load(tiny_llava)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan_json(
        [{"name": "drop_tokens", "config": {"keep": {"layer_20": 5}}}], lm.fingerprint)))
    assert main(["apply", str(path), str(tiny_llava), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layer_20" in err[0] and "drop_tokens" in err[0]
    assert not (tmp_path / "o").exists()
