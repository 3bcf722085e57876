"""Emit: export forms, ONNX graphs, parity with PyTorch, manifest, quantized decode graphs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from artifacts import OPTIMIZED, build, plan_json
from helpers import tiny_model_and_batch

from vlmopt import emit as emit_mod
from vlmopt import inputs
from vlmopt.api import apply_plan
from vlmopt.data.dataset import load_records
from vlmopt.emit import check_parity, decision_margins, emit, torch_generate
from vlmopt.errors import VlmoptError
from vlmopt.export_graph import DecodeForm, PrefillForm
from vlmopt.ir.capture import capture, complete_inputs
from vlmopt.pipeline import make_config, run_passes
from vlmopt.runtime import Artifact, sha256


@pytest.fixture(scope="module")
def arts(tmp_path_factory, tiny_llava, loaded_tiny, synth_data):
    return build(tmp_path_factory, tiny_llava, loaded_tiny, synth_data)


@pytest.fixture(scope="module")
def other_batch(loaded_tiny, synth_data):
    """Samples the parity check at emit did not see (left-padded, different lengths)."""
    recs = load_records(str(synth_data))[4:8]
    b = inputs.encode(loaded_tiny.processor, [r.prompt for r in recs],
                      [r.load_image() for r in recs])
    return complete_inputs(b)


@pytest.mark.parametrize("passes", [[], OPTIMIZED], ids=["identity", "optimized"])
def test_export_form_reproduces_the_block_graph_logits(passes):
    model, batch = tiny_model_and_batch(n_layers=2)
    gm = capture(model)
    steps = [(p["name"], make_config(p["name"], p["config"])) for p in passes]
    gm, _ = run_passes(gm, steps)
    inp = complete_inputs(batch)
    with torch.no_grad():
        ref = gm(**inp)
        out = PrefillForm(gm)(**inp)
    diff = (out[0] - ref).abs().max().item()
    assert diff <= 1e-5, f"export form vs graph logits: max abs diff {diff}"
    T = inp["input_ids"].shape[1]
    lengths = [k.shape[2] for k in out[2::3]]
    expect = [T] * 2 if not passes else [T - 196 + 100, T - 196 + 40]
    assert lengths == expect  # each layer's cache has that layer's own length
    assert torch.equal(out[1], inp["position_ids"][:, -1:] + 1)


def test_decode_step_equals_full_recompute_of_the_original_model():
    model, batch = tiny_model_and_batch(n_layers=2, kv_heads=2)  # GQA
    gm = capture(model)
    inp = complete_inputs(batch)
    with torch.no_grad():
        out = PrefillForm(gm)(**inp)
        tok = out[0].argmax(-1, keepdim=True)
        step = DecodeForm(gm)(tok, out[1], list(out[2:]))
        ids = torch.cat([inp["input_ids"], tok], 1)
        am = torch.cat([inp["attention_mask"], torch.ones_like(tok)], 1)
        full = model(input_ids=ids, attention_mask=am, pixel_values=inp["pixel_values"],
                     position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    diff = (step[0] - full).abs().max().item()
    assert diff <= 1e-5, f"decode step vs HF recompute: max abs diff {diff}"


@pytest.mark.parametrize("name", ["identity", "optimized"])
def test_onnx_runtime_matches_pytorch_on_unseen_samples(arts, name, other_batch):
    a = arts[name]
    assert a.manifest["parity"]["max_abs_logit_diff"] <= 1e-4
    art = Artifact(a.dir)
    feeds = {k: v.numpy() for k, v in other_batch.items()}
    o_tok, o_steps = art.generate_ids(feeds, 4)
    t_tok, t_steps = torch_generate(a.gm, other_batch, 4, art.manifest["tokens"]["eos_token_id"])
    diff = max(float(np.abs(x - y).max()) for x, y in zip(o_steps, t_steps))
    assert diff <= 1e-4, f"ORT vs PyTorch logits: max abs diff {diff}"
    assert np.array_equal(o_tok, t_tok), (o_tok, t_tok)


def test_manifest_names_graphs_kv_lengths_and_checksums(arts):
    a = arts["optimized"]
    m = json.loads((a.dir / "manifest.json").read_text())
    assert m["opset"] >= 18 and m["kv"]["n_visual_per_layer"] == [100, 40]
    assert m["kv"]["length_per_layer"] == ["n_text + 100", "n_text + 40"]
    pre = [i["name"] for i in m["graphs"]["prefill"]["inputs"]]
    assert pre == ["input_ids", "pixel_values", "attention_mask", "position_ids"]
    dec = [i["name"] for i in m["graphs"]["decode"]["inputs"]]
    assert dec[:2] == ["input_ids", "position_ids"] and "past.1.key" in dec
    assert {"onnx/prefill.onnx", "onnx/decode.onnx", "processor/tokenizer.json"} <= set(m["files"])
    for rel, info in m["files"].items():
        assert sha256(a.dir / rel) == info["sha256"], rel
    g = onnx.load(str(a.dir / "onnx/prefill.onnx"))
    ops = {n.op_type for n in g.graph.node}
    assert "TopK" in ops and ("GatherElements" in ops or "Gather" in ops)  # drops in the graph
    assert any(o.domain in ("", "ai.onnx") and o.version >= 18 for o in g.opset_import)


def test_emit_fails_loudly_naming_the_sample_and_the_diff(arts, other_batch):
    art = Artifact(arts["identity"].dir)
    with pytest.raises(VlmoptError, match=r"sample 0 .*diff"):
        check_parity(art, arts["optimized"].gm, other_batch, ["a.png", "b.png", "c.png", "d.png"])


def test_a_divprune_plan_exports_and_parity_reports_selection_margins(
        loaded_tiny, synth_data, tmp_path, other_batch, monkeypatch):
    lm = loaded_tiny
    gm = apply_plan(lm, plan_json(lm, [{"name": "select_visual",
                                        "config": {"method": "divprune", "keep": 40}}]))
    m = decision_margins(gm, other_batch)
    assert m.shape == (4,) and np.isfinite(m).all() and (m >= 0).all()
    assert np.isinf(decision_margins(apply_plan(lm, plan_json(lm, [])), other_batch)).all()
    out = tmp_path / "dp"
    out.mkdir()
    manifest = emit(lm, gm, out, load_records(str(synth_data)), parity_samples=4)
    par = manifest["parity"]
    assert par["tie_flips"] < par["samples"] and par["max_abs_logit_diff"] <= par["atol"]
    assert "min_selection_margin" in par
    # a mismatch is a tie flip only where a pick was a near-tie; else an error
    wrong = Artifact(out)  # the divprune artifact against another graph: every sample differs
    other = apply_plan(lm, plan_json(lm, [{"name": "select_visual",
                                           "config": {"method": "divprune", "keep": 20}}]))
    monkeypatch.setattr(emit_mod, "PARITY_MARGIN", -1.0)  # no sample counts as a near-tie
    with pytest.raises(VlmoptError, match="parity failed on sample 0"):
        check_parity(wrong, other, other_batch, ["a", "b", "c", "d"])
    monkeypatch.setattr(emit_mod, "PARITY_MARGIN", float("inf"))  # every sample a near-tie
    with pytest.raises(VlmoptError, match="could not be checked"):
        check_parity(wrong, other, other_batch, ["a", "b", "c", "d"])


@pytest.mark.parametrize("mode,op,min_agree", [("int8", "DynamicQuantizeMatMul", 0.75),
                                               ("int4", "MatMulNBits", 0.5)])
def test_quantized_decode_graph_runs_and_mostly_agrees(arts, tmp_path, other_batch, mode, op,
                                                       min_agree):
    from vlmopt.bench import quantized_copy

    src = arts["optimized"].dir
    q = quantized_copy(src, tmp_path / mode, mode)
    ops = {n.op_type for n in onnx.load(str(q / "onnx/decode.onnx")).graph.node}
    assert op in ops or "MatMulInteger" in ops, ops
    base, quant = Artifact(src), Artifact(q)
    feeds = {k: v.numpy() for k, v in other_batch.items()}
    out = base.run_prefill(feeds)
    agree, rel = [], []
    for _ in range(4):  # teacher-forced on the fp32 tokens: per-step top-1 agreement
        tok = out[0].argmax(-1)[:, None]
        a = base.step(tok, out[1], out[2:])
        b = quant.step(tok, out[1], out[2:])
        agree += (a[0].argmax(-1) == b[0].argmax(-1)).tolist()
        rel.append(float(np.linalg.norm(a[0] - b[0]) / np.linalg.norm(a[0])))
        out = a
    print(f"{mode}: top-1 agreement {np.mean(agree):.3f}, relative logit error {max(rel):.3f}")
    assert np.mean(agree) >= min_agree and max(rel) < 0.5


def test_eval_of_an_artifact_is_the_onnx_package_accuracy(arts, synth_data, loaded_tiny,
                                                          capsys):
    from vlmopt.cli import main
    from vlmopt.evaluation import evaluate

    a = arts["optimized"]
    assert main(["eval", str(a.dir), "--data", str(synth_data), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    ref = evaluate(lambda b: a.gm(**complete_inputs(b)).float(),
                   load_records(str(synth_data)), loaded_tiny.processor)
    assert res["n"] == ref.n and res["per_type"] == ref.per_type
    assert res["model"] == str(a.dir)


def test_apply_writes_plan_graphs_manifest_and_processor(arts):
    d = arts["identity"].dir
    names = sorted(p.name for p in d.iterdir())
    assert names == ["graph.txt", "manifest.json", "onnx", "passes.json", "plan.json",
                     "processor"]
    assert (d / "processor" / "tokenizer.json").is_file()
    assert arts["identity"].manifest["parity"]["samples"] == 4


def test_apply_refuses_a_bad_quantize_mode_and_writes_nothing(tiny_llava, loaded_tiny,
                                                              tmp_path, capsys):
    from vlmopt.cli import main

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(plan_json(loaded_tiny, [])))
    with pytest.raises(SystemExit):
        main(["apply", str(plan), str(tiny_llava), "--out", str(tmp_path / "o"),
              "--quantize", "int3"])
    assert not (tmp_path / "o").exists()


def test_emit_refuses_an_unexportable_decoder(loaded_tiny, tmp_path):
    from vlmopt.emit import emit

    gm = apply_plan(loaded_tiny, plan_json(loaded_tiny, []))
    gm.get_submodule("layer_0").layer = torch.nn.Identity()
    with pytest.raises(VlmoptError, match="layer_0"):
        emit(loaded_tiny, gm, tmp_path, [])
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_lowrank_and_quantize_pass_linears_export_as_matmulnbits_with_parity(
        loaded_tiny, synth_data, tmp_path):
    from vlmopt.emit import emit

    passes = [{"name": "drop_tokens", "config": {"keep": {"layer_1": 50}}},
              {"name": "freeze_visual", "config": {"layers": ["layer_1"]}},
              {"name": "lowrank_qk", "config": {"q_rank": {"_default": 4},
                                                "k_rank": {"layer_1": 8}, "whiten": False}},
              {"name": "quantize", "config": {"bits": {"layer_0": 4, "layer_1": 8},
                                              "group_size": 16}}]
    gm = apply_plan(loaded_tiny, plan_json(loaded_tiny, passes))
    m = emit(loaded_tiny, gm, tmp_path, load_records(str(synth_data))[:2], parity_samples=2)
    # layer_0: q factors (2), k, v, o, gate, up, down; layer_1 (frozen): q and k factors (4),
    # v, o, gate, up, down - in both graphs; parity held at emit
    assert m["matmul_nbits_from_quantize_pass"] == {"prefill": 17, "decode": 17}
    assert m["parity"]["max_abs_logit_diff"] <= 1e-4
    for g in ("prefill", "decode"):
        nodes = onnx.load(str(tmp_path / f"onnx/{g}.onnx")).graph.node
        bits = sorted(a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute
                      if a.name == "bits")
        assert bits == [4] * 8 + [8] * 9


def test_bench_default_plan_is_the_largest_keep_under_the_flops_target(loaded_tiny):
    from vlmopt.api import flops
    from vlmopt.bench import drop_plan

    plan = drop_plan(loaded_tiny, 0.8, 1, n_text=32)
    keep = plan["passes"][0]["config"]["keep"]["layer_1"]

    def ratio(k):
        p = {**plan, "passes": [{"name": "drop_tokens", "config": {"keep": {"layer_1": k}}}]}
        return flops(loaded_tiny, apply_plan(loaded_tiny, p), n_text=32)["ratio"]

    assert ratio(keep) <= 0.8 < ratio(keep + 1)
    with pytest.raises(VlmoptError, match="drop-layer"):
        drop_plan(loaded_tiny, 0.1, 1, n_text=32)


def test_bench_interleaves_variants_and_reports_medians():
    from vlmopt.bench import measure

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def prefill(self, batch):
            calls.append(("prefill", self.name))
            return self.name

        def decode(self, state, n):
            calls.append(("decode", self.name, state))

    res = measure({"a": Fake("a"), "b": Fake("b"), "b+q": Fake("b+q")}, {}, repeats=3,
                  n_decode=2)
    assert calls[:4] == [("prefill", "a"), ("prefill", "b"), ("prefill", "a"), ("prefill", "b")]
    assert ("decode", "b+q", "b") in calls  # a quantized decode variant starts from its base
    assert set(res) == {"a", "b", "b+q"} and len(res["a"]["prefill_runs_ms"]) == 3
