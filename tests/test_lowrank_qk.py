"""lowrank_qk (CASP): W_q/W_k -> two Linear factors by activation-aware (whitened) SVD."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_model, make_tiny_config, record_modules, tiny_model_and_batch
from torch import nn
from vlmopt.passes import drop_tokens as dt
from vlmopt.passes import freeze_visual as fz
from vlmopt.passes import lowrank_qk as lr

import vlmopt
from vlmopt import api, calib_stats, cost, inputs
from vlmopt.data import synthvqa
from vlmopt.data.dataset import load_records
from vlmopt.errors import VerifyError
from vlmopt.frontend import synth_llava
from vlmopt.frontend.load import LoadedModel
from vlmopt.ir.capture import capture, decoder_nodes
from vlmopt.ir.lowrank import LowRankLinear, factorize
from vlmopt.ir.verify import example_shapes, verify_graph
from vlmopt.ir.weights import replace_submodules
from vlmopt.pipeline import make_config, run_passes


@pytest.fixture(scope="module")
def gqa():  # 3 layers, 4 heads / 2 KV heads: W_q 32x32, W_k 16x32
    return tiny_model_and_batch(n_layers=3, kv_heads=2, seed=4, data_seed=9)


def _attn(gm, layer: int):
    return gm.get_submodule(decoder_nodes(gm)[layer].target).layer.self_attn


def _logits(gm, batch):
    with torch.no_grad():
        return gm(**batch)


def test_identity_config_is_bit_identical_and_needs_no_calibration(gqa):
    model, batch = gqa
    gm = capture(model)  # a bare nn.Module: no source, so whitening would be impossible
    g2, rep = run_passes(gm, [("lowrank_qk", lr.Config())], example=batch)
    assert rep[0]["changed"] is False
    assert torch.equal(_logits(gm, batch), _logits(g2, batch))


def test_full_rank_reproduces_the_logits(gqa):
    model, batch = gqa
    gm = capture(model)
    full, _ = run_passes(gm, [("lowrank_qk", lr.Config(q_rank={"_default": 32},
                                                       k_rank={"_default": 16}, whiten=False))],
                         example=batch)
    err = (_logits(gm, batch) - _logits(full, batch)).abs().max().item()
    assert err <= 1e-4, f"full-rank factors change the logits by {err}"


def test_structure_exact_factor_shapes_params_meta_and_qwen2_bias_on_second_factor():
    model = build_tiny_model(cfg=make_tiny_config("qwen2", kv_heads=2)[0], seed=1)  # 2 layers
    conf = lr.Config(q_rank={"layer_1": 6, "re:layer_\\d": 3}, k_ratio={"layer_0": 0.25},
                     whiten=False)
    gm, rep = run_passes(capture(model), [("lowrank_qk", conf)])
    assert rep[0]["stats"]["q_rank"] == {"layer_0": 3, "layer_1": 6}  # exact name beats regex
    assert rep[0]["stats"]["k_rank"] == {"layer_0": 2}  # floor(0.25 * 16 * 32 / 48) = 2
    orig = model.model.language_model.layers[1].self_attn
    q = _attn(gm, 1).q_proj
    assert isinstance(q, LowRankLinear) and q.verify_factors() is None
    assert q[0].weight.shape == (6, 32) and q[0].bias is None
    assert q[1].weight.shape == (32, 6) and q[1].bias is orig.q_proj.bias  # Qwen2's bias
    assert sum(p.numel() for p in q.parameters()) == 6 * 32 + 32 * 6 + 32
    k0 = _attn(gm, 0).k_proj
    assert (k0[0].weight.shape, k0[1].weight.shape) == ((2, 32), (16, 2))
    assert k0[1].bias.shape == (16,)
    assert _attn(gm, 1).k_proj is orig.k_proj  # no k selector for layer_1: dense, shared
    ranks = [(n.meta["vlmopt"].get("q_rank"), n.meta["vlmopt"].get("k_rank"))
             for n in decoder_nodes(gm)]
    assert ranks == [(3, 2), (6, None)]


def test_untouched_layers_v_o_and_the_original_model_stay_the_same_objects(gqa):
    model, batch = gqa
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm, _ = run_passes(capture(model), [("lowrank_qk", lr.casp(0.25, "layer_1", whiten=False))])
    hf = model.model.language_model.layers
    for i in (0, 2):
        assert gm.get_submodule(decoder_nodes(gm)[i].target).layer is hf[i]
    new, old = _attn(gm, 1), hf[1].self_attn
    assert new is not old and isinstance(old.q_proj, nn.Linear)  # the model is not rewritten
    assert new.v_proj is old.v_proj and new.o_proj is old.o_proj
    assert gm.get_submodule(decoder_nodes(gm)[1].target).layer.mlp is hf[1].mlp
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_verifier_accepts_the_result_and_rejects_a_mis_shaped_factor(gqa):
    model, batch = gqa
    gm, _ = run_passes(capture(model), [("lowrank_qk", lr.casp(0.25, whiten=False))])
    verify_graph(gm, example=batch)
    node = decoder_nodes(gm)[1]
    good = _attn(gm, 1).q_proj  # rank 4: Linear(32 -> 4), Linear(4 -> 32)
    bad = LowRankLinear(nn.Linear(32, 5, bias=False), nn.Linear(4, 32, bias=False), 32, 32)
    broken = replace_submodules(gm.get_submodule(node.target), {"layer.self_attn.q_proj": bad})
    gm.add_submodule("broken", broken)
    node.target = "broken"
    gm.recompile()
    with pytest.raises(VerifyError, match="low-rank factors shaped like the weight.*second"):
        verify_graph(gm, pass_name="lowrank_qk")
    assert good.verify_factors() is None


def _qk_score_error(model, batch, gm) -> float:
    """Relative Frobenius error of the per-head scores q k^T (pre-RoPE, real tokens) of every
    layer, the low-rank graph's projections against the dense ones, on the same inputs."""
    base = capture(model)
    targets = [n.target for n in decoder_nodes(base)]
    rec = record_modules(base, batch, set(targets))
    num = den = 0.0
    with torch.no_grad():
        for i, t in enumerate(targets):
            layer = base.get_submodule(t).layer
            x = layer.input_layernorm(rec[t][0][0])  # [B, T, D]
            dense, low = layer.self_attn, _attn(gm, i)
            for b in range(x.shape[0]):
                xb = x[b][batch["attention_mask"][b].bool()]  # [N, D]

                def scores(a, xb=xb):
                    q = a.q_proj(xb).view(len(xb), 4, 8).transpose(0, 1)  # [H, N, hd]
                    k = a.k_proj(xb).view(len(xb), 2, 8).transpose(0, 1)
                    return q @ k.repeat_interleave(2, 0).transpose(1, 2)  # [H, N, N]

                s, s_low = scores(dense), scores(low)
                num += (s - s_low).pow(2).sum().item()
                den += s.pow(2).sum().item()
    return (num / den) ** 0.5


