"""MMTok and VTC-CLS against independent re-implementations of their official rules
(Ironieser/MMTok at d1522cd, mmtok/core/semantic_selector.py; THU-MIG/VTC-CLS at e41ac9b,
llava/model/multimodal_encoder/clip_encoder.py ``cls_token_only``), written here on plain
transformers modules (HF eager attention for VTC-CLS), not with the pass's helpers; then
identity / negative / verifier checks and ONNX export (ONNX Runtime keeps PyTorch's tokens).
"""

from __future__ import annotations

import copy
import json

import onnxruntime as ort
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
    tiny_model_and_batch,
    write_mixed_size_data,
)
from test_select_loop import _check_kept_sets, _torch_kept
from vlmopt.passes import select_visual as sv

import vlmopt
from vlmopt import emit, inputs
from vlmopt.api import apply_plan
from vlmopt.data import synthvqa
from vlmopt.data.dataset import load_records
from vlmopt.errors import VerifyError
from vlmopt.ir.capture import capture, complete_inputs
from vlmopt.ir.tokens import keep_count
from vlmopt.ir.verify import verify_graph
from vlmopt.pipeline import run_passes

# ------------------------------------------------------------- the official rules, re-written

def _official_mmtok(text, embeds, feats, k, alpha=0.5, tv=0.02, vv=0.2) -> list[int]:
    """mm_coverage_selection for one sample: text [m, D], embeds [n, D] (LLM input space),
    feats [n, Dv] (vision features) -> sorted kept indices."""
    def unit(x):
        return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)

    z, x, xc = unit(text).float(), unit(embeds).float(), unit(feats).float()
    m, n = z.shape[0], x.shape[0]
    P = torch.softmax((z @ x.T) * (1.0 / tv), dim=1) / m
    Q = torch.softmax((xc @ xc.T) * (1.0 / vv), dim=1) / n
    combined = torch.cat([P, Q * alpha], dim=0)  # [m + n, n]
    best = torch.zeros(m + n)
    mask = torch.zeros(n)
    picked = []
    for _ in range(min(k, n)):
        delta = (combined - best[:, None]).clamp_min(0).sum(0) + mask
        j = int(torch.argmax(delta))
        picked.append(j)
        best = torch.maximum(best, combined[:, j])
        mask[j] = float("-inf")
    return sorted(picked)


def _official_vtc_cls(tower, pixel_values, feature_layer: int, k: int, start_layer: int):
    """Head-mean CLS row of each layer's eager attention, summed over
    ``attentions[start_layer:f]`` (f: the feature layer's index; the official slice ends at -1,
    which is f for LLaVA-1.5's feature layer -2), top-k, patch order."""
    with torch.no_grad():
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    f = feature_layer % len(out.hidden_states)
    rows = [a[0].mean(0)[0, 1:] for a in out.attentions[start_layer:f]]
    score = torch.sum(torch.stack(rows), dim=0)
    return sorted(torch.topk(score, k).indices.tolist())


def _kept_visual(gm, batch, image_id: int) -> list[list[int]]:
    """Per row, the kept visual tokens as indices among that row's visual slots."""
    idx = record_modules(gm, batch, {"keep_visual"})["keep_visual"][1][4]
    vis = batch["input_ids"] == image_id
    out = []
    for b in range(vis.shape[0]):
        order = torch.cumsum(vis[b], 0) - 1  # slot -> visual index
        out.append(sorted(order[s].item() for s in idx[b].tolist() if vis[b, s]))
    return out


# ------------------------------------------------------------------------ LLaVA: synth-llava

@pytest.fixture(scope="module")
def synth():
    lm = vlmopt.load("builtin:synth-llava")
    samples = [synthvqa.sample(5, i) for i in range(4)]
    batch = inputs.encode(lm.processor, [s.prompt for s in samples], [s.image for s in samples])
    return lm, complete_inputs(batch)


def _llava_official_inputs(model, one):
    """(text embeddings of the prompt's non-visual tokens, projected visual tokens, vision
    features of the feature layer) for a one-sample batch without padding."""
    ids = one["input_ids"][0]
    vis = ids == model.config.image_token_id
    with torch.no_grad():
        text = model.get_input_embeddings()(ids[~vis])
        out = model.model.vision_tower(one["pixel_values"], output_hidden_states=True)
        feats = out.hidden_states[model.config.vision_feature_layer][0, 1:]
        embeds = model.model.multi_modal_projector(feats[None])[0]
    return text, embeds, feats


