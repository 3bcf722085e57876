"""freeze_visual (ShortV): visual tokens get no update; text tokens get the dense update."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import record_modules, single_sample, tiny_model_and_batch
from vlmopt.passes import drop_tokens as dt
from vlmopt.passes import freeze_visual as fz

from vlmopt import api, cost
from vlmopt.frontend.load import LoadedModel
from vlmopt.ir.capture import capture, decoder_nodes
from vlmopt.ir.verify import example_shapes
from vlmopt.pipeline import run_passes

NAMES = ("input_ids", "pixel_values", "attention_mask", "position_ids")


@pytest.fixture(scope="module")
def four_layer():  # GQA (2 KV heads for 4) exercises the K/V head repeat
    return tiny_model_and_batch(n_layers=4, kv_heads=2, seed=4, data_seed=9)


def _layer_io(gm, batch, target):
    args, res = record_modules(gm, batch, {target})[target]
    return {"in": args[0], "out": res, "vis": args[4], "am": args[5]}


def test_identity_config_is_bit_identical(four_layer):
    model, batch = four_layer
    gm = capture(model)
    g2, rep = run_passes(gm, [("freeze_visual", fz.Config())], example=batch)
    assert rep[0]["changed"] is False
    with torch.no_grad():
        assert torch.equal(gm(**batch), g2(**batch))


def test_frozen_layer_passes_visual_tokens_through_and_updates_text_like_dense(four_layer):
    model, batch = four_layer
    dense = capture(model)
    frozen, _ = run_passes(dense, [("freeze_visual", fz.Config(layers=["layer_2"]))],
                           example=batch)
    d = _layer_io(dense, batch, "layer_2")
    f = _layer_io(frozen, batch, "frozen_2")
    assert torch.equal(d["in"], f["in"])  # layers before are untouched
    vis = f["vis"]
    assert torch.equal(f["out"][vis], f["in"][vis]), "visual tokens must get no update"
    real_text = ~vis & f["am"].bool()
    err = (f["out"][real_text] - d["out"][real_text]).abs().max().item()
    assert err < 1e-5, f"text rows differ from the dense layer by {err}"


def test_selectors_pick_exact_names_and_regexes(four_layer):
    model, batch = four_layer
    gm, rep = run_passes(capture(model), [("freeze_visual",
                                           fz.Config(layers=["layer_0", "re:layer_[23]"]))])
    assert rep[0]["stats"]["frozen"] == ["layer_0", "layer_2", "layer_3"]
    assert [bool(n.meta["vlmopt"].get("frozen")) for n in decoder_nodes(gm)] == \
        [True, False, True, True]
    with pytest.raises(ValueError, match="matches no layer"):
        run_passes(capture(model), [("freeze_visual", fz.Config(layers=["layer_9"]))])
    with pytest.raises(ValueError, match="layers"):
        fz.Config(layers=["3"])


def test_frozen_and_dropped_graph_cost_matches_flopcounter(four_layer):
    model, _ = four_layer
    gm, _ = run_passes(capture(model), [("drop_tokens", dt.fastv(1, 0.5, 196)),
                                        ("freeze_visual", fz.Config(layers=["layer_2",
                                                                            "layer_3"]))])

    lm = LoadedModel(model, None, Path("."), "tiny", "sha256:test", True)
    ex = example_shapes(gm, batch=1, n_text=16)
    measured = cost.measure_graph_breakdown(gm, ex)
    analytic = api.flops(lm, gm, n_text=16)
    assert measured["total"] == analytic["total"], (measured, analytic["per_node"])
    assert analytic["ratio"] < 0.7


def test_batched_frozen_graph_gives_same_answers_as_single_samples(four_layer):
    model, batch = four_layer
    gm, _ = run_passes(capture(model), [("freeze_visual", fz.Config(layers=["re:layer_[123]"]))])
    with torch.no_grad():
        together = gm(**batch)
        for i in range(batch["input_ids"].shape[0]):
            one = single_sample(batch, i)
            assert torch.allclose(gm(**one)[0], together[i], atol=1e-4)