def test_whitened_svd_beats_plain_svd_on_attention_scores_at_equal_rank(tmp_path):
    model, batch = tiny_model_and_batch(n_layers=2, kv_heads=2, seed=4, data_seed=9, n=4)
    proc = synth_llava.make_processor(make_tiny_config()[1])
    data = synthvqa.write_dataset(tmp_path / "calib", 24, seed=11)
    records = load_records(data)
    base = capture(model)
    covs = calib_stats.input_covariances(base, records, processor=proc)
    assert set(covs) == {f"layer_{i}{m}" for i in (0, 1) for m in ("", ".visual", ".text")}
    assert covs["layer_0"].shape == (32, 32)
    errs = {}
    for whiten in (False, True):
        gm = capture(model)
        for node in decoder_nodes(gm):  # the pass's factorisation, with these statistics
            name = f"layer_{node.meta['vlmopt']['layer']}"
            attn = gm.get_submodule(node.target).layer.self_attn
            cov = calib_stats.whitening_covariance(covs, name) if whiten else None
            node.target = f"lr_{name}"
            gm.add_submodule(node.target, replace_submodules(
                gm.get_submodule(name), {"layer.self_attn.q_proj": factorize(attn.q_proj, 6, cov),
                                         "layer.self_attn.k_proj": factorize(attn.k_proj, 6, cov)}))
        gm.recompile()
        errs[whiten] = _qk_score_error(model, batch, gm)  # held-out samples (data seed 9)
    msg = f"relative q.k^T error at rank 6: plain {errs[False]:.4f}, whitened {errs[True]:.4f}"
    print(msg)
    assert errs[True] < 0.9 * errs[False], msg


