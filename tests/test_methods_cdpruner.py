"""CDPruner against an independent re-implementation of its official rule (Theia-4869/CDPruner
at 9541616, llava/model/llava_arch.py ``encode_images``), written here on plain transformers
modules with the official loop (an einsum over the picks so far, -inf on the chosen), in the
LLM input space vlmopt computes the relevance in; then identity / negative / verifier checks,
the cost model against FlopCounterMode and ONNX export (ONNX Runtime keeps PyTorch's tokens).
"""

from __future__ import annotations

import json

import pytest
import torch
from artifacts import plan_json
from helpers import (
    build_tiny_qwen,
    clearest_per_size,
    make_tiny_qwen_dir,
    qwen_batch,
    record_modules,
    single_sample,
    write_mixed_size_data,
)
from test_methods_mmtok_vtc import _export_and_check, _kept_visual
from test_select_loop import _check_kept_sets, _torch_kept
from vlmopt.passes import select_visual as sv

import vlmopt
from vlmopt import emit, inputs
from vlmopt.api import apply_plan
from vlmopt.data import synthvqa
from vlmopt.errors import VerifyError
from vlmopt.ir.capture import capture, complete_inputs
from vlmopt.ir.tokens import keep_count
from vlmopt.ir.verify import verify_graph
from vlmopt.pipeline import run_passes

# ------------------------------------------------------------- the official rule, re-written


def _official_cdpruner(text, embeds, k: int, negate: bool = True) -> list[int]:
    """encode_images for one image: text [m, D] (the text embeddings standing in for CLIP's
    text segments), embeds [n, D] (the projected visual tokens, also the relevance's image
    side) -> sorted kept indices."""
    x = embeds.float() / embeds.float().norm(dim=-1, keepdim=True)
    similarity = x @ x.T
    q = text.float() / text.float().norm(dim=-1, keepdim=True)
    relevance = x @ q.T  # (N, M)
    relevance = (-relevance if negate else relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    n = kernel.shape[0]
    cis = torch.zeros(k, n)
    di2s = torch.diagonal(kernel).clone()
    picked = []
    for i in range(k):
        j = int(torch.argmax(di2s))
        picked.append(j)
        eis = (kernel[j] - torch.einsum("t,tn->n", cis[:i, j], cis[:i])) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s -= torch.square(eis)
        di2s[j] = -float("inf")
    assert len(set(picked)) == k
    return sorted(picked)


@pytest.fixture(scope="module")
def synth():
    lm = vlmopt.load("builtin:synth-llava")
    samples = [synthvqa.sample(5, i) for i in range(4)]
    batch = inputs.encode(lm.processor, [s.prompt for s in samples], [s.image for s in samples])
    return lm, complete_inputs(batch)


def _llava_inputs(model, one):
    """(LLM embeddings of the prompt's non-visual tokens, projected visual tokens) for a
    one-sample batch without padding."""
    ids = one["input_ids"][0]
    vis = ids == model.config.image_token_id
    with torch.no_grad():
        text = model.get_input_embeddings()(ids[~vis])
        out = model.model.vision_tower(one["pixel_values"], output_hidden_states=True)
        feats = out.hidden_states[model.config.vision_feature_layer][:, 1:]
        embeds = model.model.multi_modal_projector(feats)[0]
    return text, embeds


@pytest.mark.parametrize("keep", [16, 24])
def test_cdpruner_kept_set_is_the_official_rule_on_synth_llava(synth, keep):
    lm, batch = synth
    model = lm.model
    gm, _ = run_passes(capture(model), [("select_visual", sv.cdpruner(keep))], example=batch)
    got = _kept_visual(gm, batch, model.config.image_token_id)
    for i in range(batch["input_ids"].shape[0]):
        want = _official_cdpruner(*_llava_inputs(model, single_sample(batch, i)), keep)
        assert got[i] == want, f"sample {i}: {len(set(got[i]) ^ set(want))} tokens differ"


def test_cdpruner_sign_of_the_relevance_changes_the_set_as_the_official_formula(synth):
    lm, batch = synth
    model = lm.model
    one = single_sample(batch, 2)
    ref = _llava_inputs(model, one)
    sets = []
    for negate in (True, False):
        gm, _ = run_passes(capture(model), [("select_visual", sv.cdpruner(24, negate))],
                           example=one)
        got = _kept_visual(gm, one, model.config.image_token_id)[0]
        assert got == _official_cdpruner(*ref, 24, negate=negate), negate
        sets.append(set(got))
    assert sets[0] != sets[1]  # the relevance really conditions the kernel


def test_relevance_conditions_the_kernel_unlike_plain_dpp(synth):
    """Negative: with the relevance left out (r = 1) the set differs, so the test above checks
    more than a similarity-only DPP."""
    lm, batch = synth
    model = lm.model
    one = single_sample(batch, 0)
    text, embeds = _llava_inputs(model, one)
    x = embeds.float() / embeds.float().norm(dim=-1, keepdim=True)
    gm, _ = run_passes(capture(model), [("select_visual", sv.cdpruner(24))], example=one)
    got = _kept_visual(gm, one, model.config.image_token_id)[0]
    from vlmopt.ir.cdpruner import greedy_map

    plain = torch.nonzero(greedy_map((x @ x.T)[None], 24)[0])[:, 0].tolist()
    assert got != plain


def test_cdpruner_runs_the_language_model_on_the_pruned_contiguous_sequence(synth):
    lm, batch = synth
    model = lm.model
    one = single_sample(batch, 1)
    gm, _ = run_passes(capture(model), [("select_visual", sv.cdpruner(24))], example=batch)
    ids = one["input_ids"][0]
    vis = ids == model.config.image_token_id
    text, embeds = _llava_inputs(model, one)
    chosen = torch.nonzero(vis)[:, 0][_official_cdpruner(text, embeds, 24)]
    with torch.no_grad():
        emb = model.get_input_embeddings()(one["input_ids"]).clone()
        emb[0, vis] = embeds.to(emb.dtype)
        keep = torch.sort(torch.cat([torch.nonzero(~vis)[:, 0], chosen])).values
        out = model.model.language_model(inputs_embeds=emb[:, keep])  # position_ids=None
        ref = model.lm_head(out.last_hidden_state)[0, -1]
        got = gm(**one)[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_a_spent_kernel_stops_the_greedy_and_fills_by_relevance():
    """Rank 2, 5 picks: the official loop would divide by sqrt(<= 0) after two. Here the first
    two are the official picks (fast-map-dpp stops there: gain < 1e-10), and the other three
    are the unchosen tokens of highest relevance (diag L), so 5 distinct tokens come back."""
    from vlmopt.ir.cdpruner import greedy_map

    e = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1], [0.2, 0.8], [0.7, 0.7], [0.5, 0.4]])
    e = e / e.norm(dim=-1, keepdim=True)
    r = torch.tensor([1.0, 0.3, 0.8, 0.9, 0.2, 0.6])
    L = r[:, None] * (e @ e.T) * r[None, :]
    first = [int(torch.argmax(torch.diagonal(L)))]  # 0; then the largest conditional variance
    resid = torch.diagonal(L) - L[first[0]] ** 2 / L[first[0], first[0]]
    resid[first] = -float("inf")
    first.append(int(torch.argmax(resid)))
    fill = [i for i in torch.argsort(r, descending=True).tolist() if i not in first][:3]
    chosen = greedy_map(L[None], 5)[0]
    assert sorted(torch.nonzero(chosen)[:, 0].tolist()) == sorted(first + fill)
    assert torch.nonzero(greedy_map(L[None], 2)[0])[:, 0].tolist() == sorted(first)


