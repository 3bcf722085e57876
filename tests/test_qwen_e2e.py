"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL end to end through the CLI, on tiny random-weight
checkpoints saved with transformers and SynthVQA images of two sizes (196 and 192 tokens)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import QWEN_TYPES, make_tiny_qwen_dir, write_mixed_size_data

from vlmopt.cli import main
from vlmopt.data import synthvqa
from vlmopt.frontend.load import fingerprint, load


@pytest.fixture(scope="module", params=QWEN_TYPES)
def qwen_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = make_tiny_qwen_dir(root / "model", request.param)
    src = synthvqa.write_dataset(root / "synth", 6, seed=5)
    return model, write_mixed_size_data(src, root / "mixed")


def _plan(model, path, passes):
    plan = {"schema": "vlmopt.plan/1", "model": {"name": str(model),
                                                "fingerprint": fingerprint(model)},
            "target": None, "passes": passes}
    path.write_text(json.dumps(plan))
    return path


def _json_out(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_runs_on_images_of_two_sizes(capsys, qwen_dir):
    model, data = qwen_dir
    out = _json_out(capsys, ["eval", str(model), "--data", str(data), "--json",
                             "--batch-size", "4"])
    assert out["n"] == 6 and out["agreement"] == 1.0


def test_analyze_ranks_every_layer(capsys, qwen_dir):
    model, data = qwen_dir
    out = _json_out(capsys, ["analyze", str(model), "--calib", str(data), "--json"])
    lc = out["layer_contribution"]
    assert sorted(lc) == sorted(out["freeze_order"]) == ["layer_0", "layer_1", "layer_2"]
    # the last layer's visual-token updates never reach the last (text) position
    assert lc["layer_2"] == 0.0 and lc["layer_0"] > 0


def test_flops_follow_the_image_size_and_the_plan(capsys, qwen_dir, tmp_path):
    model, _ = qwen_dir
    small = _json_out(capsys, ["flops", str(model), "--image-size", "96x96", "--json"])
    big = _json_out(capsys, ["flops", str(model), "--image-size", "160x128", "--json"])
    assert (small["n_visual"], big["n_visual"]) == (144, 320)
    assert small["image_grids"] == [[1, 24, 24]] and big["image_grids"] == [[1, 32, 40]]
    plan = _plan(model, tmp_path / "p.json",
                 [{"name": "drop_tokens", "config": {"keep": {"layer_1": 0.5}}}])
    cut = _json_out(capsys, ["flops", str(model), "--plan", str(plan), "--image-size", "96x96",
                             "--json"])
    assert cut["visual_tokens_per_layer"] == [144, 72, 72]
    assert cut["llm_ratio"] < 0.75


def test_apply_exports_an_artifact_that_matches_pytorch(capsys, qwen_dir, tmp_path):
    from vlmopt.api import apply_plan
    from vlmopt.artifact_eval import artifact_eval
    from vlmopt.data.dataset import load_records
    from vlmopt.evaluation import record_batches
    from vlmopt.inputs import encode
    from vlmopt.ir.capture import graph_runner

    model, data = qwen_dir
    passes = [{"name": "select_visual", "config": {"method": "visionzip", "keep": 0.5}},
              {"name": "drop_tokens", "config": {"keep": {"layer_1": 0.5}}},
              {"name": "freeze_visual", "config": {"layers": ["layer_2"]}}]
    plan = _plan(model, tmp_path / "p.json", passes)
    out = tmp_path / "art"
    assert main(["apply", str(plan), str(model), "--out", str(out), "--calib", str(data)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image"]["dynamic"] and manifest["parity"]["samples"] == 4
    assert manifest["parity"]["max_abs_logit_diff"] <= 1e-4

    capsys.readouterr()
    rec = load_records(str(data))[1]  # a 96 x 128 image
    assert main(["run", str(out), "--image", str(rec.image), "--prompt", rec.prompt,
                 "--max-new-tokens", "3"]) == 0
    capsys.readouterr()

    # the deployed artifact (ONNX Runtime, torch-free preprocessing) against the PyTorch graph
    runner, processor, _ = artifact_eval(out, str(data))
    lm = load(model)
    graph = graph_runner(apply_plan(lm, plan))
    records = load_records(str(data))
    for chunk in record_batches(records, 4, lm.processor):
        b_art = encode(processor, [r.prompt for r in chunk], [r.load_image() for r in chunk])
        b_pt = encode(lm.processor, [r.prompt for r in chunk], [r.load_image() for r in chunk])
        for k in b_pt:  # the artifact's processor files encode exactly as the checkpoint's
            assert torch.equal(b_art[k], b_pt[k]), k
        diff = np.abs(runner(b_art).numpy() - graph(b_pt).numpy()).max()
        assert diff <= 1e-4, diff


def test_runtime_preprocessing_equals_the_checkpoint_processor(qwen_dir, tmp_path):
    from vlmopt.data.dataset import load_records
    from vlmopt.export_vision import layout_tensors
    from vlmopt.inputs import encode
    from vlmopt.runtime import QwenPreprocessor

    model, data = qwen_dir
    lm = load(model)
    layout = lm.adapter.layout_spec()
    pre = QwenPreprocessor(model, layout)
    for r in load_records(str(data))[:2]:
        feeds = pre.encode([r.prompt], [r.load_image()])
        ref = encode(lm.processor, [r.prompt], [r.load_image()])
        ref.update(layout_tensors(layout, ref.pop("image_grid_thw")))
        assert set(feeds) == set(ref)
        for k, v in ref.items():
            assert np.array_equal(feeds[k], v.numpy()), k


def test_optimize_with_four_trials_meets_the_target_and_exports(capsys, qwen_dir, tmp_path):
    model, data = qwen_dir
    out = tmp_path / "opt"
    assert main(["optimize", str(model), "--target-flops", "0.5", "--calib", str(data),
                 "--trials", "4", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    report = json.loads((out / "report.json").read_text())
    budgets = [v for p in plan["passes"] if p["name"] in ("drop_tokens", "select_visual")
               for v in (p["config"]["keep"].values() if p["name"] == "drop_tokens"
                         else [p["config"]["keep"]])]
    assert plan["passes"]  # 0.5 is out of reach without a rewrite
    assert all(isinstance(v, float) or v == 0 for v in budgets)  # counts follow the image
    assert report["chosen"]["ratio_llm"] <= 0.5 + 1e-9
    sizes = plan["target"]["image_sizes"]  # the calibration images' sizes, with their counts
    assert len(sizes) >= 2 and sum(n for *_, n in sizes) == report["n_calib"]
    capsys.readouterr()
    assert main(["flops", str(model), "--plan", str(out / "plan.json"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["llm_ratio"] == pytest.approx(report["chosen"]["ratio_llm"], rel=1e-12)
    assert res["ratio"] == pytest.approx(report["chosen"]["ratio_total"], rel=1e-12)
    assert json.loads((out / "manifest.json").read_text())["parity"]["max_abs_logit_diff"] \
        <= 1e-4


def test_compare_runs_the_method_table_with_fraction_budgets(capsys, qwen_dir):
    model, data = qwen_dir
    out = _json_out(capsys, ["compare", str(model), "--data", str(data), "--calib", str(data),
                             "--json"])
    rows = {r["method"]: r for r in out["methods"]}
    assert rows["original"]["ratio_total"] == 1.0 and rows["original"]["agreement"] == 1.0
    assert {"FastV K=2 R=50%", "PyramidDrop", "DivPrune 11%", "random 33%"} <= set(rows)
    assert not any(m.startswith("pooling") for m in rows)  # no fixed grid
    # its score recomputes the last ViT block's attention over all patches: on this tiny LLM
    # that costs more than the dropped tokens save (ratio_total > 1), so only its presence
    assert "VisionZip 11% (received attention, dominant only)" in rows
    assert rows["DivPrune 11%"]["ratio_total"] < rows["DivPrune 33%"]["ratio_total"] < 1


def test_whitened_lowrank_and_quantize_use_calibration_images_of_two_sizes(qwen_dir):
    from vlmopt.api import apply_plan
    from vlmopt.api import evaluate as api_evaluate

    model, data = qwen_dir
    lm = load(model)
    passes = [{"name": "lowrank_qk", "config": {"q_ratio": {"_default": 0.5},
                                                "k_ratio": {"_default": 0.5},
                                                "calib": str(data), "calib_samples": 6}},
              {"name": "quantize", "config": {"bits": {"_default": 8}}}]
    plan = {"schema": "vlmopt.plan/1", "model": {"name": lm.name, "fingerprint": lm.fingerprint},
            "target": None, "passes": passes}
    gm = apply_plan(lm, plan)
    stats = {r["pass"]: r["stats"] for r in gm.meta["vlmopt"]["report"]}
    assert stats["lowrank_qk"]["whitened"]
    res = api_evaluate(lm, str(data), graph=gm)
    assert res.n == 6 and res.kl < 0.5