def test_modality_statistics_split_the_all_token_moment_and_weight_it_evenly(tmp_path):
    model, _ = tiny_model_and_batch(n_layers=2, kv_heads=2, seed=4, data_seed=9, n=4)
    proc = synth_llava.make_processor(make_tiny_config()[1])
    records = load_records(synthvqa.write_dataset(tmp_path / "calib", 6, seed=3))
    covs = calib_stats.input_covariances(capture(model), records, processor=proc)
    batch = inputs.encode(proc, [r.prompt for r in records], [r.load_image() for r in records])
    real = batch["attention_mask"].bool()
    n_vis = int((real & (batch["input_ids"] == model.config.image_token_index)).sum())
    w = n_vis / int(real.sum())  # the visual share of the calibration tokens
    for name in ("layer_0", "layer_1"):
        vis, text = covs[f"{name}.visual"], covs[f"{name}.text"]
        assert torch.allclose(covs[name], w * vis + (1 - w) * text, atol=1e-5)
        assert not torch.allclose(vis, text, atol=1e-3)
        assert torch.equal(calib_stats.whitening_covariance(covs, name, "token"), covs[name])
        assert torch.allclose(calib_stats.whitening_covariance(covs, name), (vis + text) / 2)
    with pytest.raises(ValueError, match="weighting"):
        calib_stats.whitening_covariance(covs, "layer_0", "tokens")
    with pytest.raises(ValueError, match="field 'weighting'"):
        lr.Config(q_rank={"_default": 4}, weighting="tokens")