def test_preset_defaults_to_the_official_convention():
    c = sv.cdpruner(64)
    assert (c.method, c.positions, c.negate_relevance) == ("cdpruner", "contiguous", True)


def test_compare_lists_cdpruner_on_both_kinds_of_model():
    from vlmopt.compare import default_methods

    rows = {m.name: m.steps for m in default_methods(196, 8, None)}
    assert rows["CDPruner 64/196"] == [("select_visual", {"method": "cdpruner", "keep": 64,
                                                           "positions": "contiguous"})]
    assert "CDPruner 64/196, original positions" in rows
    dyn = {m.name: m.steps for m in default_methods(None, 8, None)}
    assert dyn["CDPruner 33%"] == [("select_visual", {"method": "cdpruner", "keep": 0.33})]


# ------------------------------------------------------------------ Qwen2.5-VL (tiny, random)


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_qwen("qwen2_5_vl")


def test_cdpruner_kept_set_is_the_official_rule_on_qwen2_5_vl(qwen):
    """Merger output as the visual embeddings; fractions of each image's tokens."""
    batch = qwen_batch(qwen, [[1, 8, 12], [1, 8, 12]])
    cfg = sv.Config("cdpruner", 0.25)
    gm, _ = run_passes(capture(qwen), [("select_visual", cfg)], example=batch)
    got = _kept_visual(gm, batch, 60)
    with torch.no_grad():
        out = qwen.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        emb = qwen.get_input_embeddings()(batch["input_ids"])
    for b in range(2):
        ok = batch["attention_mask"][b].bool() & (batch["input_ids"][b] != 60)
        want = _official_cdpruner(emb[b][ok], out.pooler_output[24 * b:24 * (b + 1)], 6)
        assert got[b] == want, f"sample {b}"


def test_cdpruner_contiguous_positions_are_refused_on_m_rope(qwen):
    with pytest.raises(ValueError, match="positions 'contiguous' needs 1-row position ids"):
        run_passes(capture(qwen), [("select_visual", sv.cdpruner(0.25))])


# ------------------------------------------------------------- identity, negative, verifier


def test_keep_equal_to_the_visual_count_is_bit_identical(synth):
    lm, batch = synth
    gm, rep = run_passes(capture(lm.model), [("select_visual", sv.Config("cdpruner", 1.0))])
    assert rep[0]["changed"] is False
    with torch.no_grad():
        assert torch.equal(gm(**batch), capture(lm.model)(**batch))


