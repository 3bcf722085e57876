"""quantize: per-layer weight-only int8/int4 (symmetric, per group) as fake quantization."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model_and_batch
from torch import nn
from vlmopt.passes import freeze_visual as fz
from vlmopt.passes import lowrank_qk as lr
from vlmopt.passes import quantize as qz

from vlmopt import api, cost
from vlmopt.analysis import quantization_sensitivity
from vlmopt.frontend.load import LoadedModel
from vlmopt.ir.capture import capture, decoder_nodes, node_by_block
from vlmopt.ir.lowrank import LowRankLinear
from vlmopt.ir.quant import QuantLinear, quantize_weight, sqnr_db
from vlmopt.ir.verify import example_shapes, verify_graph
from vlmopt.pipeline import make_config, run_passes


@pytest.fixture(scope="module")
def tiny():  # 3 layers, GQA: q/o 32x32, k/v 16x32, gate/up 64x32, down 32x64
    return tiny_model_and_batch(n_layers=3, kv_heads=2, seed=4, data_seed=9)


def _logits(gm, batch):
    with torch.no_grad():
        return gm(**batch)


def _layer(gm, i):
    return gm.get_submodule(decoder_nodes(gm)[i].target).layer


def _decoder_linears(gm):
    return [(f"{i}.{p}", m) for i in range(len(decoder_nodes(gm)))
            for p, m in _layer(gm, i).named_modules() if isinstance(m, nn.Linear)]


def test_identity_config_is_bit_identical(tiny):
    model, batch = tiny
    gm = capture(model)
    g2, rep = run_passes(gm, [("quantize", qz.Config())], example=batch)
    assert rep[0]["changed"] is False
    assert torch.equal(_logits(gm, batch), _logits(g2, batch))


def test_int8_weights_are_near_lossless_and_int4_bounded(tiny):
    model, batch = tiny
    base = capture(model)
    ref = _logits(base, batch)
    sq, kl = {}, {}
    for bits in (8, 4):
        gm, _ = run_passes(base, [("quantize", qz.uniform(bits, group_size=32))], example=batch)
        pairs = zip(_decoder_linears(base), _decoder_linears(gm))
        sq[bits] = min(sqnr_db(a.weight, b.weight) for (_, a), (_, b) in pairs)
        out = _logits(gm, batch)
        kl[bits] = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                            reduction="batchmean").item()
        assert torch.equal(out.argmax(-1), ref.argmax(-1)) or bits == 4
    msg = f"worst weight SQNR int8 {sq[8]:.1f} dB, int4 {sq[4]:.1f} dB; KL {kl}"
    print(msg)
    assert sq[8] > 35 and 15 < sq[4] < sq[8] - 15, msg  # ~6 dB per bit
    assert kl[8] < 1e-4 and kl[4] < 0.05 and kl[8] < kl[4], msg


def test_codes_scales_and_groups_are_exact_with_a_partial_last_group():
    torch.manual_seed(0)
    w = torch.randn(8, 40)
    w[0, :16] = 0  # an all-zero group: scale 0, codes 0, no NaN
    codes, scales, deq = quantize_weight(w, 4, 16)
    assert codes.dtype == torch.int8 and codes.shape == (8, 40)
    assert scales.shape == (8, 3)  # ceil(40 / 16) groups per row, the last one 8 wide
    assert codes.abs().max().item() == 7 and scales[0, 0] == 0
    want = codes.float() * scales.repeat_interleave(16, 1)[:, :40]
    assert torch.equal(deq, want)
    assert torch.allclose(scales[:, 2], w[:, 32:].abs().amax(1) / 7)
    lin = nn.Linear(40, 8)
    q = QuantLinear.from_linear(lin, 8, 16)
    assert (q.bits, q.group_size, q.in_features, q.out_features) == (8, 16, 40, 8)
    assert q.bias is lin.bias and isinstance(q, nn.Linear)
    assert torch.equal(q.weight, q.qweight.float() * q.scales.repeat_interleave(16, 1)[:, :40])
    assert not torch.equal(q.weight, lin.weight)  # the source linear keeps its float weight
    assert cost.matrix_bytes(8, 40, 4, 16, 4, 4) == 8 * 3 * (8 + 4)  # 16 codes x 4 bits + scale
    assert cost.matrix_bytes(8, 40, 0, 16, 4, 4) == 8 * 40 * 4


def test_selectors_bits_meta_and_weight_bytes_bookkeeping(tiny):
    model, _ = tiny
    conf = qz.Config(bits={"_default": 4, "layer_1": 8, "layer_1.mlp.down_proj": 0,
                           "re:layer_2\\.self_attn\\.[qk]_proj": 8, "head": 8}, group_size=16)
    gm, rep = run_passes(capture(model), [("quantize", conf)])
    bits = [decoder_nodes(gm)[i].meta["vlmopt"]["bits"] for i in range(3)]
    assert bits[0] == dict.fromkeys(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                     "mlp.down_proj"], 4)
    assert bits[1]["self_attn.q_proj"] == 8 and "mlp.down_proj" not in bits[1]
    assert bits[2]["self_attn.k_proj"] == 8 and bits[2]["self_attn.v_proj"] == 4
    assert node_by_block(gm, "head").meta["vlmopt"]["bits"] == {"lm_head": 8}
    assert "bits" not in node_by_block(gm, "project").meta["vlmopt"]  # only when named
    assert type(_layer(gm, 1).mlp.down_proj) is nn.Linear
    assert rep[0]["stats"]["bits"]["layer_2.self_attn.q_proj"] == 8
    lm = LoadedModel(model, None, Path("."), "tiny", "sha256:test", True)
    res = api.flops(lm, gm, n_text=16)
    base = api.flops(lm, None, n_text=16)
    assert res["total"] == base["total"]  # weight-only quantization changes bytes, not FLOPs

    def mat(d_out, d_in, b):  # codes packed per 16-wide group + one fp32 scale per group
        return d_out * (d_in // 16) * (16 * b // 8 + 4) if b else d_out * d_in * 4

    shapes = [(32, 32), (16, 32), (16, 32), (32, 32), (64, 32), (64, 32), (32, 64)]
    layer0 = sum(mat(o, i, 4) for o, i in shapes) + 2 * 32 * 4  # + two RMSNorm weights
    assert res["weight_bytes_per_node"]["layer_0"] == layer0
    layer1 = sum(mat(o, i, 8) for o, i in shapes[:6]) + mat(32, 64, 0) + 2 * 32 * 4
    assert res["weight_bytes_per_node"]["layer_1"] == layer1
    assert res["weight_bytes_per_node"]["head"] == mat(77, 32, 8) + 32 * 4
    assert res["original_weight_bytes_total"] == base["weight_bytes_total"]
    drop = base["weight_bytes_total"] - res["weight_bytes_total"]
    assert drop == sum(base["weight_bytes_per_node"][k] - res["weight_bytes_per_node"][k]
                       for k in ("layer_0", "layer_1", "layer_2", "head")) > 0


def test_untouched_modules_are_shared_and_the_model_is_not_modified(tiny):
    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm, _ = run_passes(capture(model), [("quantize", qz.Config(bits={"layer_1": 4}))])
    hf = model.model.language_model.layers
    assert _layer(gm, 0) is hf[0] and _layer(gm, 2) is hf[2]
    assert _layer(gm, 1).input_layernorm is hf[1].input_layernorm
    assert type(hf[1].self_attn.q_proj) is nn.Linear
    assert gm.get_submodule(node_by_block(gm, "head").target).lm_head is model.lm_head
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_frozen_and_low_rank_layers_quantize_too_and_factors_take_their_own_bits(tiny):
    model, batch = tiny
    steps = [("freeze_visual", fz.Config(layers=["layer_1"])),
             ("lowrank_qk", lr.casp(0.5, whiten=False)),
             ("quantize", qz.Config(bits={"_default": 4, "layer_1.self_attn.q_proj": 8,
                                          "layer_1.self_attn.k_proj.1": 2, "project": 8}))]
    gm, rep = run_passes(capture(model), steps, example=batch)
    node = decoder_nodes(gm)[1]
    assert type(gm.get_submodule(node.target)).__name__ == "FrozenDecoder"
    q, k = _layer(gm, 1).self_attn.q_proj, _layer(gm, 1).self_attn.k_proj
    assert isinstance(q, LowRankLinear) and q.verify_factors() is None
    assert [m.bits for m in q] == [8, 8] and [m.bits for m in k] == [4, 2]
    assert node.meta["vlmopt"]["bits"]["self_attn.q_proj.0"] == 8
    assert node.meta["vlmopt"]["q_rank"] == 8  # floor(0.5 * 32 * 32 / 64)
    proj = gm.get_submodule(node_by_block(gm, "project").target).projector
    assert proj.linear_1.bits == proj.linear_2.bits == 8
    verify_graph(gm, example=batch)
    measured = cost.measure_graph_breakdown(gm, example_shapes(gm, batch=1, n_text=16))
    lm = LoadedModel(model, None, Path("."), "tiny", "sha256:test", True)
    analytic = api.flops(lm, gm, n_text=16)
    assert measured["total"] == analytic["total"], (measured, analytic["per_node"])
    wb = analytic["weight_bytes_per_node"]["layer_1"]
    # MatMulNBits' layout: every row padded to whole groups (the rank-5 factor of k: one
    # 64-wide group for 5 columns), group_size * bits / 8 code bytes + one fp32 scale each
    stored = sum(m.scales.numel() * (m.group_size * m.bits // 8 + 4)
                 for m in _layer(gm, 1).modules() if isinstance(m, QuantLinear)) + 2 * 32 * 4
    assert wb == stored


def test_allocation_gives_sensitive_layers_and_q_k_more_bits_within_budget(tiny):
    model, _ = tiny
    gm, _ = run_passes(capture(model), [("lowrank_qk", lr.casp(0.25, whiten=False))])
    all4 = qz.config_bytes(gm, qz.uniform(4, 32))
    all8 = qz.config_bytes(gm, qz.uniform(8, 32))
    budget = (all4 + all8) // 2
    sens = {"layer_0": 5.0, "layer_1": 0.1, "layer_2": 1.0}
    conf = qz.allocate_bits(gm, sens, budget, group_size=32)
    used = qz.config_bytes(gm, conf)
    assert all4 < used <= budget, (all4, used, budget)
    bits = {f"layer_{i}": qz.bits_for(conf, f"layer_{i}.mlp.up_proj") for i in range(3)}
    assert bits["layer_0"] == 8 and bits["layer_1"] == 4, conf  # sensitive first
    assert all(qz.bits_for(conf, f"layer_{i}.self_attn.{p}_proj.0") == 8
               for i in range(3) for p in "qk"), conf  # small factors, boosted: 8 bits
    again = make_config("quantize", json.loads(json.dumps(dataclasses.asdict(conf))))
    assert again == conf
    run_passes(gm, [("quantize", conf)])
    assert qz.allocate_bits(gm, sens, all8, group_size=32) == qz.Config(
        bits={"layer_0": 8, "layer_1": 8, "layer_2": 8}, group_size=32)
    with pytest.raises(ValueError, match="already needs"):
        qz.allocate_bits(gm, sens, all4 - 1, group_size=32)
    with pytest.raises(ValueError, match="no sensitivity for layer_2"):
        qz.allocate_bits(gm, {"layer_0": 1, "layer_1": 1}, all8)


def test_measured_sensitivity_feeds_the_allocator(tiny):
    model, batch = tiny
    gm = capture(model)
    sens = quantization_sensitivity(gm, batch, bits=2, group_size=32)
    assert set(sens) == {"layer_0", "layer_1", "layer_2"} and min(sens.values()) > 0, sens
    budget = qz.config_bytes(gm, qz.uniform(4, 32)) + 1
    conf = qz.allocate_bits(gm, sens, budget, choices=(2, 4), group_size=32)
    assert qz.config_bytes(gm, conf) <= budget


def test_config_round_trips_through_json():
    conf = qz.Config(bits={"_default": 4, "re:layer_[01]": 8, "head": 8,
                           "layer_3.self_attn.q_proj.0": 0}, group_size=128)
    again = make_config("quantize", json.loads(json.dumps(dataclasses.asdict(conf))))
    assert again == conf
    assert qz.uniform(4, 32, head=True) == qz.Config(bits={"_default": 4, "head": 4},
                                                     group_size=32)


@pytest.mark.parametrize("fields, field", [
    ({"bits": {"_default": 16}}, "bits"),
    ({"bits": {"layer_1": True}}, "bits"),
    ({"bits": {"lm_head": 8}}, "bits"),
    ({"bits": {"re:(": 8}}, "bits"),
    ({"bits": [8]}, "bits"),
    ({"group_size": 48}, "group_size"),
    ({"group_size": 0}, "group_size"),
])
def test_bad_fields_are_rejected_naming_the_field(fields, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        qz.Config(**fields)


def test_selector_matching_nothing_is_an_error(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="'layer_9' matches nothing"):
        run_passes(capture(model), [("quantize", qz.Config(bits={"layer_9": 4}))])
    with pytest.raises(ValueError, match="'re:layer_1' matches nothing"):  # full names only
        run_passes(capture(model), [("quantize", qz.Config(bits={"re:layer_1": 4}))])
    with pytest.raises(ValueError, match="'layer_0.mlp' matches nothing"):  # not a linear
        run_passes(capture(model), [("quantize", qz.Config(bits={"layer_0.mlp": 4}))])
    with pytest.raises(ValueError, match="matches nothing"):  # no factors without lowrank_qk
        run_passes(capture(model), [("quantize", qz.Config(bits={
            "layer_0.self_attn.q_proj.0": 4}))])
    assert math.isinf(sqnr_db(torch.ones(3), torch.ones(3)))
