"""drop_tokens: identity, structure, faithfulness to FastV / PyramidDrop / text-guided rules."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import record_modules, single_sample, tiny_model_and_batch
from vlmopt.passes import drop_tokens as dt

from vlmopt.errors import VerifyError
from vlmopt.ir.capture import capture, decoder_nodes
from vlmopt.ir.verify import verify_graph
from vlmopt.pipeline import run_passes

N_VIS = 196


@pytest.fixture(scope="module")
def four_layer():
    """A tiny 4-layer LLaVA (random weights) and a 3-sample padded batch."""
    return tiny_model_and_batch(n_layers=4, seed=3)


def _kept_visual_positions(gm, batch, drop_target):
    """Original positions of the visual tokens a drop node keeps, per sample."""
    _, pos, vis, _, _ = record_modules(gm, batch, {drop_target})[drop_target][1]
    return [set(pos[b][vis[b]].tolist()) for b in range(pos.shape[0])]


def _eager_attentions(model, batch):
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    with torch.no_grad():
        return m(**batch, output_attentions=True).attentions  # per layer [B, H, T, T]


def _reference_topk(att_row, batch, b, keep, image_id):
    """Top-``keep`` visual positions by a [T] score row of sample b."""
    vis = batch["input_ids"][b] == image_id
    score = att_row.masked_fill(~vis, float("-inf"))
    idx = score.topk(keep).indices
    return set(batch["position_ids"][b][idx].tolist())


def test_identity_config_is_bit_identical(four_layer):
    model, batch = four_layer
    gm = capture(model)
    g2, rep = run_passes(gm, [("drop_tokens", dt.Config())], example=batch)
    assert rep[0]["changed"] is False
    with torch.no_grad():
        assert torch.equal(gm(**batch), g2(**batch))


def test_fastv_keeps_topk_of_eager_last_query_attention_at_layer_k_minus_1(four_layer):
    model, batch = four_layer
    K, keep = 2, 98
    gm, _ = run_passes(capture(model), [("drop_tokens", dt.fastv(K, 0.5, N_VIS))], example=batch)
    kept = _kept_visual_positions(gm, batch, f"drop_{K}")
    att = _eager_attentions(model, batch)[K - 1]  # [B, H, T, T]
    for b in range(att.shape[0]):
        ref = _reference_topk(att[b].mean(0)[-1], batch, b, keep, model.config.image_token_id)
        assert kept[b] == ref, f"sample {b}: {len(kept[b] ^ ref)} positions differ"


def test_pdrop_first_stage_keeps_topk_of_next_layers_attention(four_layer):
    model, batch = four_layer
    gm, _ = run_passes(capture(model), [("drop_tokens", dt.pdrop([1, 3], [0.5, 0.25], N_VIS))],
                       example=batch)
    kept = _kept_visual_positions(gm, batch, "drop_1")
    att = _eager_attentions(model, batch)[1]  # layer 1's own attention, on the uncut sequence
    for b in range(att.shape[0]):
        ref = _reference_topk(att[b].mean(0)[-1], batch, b, 98, model.config.image_token_id)
        assert kept[b] == ref


def test_text_guided_keeps_topk_of_mean_text_query_attention(four_layer):
    model, batch = four_layer
    cfg = dt.Config(keep={"layer_2": 40}, scorer="text_mean")
    gm, _ = run_passes(capture(model), [("drop_tokens", cfg)], example=batch)
    kept = _kept_visual_positions(gm, batch, "drop_2")
    att = _eager_attentions(model, batch)[1]
    image_id = model.config.image_token_id
    for b in range(att.shape[0]):
        text_rows = (batch["input_ids"][b] != image_id) & batch["attention_mask"][b].bool()
        row = att[b].mean(0)[text_rows].mean(0)
        assert kept[b] == _reference_topk(row, batch, b, 40, image_id)


def test_schedule_gives_exact_token_counts_per_layer(four_layer):
    model, batch = four_layer
    gm, rep = run_passes(capture(model), [("drop_tokens", dt.pdrop([1, 2, 3], [0.5, 0.25, 0.1],
                                                                    N_VIS))], example=batch)
    assert [d.meta["vlmopt"]["n_visual"] for d in decoder_nodes(gm)] == [196, 98, 49, 19]
    n_text = batch["input_ids"].shape[1] - N_VIS
    rec = record_modules(gm, batch, {f"layer_{i}" for i in range(4)})
    seen = [rec[f"layer_{i}"][0][0].shape[1] for i in range(4)]
    assert seen == [n_text + v for v in (196, 98, 49, 19)]
    assert rep[0]["stats"]["keep"] == {"layer_1": 98, "layer_2": 49, "layer_3": 19}


@pytest.mark.parametrize("scorer", ["last_query", "text_mean", "random"])
def test_drop_keeps_text_tokens_and_original_positions(four_layer, scorer):
    model, batch = four_layer
    cfg = dt.Config(keep={"layer_1": 30}, scorer=scorer)
    gm, _ = run_passes(capture(model), [("drop_tokens", cfg)], example=batch)  # verify_values
    args = record_modules(gm, batch, {"layer_1"})["layer_1"][0]
    out = {"pos": args[3], "vis": args[4]}
    image_id = model.config.image_token_id
    for b in range(batch["input_ids"].shape[0]):
        text = batch["input_ids"][b] != image_id
        assert out["pos"][b][~out["vis"][b]].tolist() == batch["position_ids"][b][text].tolist()
        assert int(out["vis"][b].sum()) == 30


def test_batched_drop_gives_same_answers_as_single_samples(four_layer):
    model, batch = four_layer
    gm, _ = run_passes(capture(model), [("drop_tokens", dt.fastv(1, 0.75, N_VIS))])
    with torch.no_grad():
        together = gm(**batch)
        for i in range(batch["input_ids"].shape[0]):
            one = single_sample(batch, i)
            alone = gm(**one)
            assert alone.argmax(-1).item() == together[i].argmax().item()
            assert torch.allclose(alone[0], together[i], atol=1e-4)


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="keep"):
        dt.Config(keep={"layer_1": 50, "layer_2": 60})  # increases with depth
    with pytest.raises(ValueError, match="layer_0"):
        dt.Config(keep={"layer_0": 50})  # FastV needs a previous layer
    with pytest.raises(ValueError, match="scorer"):
        dt.Config(scorer="oracle")
    with pytest.raises(ValueError, match="keep"):
        dt.Config(keep={"first": 3})


def test_verifier_rejects_a_drop_that_moves_positions(four_layer):
    model, batch = four_layer
    gm, _ = run_passes(capture(model), [("drop_tokens", dt.fastv(1, 0.5, N_VIS))])
    drop = gm.get_submodule("drop_1")
    orig = drop.forward

    def broken(*args):
        h, p, v, a, idx = orig(*args)
        return h, p + 1000, v, a, idx  # kept tokens get new position ids

    drop.forward = broken
    with pytest.raises(VerifyError, match="positions unchanged.*|text tokens kept"):
        verify_graph(gm, pass_name="drop_tokens", example=batch)


def test_verifier_rejects_a_layer_that_sees_more_tokens_than_before(four_layer):
    model, _ = four_layer
    gm, _ = run_passes(capture(model), [("drop_tokens", dt.fastv(2, 0.5, N_VIS))])
    decs = decoder_nodes(gm)
    # rewire layer_3 to the un-dropped state: the count goes back up after layer_2
    decs[3].args = (decs[1],) + decs[1].args[1:]
    gm.recompile()
    with pytest.raises(VerifyError, match="layer_3|non-increasing|declared"):
        verify_graph(gm, pass_name="drop_tokens")