def test_selection_keeps_every_text_token_and_leaves_the_tower_untouched(synth):
    lm, batch = synth
    model = lm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm, _ = run_passes(capture(model), [("select_visual", sv.cdpruner(30, positions="original"))],
                       example=batch)
    hidden, pos, vis, amask, idx = record_modules(gm, batch, {"keep_visual"})["keep_visual"][1]
    text = ~(batch["input_ids"] == model.config.image_token_id)
    for b in range(idx.shape[0]):
        assert set(torch.nonzero(text[b])[:, 0].tolist()) <= set(idx[b].tolist())
        assert int(vis[b].sum()) == 30
        assert torch.equal(pos[b], batch["position_ids"][b][idx[b]])  # original ids kept
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_config_rejects_a_bad_negate_relevance():
    with pytest.raises(ValueError, match="field 'negate_relevance'"):
        sv.Config("cdpruner", 10, negate_relevance=1)


def test_verifier_rejects_a_cdpruner_graph_that_drops_a_text_token(synth):
    lm, batch = synth
    gm, _ = run_passes(capture(lm.model),
                       [("select_visual", sv.cdpruner(30, positions="original"))], example=batch)
    keeper = gm.get_submodule("keep_visual")
    orig = keeper.forward

    def drop_text(scores, hidden, pos, visual, amask):  # the last text token -> a dropped one
        idx = orig(scores, hidden, pos, visual, amask)[4]
        kept = torch.zeros_like(visual).scatter(1, idx, True)
        ar = torch.arange(visual.shape[1]).expand_as(visual)
        last_dropped = torch.where(visual & ~kept, ar, -1).amax(-1, keepdim=True)
        idx = torch.cat([idx[:, :-1], last_dropped], 1).sort(-1).values
        return (hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1])),
                pos.gather(1, idx), visual.gather(1, idx), amask.gather(1, idx), idx)

    keeper.forward = drop_text
    with pytest.raises(VerifyError, match="text tokens kept"):
        verify_graph(gm, pass_name="select_visual", example=batch)


def test_cost_model_counts_the_kernel_as_flop_counter_does(synth):
    from vlmopt import api, cost
    from vlmopt.ir.verify import example_shapes

    lm, _ = synth
    gm, _ = run_passes(capture(lm.model), [("select_visual", sv.cdpruner(40))])
    measured = cost.measure_graph_breakdown(gm, example_shapes(gm, batch=1, n_text=16))
    analytic = api.flops(lm, gm, n_text=16)
    assert measured == {k: v for k, v in analytic["per_node"].items() if v}
    assert analytic["per_node"]["select_cdpruner"] > 0


# ------------------------------------------------------------------------------------ export


def test_onnx_runtime_keeps_the_pytorch_cdpruner_set_through_one_loop(tmp_path):
    """12 picks: on SynthVQA's flat images the marginal gains fall below the 1e-5 parity margin
    after ~15-30 picks (rounding decides those, on either runtime)."""
    import onnx
    from bench_select_export import count_nodes

    lm = vlmopt.load("builtin:synth-llava")
    path = _export_and_check(lm, [{"name": "select_visual", "config": {
        "method": "cdpruner", "keep": 12}}], tmp_path, "cdpruner")
    counts = count_nodes(onnx.load(str(path)).graph)
    assert counts["Loop"] == 1, counts


def test_one_qwen_artifact_selects_cdpruner_fractions_like_pytorch(tmp_path):
    """Dynamic resolution: one artifact, two image sizes, the Loop's trip count from the image.
    5% (10 of 196, 16 of 320 tokens): the tiny model's 32-wide embeddings spend the kernel
    after ~32 picks, and its last gains before that are rounding-sized."""
    from vlmopt.cli import main
    from vlmopt.frontend.load import load
    from vlmopt.runtime import Artifact

    model = make_tiny_qwen_dir(tmp_path / "model", "qwen2_5_vl")
    src = synthvqa.write_dataset(tmp_path / "synth", 6, seed=5)
    data = write_mixed_size_data(src, tmp_path / "mixed", sizes=((112, 112), (160, 128)))
    lm = load(model)
    passes = [{"name": "select_visual", "config": {"method": "cdpruner", "keep": 0.05,
                                                   "positions": "original"}}]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(plan_json(lm, passes)))
    out = tmp_path / "art"
    assert main(["apply", str(plan), str(model), "--out", str(out), "--calib", str(data)]) == 0
    gm = apply_plan(lm, plan_json(lm, passes))
    art = Artifact(out)
    seen = clearest_per_size(lm, gm, data)
    assert len(seen) == 2, sorted(seen)
    for n, (m, batch) in sorted(seen.items()):
        assert m >= emit.PARITY_MARGIN, f"{n} tokens: no record with a clear margin ({m})"
        feeds = emit.export_feeds(gm, batch)
        assert len(_torch_kept(gm, feeds)[0]) == batch["input_ids"].shape[1] - n + keep_count(
            0.05, n)
        _check_kept_sets(lm, gm, art.run_prefill, feeds, f"{n} visual tokens")