def test_pass_rebuilds_whitening_statistics_from_the_plan_alone(tiny_llava, synth_data, tmp_path,
                                                                monkeypatch):
    lm = vlmopt.load(tiny_llava)
    s = synthvqa.sample(1, 0)
    batch = inputs.encode(lm.processor, [s.prompt], [s.image])
    plan = {"schema": "vlmopt.plan/1", "model": {"name": lm.name, "fingerprint": lm.fingerprint},
            "passes": [{"name": "lowrank_qk", "config": {
                "q_ratio": {"_default": 0.5}, "k_ratio": {"_default": 0.5},
                "calib": str(synth_data), "calib_samples": 6}}]}
    gm = api.apply_plan(lm, json.loads(json.dumps(plan)), example=batch)
    assert gm.meta["vlmopt"]["report"][0]["stats"]["whitened"] is True
    assert list((Path(tmp_path) / "vlmopt-cache" / "cov").glob("*.safetensors"))
    calib_stats._MEMORY.clear()
    monkeypatch.setenv("VLMOPT_CACHE", str(tmp_path / "fresh"))  # a fresh machine
    again = api.apply_plan(lm, plan)
    for a, b in zip(gm.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    plain = api.apply_plan(lm, {**plan, "passes": [{"name": "lowrank_qk", "config": {
        **plan["passes"][0]["config"], "whiten": False}}]})
    assert not torch.equal(_attn(plain, 0).q_proj[0].weight, _attn(gm, 0).q_proj[0].weight)


def test_frozen_layers_get_low_rank_q_k_too(gqa):
    model, batch = gqa
    frozen, _ = run_passes(capture(model), [("freeze_visual", fz.Config(layers=["layer_1"]))])
    both, rep = run_passes(capture(model), [
        ("freeze_visual", fz.Config(layers=["layer_1"])),
        ("lowrank_qk", lr.Config(q_rank={"layer_1": 32}, k_rank={"layer_1": 16}, whiten=False))],
        example=batch)
    node = decoder_nodes(both)[1]
    assert node.meta["vlmopt"]["frozen"] and node.meta["vlmopt"]["q_rank"] == 32
    assert type(both.get_submodule(node.target)).__name__ == "FrozenDecoder"
    assert isinstance(_attn(both, 1).q_proj, LowRankLinear)
    err = (_logits(frozen, batch) - _logits(both, batch)).abs().max().item()
    assert err <= 1e-4, err


def test_scorers_stay_dense_and_cost_matches_flopcounter_per_node(gqa):
    model, _ = gqa
    gm, _ = run_passes(capture(model), [
        ("drop_tokens", dt.fastv(1, 0.5, 196)), ("freeze_visual", fz.Config(layers=["layer_2"])),
        ("lowrank_qk", lr.casp(0.25, whiten=False))])
    score = next(m for n, m in gm.named_modules() if n.startswith("score_"))
    assert type(score.layer.self_attn.q_proj) is nn.Linear  # FastV's scores use dense W_q/W_k
    lm = LoadedModel(model, None, Path("."), "tiny", "sha256:test", True)
    measured = cost.measure_graph_breakdown(gm, example_shapes(gm, batch=1, n_text=16))
    analytic = api.flops(lm, gm, n_text=16)
    for node in ("layer_0", "layer_1", "layer_2", "total"):
        assert measured[node] == analytic["per_node"][node], (node, measured, analytic)
    dense = api.flops(lm, run_passes(capture(model), [("drop_tokens", dt.fastv(1, 0.5, 196)), (
        "freeze_visual", fz.Config(layers=["layer_2"]))])[0], n_text=16)
    assert analytic["total"] < dense["total"]
    assert analytic["weight_bytes_total"] < dense["weight_bytes_total"]
    for node in decoder_nodes(gm):  # float32: 4 bytes per parameter of the rewritten layer
        params = gm.get_submodule(node.target).parameters()
        assert analytic["weight_bytes_per_node"][node.name] == 4 * sum(p.numel() for p in params)


def test_config_round_trips_through_json():
    conf = lr.Config(q_rank={"layer_3": 16, "re:layer_[45]": 8}, k_ratio={"_default": 0.25},
                     whiten=False, calib="data.jsonl", calib_samples=8, damp=0.05)
    again = make_config("lowrank_qk", json.loads(json.dumps(dataclasses.asdict(conf))))
    assert again == conf
    assert lr.casp(0.25) == lr.Config(q_ratio={"_default": 0.25}, k_ratio={"_default": 0.25})


@pytest.mark.parametrize("fields, field", [
    ({"q_rank": {"layer_1": 0}}, "q_rank"),
    ({"k_rank": {"layer_1": 2.5}}, "k_rank"),
    ({"q_ratio": {"_default": 1.5}}, "q_ratio"),
    ({"k_ratio": {"3": 0.5}}, "k_ratio"),
    ({"q_rank": {"re:layer_[": 4}}, "q_rank"),
    ({"q_rank": {"layer_1": 4}, "q_ratio": {"layer_2": 0.5}}, "q_ratio"),
    ({"q_rank": [4]}, "q_rank"),
    ({"whiten": "yes"}, "whiten"),
    ({"calib": ""}, "calib"),
    ({"calib_samples": 0}, "calib_samples"),
    ({"damp": -1}, "damp"),
])
def test_bad_fields_are_rejected_naming_the_field(fields, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        lr.Config(**fields)


def test_rank_above_full_rank_and_selectors_matching_nothing_are_errors(gqa):
    model, _ = gqa
    with pytest.raises(ValueError, match="exceeds full rank 16"):
        run_passes(capture(model), [("lowrank_qk", lr.Config(k_rank={"layer_0": 17},
                                                             whiten=False))])
    with pytest.raises(ValueError, match="matches nothing"):
        run_passes(capture(model), [("lowrank_qk", lr.Config(q_rank={"layer_7": 4},
                                                             whiten=False))])
    with pytest.raises(ValueError, match="does not know its checkpoint"):
        run_passes(capture(model), [("lowrank_qk", lr.casp(0.25))])