@pytest.mark.parametrize("keep", [16, 49])
def test_mmtok_kept_set_is_the_official_rule_on_synth_llava(synth, keep):
    lm, batch = synth
    model = lm.model
    gm, _ = run_passes(capture(model), [("select_visual", sv.mmtok(keep))], example=batch)
    got = _kept_visual(gm, batch, model.config.image_token_id)
    for i in range(batch["input_ids"].shape[0]):
        one = single_sample(batch, i)
        want = _official_mmtok(*_llava_official_inputs(model, one), keep)
        assert len(want) == keep
        assert got[i] == want, f"sample {i}: {len(set(got[i]) ^ set(want))} tokens differ"


def test_mmtok_weights_and_temperatures_change_the_set_as_the_official_rule(synth):
    lm, batch = synth
    model = lm.model
    one = single_sample(batch, 0)
    ref = _llava_official_inputs(model, one)
    for kw in ({"alpha": 0.0}, {"alpha": 4.0}, {"tv_temperature": 0.5, "vv_temperature": 0.05}):
        cfg = sv.mmtok(24, **kw)
        gm, _ = run_passes(capture(model), [("select_visual", cfg)], example=one)
        want = _official_mmtok(*ref, 24, alpha=cfg.alpha, tv=cfg.tv_temperature,
                               vv=cfg.vv_temperature)
        assert _kept_visual(gm, one, model.config.image_token_id)[0] == want, kw


@pytest.mark.parametrize("start_layer", [0, 2, -2])
def test_vtc_cls_kept_set_is_the_official_rule_on_synth_llava(synth, start_layer):
    lm, batch = synth
    model = lm.model
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    gm, _ = run_passes(capture(model), [("select_visual", sv.vtc_cls(30, start_layer))],
                       example=batch)
    got = _kept_visual(gm, batch, model.config.image_token_id)
    for i in range(batch["input_ids"].shape[0]):
        want = _official_vtc_cls(eager, batch["pixel_values"][i:i + 1],
                                 model.config.vision_feature_layer, 30, start_layer)
        assert got[i] == want, f"sample {i}"


def test_vtc_cls_layer_set_is_the_official_slice_on_a_layer_minus_2_tower():
    """Feature layer -2 as LLaVA-1.5: the official ``attentions[start_layer:-1]`` verbatim."""
    model, batch = tiny_model_and_batch(vision_layers=4, feature_layer=-2, seed=4)
    model.set_attn_implementation("eager")
    gm, _ = run_passes(capture(model), [("select_visual", sv.vtc_cls(20, start_layer=1))],
                       example=batch)
    got = _kept_visual(gm, batch, model.config.image_token_id)
    for i in range(batch["input_ids"].shape[0]):
        with torch.no_grad():
            out = model.model.vision_tower(batch["pixel_values"][i:i + 1],
                                           output_attentions=True)
        rows = [a[0].mean(0)[0, 1:] for a in out.attentions[1:-1]]  # layers 1 and 2
        want = sorted(torch.topk(torch.stack(rows).sum(0), 20).indices.tolist())
        assert got[i] == want, f"sample {i}"


def test_presets_default_to_the_official_conventions():
    m, v = sv.mmtok(64), sv.vtc_cls(64)
    assert (m.positions, m.alpha, m.tv_temperature, m.vv_temperature) == (
        "contiguous", 0.5, 0.02, 0.2)
    assert (v.positions, v.start_layer) == ("contiguous", 16)


