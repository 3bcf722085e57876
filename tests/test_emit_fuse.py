"""Fused graphs (vlmopt.emit_fuse): valid ONNX, the fused op types they claim, parity with
PyTorch (and with the unfused graphs) on the tiny LLaVA, builtin:synth-llava and Qwen2.5-VL."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from artifacts import build, plan_json
from helpers import BUILTIN_SYNTH_LLAVA, make_tiny_qwen_dir, write_mixed_size_data

from vlmopt.api import apply_plan
from vlmopt.cli import main
from vlmopt.data import synthvqa
from vlmopt.data.dataset import load_records
from vlmopt.emit import PARITY_ATOL, calib_batch, emit, export_feeds
from vlmopt.emit_fuse import check_graph, op_counts
from vlmopt.frontend.load import fingerprint
from vlmopt.runtime import Artifact


@pytest.fixture(scope="module")
def arts(tmp_path_factory, tiny_llava, loaded_tiny, synth_data):
    return build(tmp_path_factory, tiny_llava, loaded_tiny, synth_data)


def _ops(art_dir, graph: str) -> dict:
    path = art_dir / "onnx" / f"{graph}.onnx"
    check_graph(path)  # onnx.checker (contrib ops' schemas are ONNX Runtime's to check)
    return op_counts(path)


def test_emitted_graphs_are_fused_by_default_and_validate(arts):
    a = arts["identity"]  # tiny LLaVA, 2 dense layers
    assert a.manifest["fusion"]["enabled"]
    pre, dec = _ops(a.dir, "prefill"), _ops(a.dir, "decode")
    for ops in (pre, dec):  # per layer: 1 GQA, q and k rotary, 2 skip norms (+ final norm)
        assert ops.get("GroupQueryAttention") == 2, ops
        assert ops.get("SkipSimplifiedLayerNormalization") == 4, ops
        assert ops.get("QuickGelu") == 2, ops  # the MLP's SiLU
        assert "Pow" not in ops and "ReduceMean" not in ops, ops  # no RMSNorm left unfused
    assert dec.get("RotaryEmbedding") == 4 and "Softmax" not in dec and "Neg" not in dec, dec
    assert pre.get("RotaryEmbedding") == 4, pre
    assert pre.get("Attention") == 1, pre  # the vision tower's layer (library fusion)
    assert a.manifest["parity"]["max_abs_logit_diff"] <= PARITY_ATOL


def test_frozen_layer_stays_off_gqa_and_drops_stay_in_the_graph(arts):
    a = arts["optimized"]  # select at layer 0, drop + ShortV frozen at layer 1
    pre = _ops(a.dir, "prefill")
    # layer_1's queries are its text rows only (not causal-aligned): MultiHeadAttention
    assert pre.get("GroupQueryAttention") == 1 and pre.get("MultiHeadAttention") == 1, pre
    assert pre.get("TopK", 0) >= 2, pre  # the selection and the drop, inside the graph
    assert _ops(a.dir, "decode").get("GroupQueryAttention") == 2
    assert a.manifest["parity"]["max_abs_logit_diff"] <= PARITY_ATOL
    assert a.manifest["kv"]["n_visual_per_layer"] == [100, 40]


def test_no_fuse_keeps_plain_graphs_and_fused_logits_match_them(tmp_path, loaded_tiny,
                                                               synth_data, arts):
    lm = loaded_tiny
    gm = apply_plan(lm, plan_json(lm, []))
    plain = tmp_path / "plain"
    plain.mkdir()
    m = emit(lm, gm, plain, load_records(str(synth_data))[:4], parity_samples=2, fuse=False)
    assert m["fusion"] == {"enabled": False}
    ops = _ops(plain, "decode")
    onnx.checker.check_model(str(plain / "onnx" / "decode.onnx"))  # plain ONNX: strict
    assert not {"GroupQueryAttention", "RotaryEmbedding"} & set(ops) and ops["Softmax"] == 2
    recs = load_records(str(synth_data))[4:8]  # unseen, left-padded, different lengths
    batch, _ = calib_batch(lm, gm, recs, 4)
    feeds = {k: v.numpy() for k, v in export_feeds(gm, batch).items()}
    t_plain, s_plain = Artifact(plain).generate_ids(feeds, 4)
    t_fused, s_fused = Artifact(arts["identity"].dir).generate_ids(feeds, 4)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(s_plain, s_fused))
    assert diff <= PARITY_ATOL, f"fused vs unfused logits: max abs diff {diff}"
    assert np.array_equal(t_plain, t_fused)


@pytest.mark.skipif(not (BUILTIN_SYNTH_LLAVA / "model.safetensors").exists(),
                    reason="the built-in checkpoint is not present")
def test_synth_llava_fused_matches_pytorch(tmp_path):
    from vlmopt.frontend.load import load

    lm = load("builtin:synth-llava")
    gm = apply_plan(lm, plan_json(lm, [{"name": "drop_tokens",
                                        "config": {"keep": {"layer_2": 64}}}]))
    m = emit(lm, gm, tmp_path, load_records("builtin:synthvqa-calib", limit=4),
             parity_samples=2)
    n = m["kv"]["n_layers"]
    assert m["fusion"]["fused_ops"]["decode"]["GroupQueryAttention"] == n
    assert m["fusion"]["fused_ops"]["prefill"]["GroupQueryAttention"] == n
    assert m["fusion"]["fused_ops"]["decode"]["RotaryEmbedding"] == 2 * n
    assert m["parity"]["max_abs_logit_diff"] <= PARITY_ATOL, m["parity"]


def test_qwen25_vl_fused_matches_pytorch_and_vision_stays_non_causal(tmp_path):
    model = make_tiny_qwen_dir(tmp_path / "model", "qwen2_5_vl")
    data = write_mixed_size_data(synthvqa.write_dataset(tmp_path / "synth", 6, seed=5),
                                 tmp_path / "mixed")
    plan = {"schema": "vlmopt.plan/1", "model": {"name": str(model),
                                                "fingerprint": fingerprint(model)},
            "target": None, "passes": [{"name": "drop_tokens",
                                        "config": {"keep": {"layer_1": 0.5}}}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "out"
    assert main(["apply", str(tmp_path / "plan.json"), str(model), "--out", str(out),
                 "--calib", str(data)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    n = m["kv"]["n_layers"]
    pre, dec = _ops(out, "prefill"), _ops(out, "decode")
    # M-RoPE on the per-token cache; GQA in the decoder only: the vision tower's windowed,
    # non-causal attention must not become (causal) GroupQueryAttention
    assert pre["GroupQueryAttention"] == dec["GroupQueryAttention"] == n, (pre, dec)
    assert pre.get("MultiHeadAttention", 0) >= 1 and dec["RotaryEmbedding"] == 2 * n
    assert m["parity"]["max_abs_logit_diff"] <= PARITY_ATOL, m["parity"]
