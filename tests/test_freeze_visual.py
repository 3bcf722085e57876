"""freeze_visual (ShortV): visual tokens get no update; text tokens get the dense update."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import build_tiny_model, make_tiny_config
from torch import fx
from vlmopt.passes import drop_tokens as dt
from vlmopt.passes import freeze_visual as fz

from vlmopt import api, cost, inputs
from vlmopt.data import synthvqa
from vlmopt.frontend import synth_llava
from vlmopt.frontend.load import LoadedModel
from vlmopt.ir.capture import capture, decoder_nodes
from vlmopt.ir.verify import example_shapes
from vlmopt.pipeline import run_passes

NAMES = ("input_ids", "pixel_values", "attention_mask", "position_ids")


@pytest.fixture(scope="module")
def four_layer():
    cfg, vocab = make_tiny_config(kv_heads=2)  # GQA exercises the K/V head repeat
    cfg.text_config.num_hidden_layers = 4
    model = build_tiny_model(cfg=cfg, seed=4)
    proc = synth_llava.make_processor(vocab)
    samples = [synthvqa.sample(9, i) for i in range(3)]
    batch = inputs.encode(proc, [s.prompt for s in samples], [s.image for s in samples])
    return model, batch


def _layer_io(gm, batch, target):
    io = {}

    class Rec(fx.Interpreter):
        def call_module(self, t, args, kwargs):
            res = super().call_module(t, args, kwargs)
            if t == target:
                io["in"], io["out"], io["vis"], io["am"] = args[0], res, args[4], args[5]
            return res

    with torch.no_grad():
        Rec(gm).run(*(batch[k] for k in NAMES))
    return io


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
            keep = batch["attention_mask"][i].bool()
            one = {k: (v[i:i + 1, keep] if k != "pixel_values" else v[i:i + 1])
                   for k, v in batch.items()}
            assert torch.allclose(gm(**one)[0], together[i], atol=1e-4)