def test_mmtok_runs_the_language_model_on_the_pruned_contiguous_sequence(synth):
    lm, batch = synth
    model = lm.model
    one = single_sample(batch, 1)
    gm, _ = run_passes(capture(model), [("select_visual", sv.mmtok(24))], example=batch)
    ids = one["input_ids"][0]
    vis = ids == model.config.image_token_id
    text, embeds, feats = _llava_official_inputs(model, one)
    chosen = torch.nonzero(vis)[:, 0][_official_mmtok(text, embeds, feats, 24)]
    with torch.no_grad():
        emb = model.get_input_embeddings()(one["input_ids"]).clone()
        emb[0, vis] = embeds.to(emb.dtype)
        keep = torch.sort(torch.cat([torch.nonzero(~vis)[:, 0], chosen])).values
        out = model.model.language_model(inputs_embeds=emb[:, keep])  # position_ids=None
        ref = model.lm_head(out.last_hidden_state)[0, -1]
        got = gm(**one)[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ Qwen2.5-VL (tiny, random)

SAME = [[1, 8, 12], [1, 8, 12]]  # two images of 24 LLM tokens each


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_qwen("qwen2_5_vl")


def test_mmtok_kept_set_is_the_official_rule_on_qwen2_5_vl(qwen):
    """Official Qwen port: merger output as embeddings, the last block's output averaged per
    2x2 group (window order undone) as vision features, tv_temperature 0.01."""
    from transformers import vision_utils as vu

    batch = qwen_batch(qwen, SAME)
    cfg = sv.Config("mmtok", 0.25, tv_temperature=0.01)
    gm, _ = run_passes(capture(qwen), [("select_visual", cfg)], example=batch)
    got = _kept_visual(gm, batch, 60)
    tower = qwen.model.visual
    with torch.no_grad():
        out = tower(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        index, _ = vu.get_vision_window_index(batch["image_grid_thw"], 2, tower.window_size,
                                              tower.patch_size)
        feats = out.last_hidden_state.reshape(-1, 4, out.last_hidden_state.shape[-1]).mean(1)
        feats = feats[torch.argsort(index)]
        emb = qwen.get_input_embeddings()(batch["input_ids"])
    for b in range(2):
        ok = batch["attention_mask"][b].bool() & (batch["input_ids"][b] != 60)
        want = _official_mmtok(emb[b][ok], out.pooler_output[24 * b:24 * (b + 1)],
                               feats[24 * b:24 * (b + 1)], 6, tv=0.01)
        assert got[b] == want, f"sample {b}"


def test_vtc_cls_refuses_cls_free_towers_with_one_clear_error(qwen):
    with pytest.raises(ValueError, match="select_visual: node 'vision': VTC-CLS needs a CLS"):
        run_passes(capture(qwen), [("select_visual", sv.Config("vtc_cls", 0.25))])


# ------------------------------------------------------------- identity, negative, verifier

def test_keep_equal_to_the_visual_count_is_bit_identical(synth):
    lm, batch = synth
    gm, rep = run_passes(capture(lm.model), [("select_visual", sv.Config("mmtok", 1.0))])
    assert rep[0]["changed"] is False
    with torch.no_grad():
        assert torch.equal(gm(**batch), capture(lm.model)(**batch))


@pytest.mark.parametrize("cfg", [sv.mmtok(30, positions="original"),
                                 sv.vtc_cls(30, -8, positions="original")])
def test_selection_keeps_every_text_token_and_leaves_the_tower_untouched(synth, cfg):
    lm, batch = synth
    model = lm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm, _ = run_passes(capture(model), [("select_visual", cfg)], example=batch)
    rec = record_modules(gm, batch, {"keep_visual"})["keep_visual"][1]
    hidden, pos, vis, amask, idx = rec
    text = ~(batch["input_ids"] == model.config.image_token_id)
    for b in range(idx.shape[0]):
        assert set(torch.nonzero(text[b])[:, 0].tolist()) <= set(idx[b].tolist())
        assert int(vis[b].sum()) == 30
        assert torch.equal(pos[b], batch["position_ids"][b][idx[b]])  # original ids kept
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_config_rejects_bad_mmtok_and_vtc_cls_fields():
    for field, bad in (("alpha", -0.1), ("tv_temperature", 0.0), ("vv_temperature", -1.0),
                       ("alpha", float("nan")), ("start_layer", 1.5), ("start_layer", True)):
        with pytest.raises(ValueError, match=f"field '{field}'"):
            sv.Config("mmtok", 10, **{field: bad})


def test_vtc_cls_start_layer_past_the_feature_layer_is_rejected(synth):
    lm, _ = synth
    with pytest.raises(ValueError, match="field 'start_layer'=16 selects no ViT layer"):
        run_passes(capture(lm.model), [("select_visual", sv.vtc_cls(30))])


def test_verifier_rejects_an_mmtok_graph_that_drops_a_text_token(synth):
    lm, batch = synth
    gm, _ = run_passes(capture(lm.model), [("select_visual", sv.mmtok(30, positions="original"))],
                       example=batch)
    keeper = gm.get_submodule("keep_visual")
    orig = keeper.forward

    def drop_text(scores, hidden, pos, visual, amask):  # the last text token -> a dropped one
        idx = orig(scores, hidden, pos, visual, amask)[4]  # [B, T'], static ops only (fake)
        kept = torch.zeros_like(visual).scatter(1, idx, True)
        ar = torch.arange(visual.shape[1]).expand_as(visual)
        last_dropped = torch.where(visual & ~kept, ar, -1).amax(-1, keepdim=True)  # [B, 1]
        idx = torch.cat([idx[:, :-1], last_dropped], 1).sort(-1).values
        return (hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1])),
                pos.gather(1, idx), visual.gather(1, idx), amask.gather(1, idx), idx)

    keeper.forward = drop_text
    with pytest.raises(VerifyError, match="text tokens kept"):
        verify_graph(gm, pass_name="select_visual", example=batch)


@pytest.mark.parametrize("cfg", [sv.mmtok(40), sv.vtc_cls(40, start_layer=0)])
def test_cost_model_counts_the_scorer_as_flop_counter_does(synth, cfg):
    """VTC-CLS: one CLS row per ensemble layer (3 here); MMTok: both cosine matrices."""
    from vlmopt import api, cost
    from vlmopt.ir.verify import example_shapes

    lm, _ = synth
    gm, _ = run_passes(capture(lm.model), [("select_visual", cfg)])
    measured = cost.measure_graph_breakdown(gm, example_shapes(gm, batch=1, n_text=16))
    analytic = api.flops(lm, gm, n_text=16)
    assert measured == {k: v for k, v in analytic["per_node"].items() if v}


# ------------------------------------------------------------------------------------ export

def _export_and_check(lm, passes, tmp_path, name):
    gm = apply_plan(lm, plan_json(lm, passes))
    records = load_records(str(synthvqa.write_dataset(tmp_path / "d", emit.PARITY_SCREEN,
                                                      seed=5)))
    batch, _ = emit.calib_batch(lm, gm, records, 4)
    margins = emit.decision_margins(gm, batch) if emit._margin_modules(gm) else None
    emit.export_prefill(gm, batch, tmp_path / "prefill.onnx")
    sess = ort.InferenceSession(str(tmp_path / "prefill.onnx"),
                                providers=["CPUExecutionProvider"])
    feeds = emit.export_feeds(gm, batch)
    if margins is not None:
        clear = torch.from_numpy(margins >= emit.PARITY_MARGIN)
        print(f"\n{name}: {int(clear.sum())} of {len(clear)} samples with every pick clear "
              f"(min margin {margins.min():.3g})")
        assert int(clear.sum()) >= 2, margins
        feeds = {k: v[clear] for k, v in feeds.items()}
    _check_kept_sets(lm, gm, lambda f: sess.run(None, f), feeds, name)
    return tmp_path / "prefill.onnx"


def test_onnx_runtime_keeps_the_pytorch_mmtok_set_through_one_loop(tmp_path):
    import onnx
    from bench_select_export import count_nodes

    lm = vlmopt.load("builtin:synth-llava")
    path = _export_and_check(lm, [{"name": "select_visual", "config": {
        "method": "mmtok", "keep": 40}}], tmp_path, "mmtok")
    counts = count_nodes(onnx.load(str(path)).graph)
    assert counts["Loop"] == 1, counts


def test_onnx_runtime_keeps_the_pytorch_vtc_cls_set(tmp_path):
    lm = vlmopt.load("builtin:synth-llava")
    _export_and_check(lm, [{"name": "select_visual", "config": {
        "method": "vtc_cls", "keep": 40, "start_layer": -8}}], tmp_path, "vtc_cls")


def test_one_qwen_artifact_selects_mmtok_fractions_like_pytorch(tmp_path):
    """Dynamic resolution: one artifact, two image sizes, the Loop's trip count from the image."""
    from vlmopt.cli import main
    from vlmopt.frontend.load import load
    from vlmopt.runtime import Artifact

    model = make_tiny_qwen_dir(tmp_path / "model", "qwen2_5_vl")
    src = synthvqa.write_dataset(tmp_path / "synth", 6, seed=5)
    data = write_mixed_size_data(src, tmp_path / "mixed", sizes=((112, 112), (160, 128)))
    lm = load(model)
    passes = [{"name": "select_visual", "config": {"method": "mmtok", "keep": 0.25,
                                                   "tv_temperature": 0.01}}]
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
            0.25, n)
        _check_kept_sets(lm, gm, art.run_prefill, feeds, f"{n} visual tokens")
