"""ToMe in the vision tower (merge_vision) against an independent re-implementation of the
official rule (facebookresearch/ToMe at af95e4b, tome/merge.py and tome/patch/timm.py), written
here on the HF CLIP layers with eager softmax attention and source tracking; then the LLM on
the merged tokens, the cost model against FlopCounterMode, refusals, and ONNX export.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from artifacts import plan_json
from helpers import build_tiny_qwen, record_modules, single_sample
from vlmopt.passes import merge_vision as mv
from vlmopt.passes import select_visual as sv

import vlmopt
from vlmopt import emit, inputs
from vlmopt.api import apply_plan
from vlmopt.data import synthvqa
from vlmopt.data.dataset import load_records
from vlmopt.ir.capture import capture, complete_inputs
from vlmopt.pipeline import run_passes

# ------------------------------------------------------------- the official rule, re-written


def _official_tome(tower, pixel_values, n_layers: int, rs: list[int], prop_attn=True):
    """ToMeBlock / ToMeAttention on the HF CLIP layers for one image: (features [N', Dv] in
    ToMe's order with CLS dropped, each token's source patches, each token's surviving patch)."""
    vm = getattr(tower, "vision_model", tower)
    with torch.no_grad():
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))[0]  # [N, Dv]
        size = torch.ones(x.shape[0], 1)
        sources = [{i - 1} for i in range(x.shape[0])]  # CLS: {-1}
        ids = list(range(-1, x.shape[0] - 1))
        for layer, r in zip(vm.encoder.layers[:n_layers], rs):
            a = layer.self_attn
            h = layer.layer_norm1(x)
            N, H = h.shape[0], a.num_heads
            q, k, v = (p(h).view(N, H, -1).transpose(0, 1) for p in (a.q_proj, a.k_proj,
                                                                    a.v_proj))
            logits = (q @ k.transpose(1, 2)) * a.scale
            if prop_attn:
                logits = logits + size.log()[:, 0][None, None, :]
            o = (logits.softmax(-1) @ v).transpose(0, 1).reshape(N, -1)
            x = x + a.out_proj(o)
            metric = k.mean(0)
            r = min(r, (N - 1) // 2)
            if r > 0:
                m = metric / metric.norm(dim=-1, keepdim=True)
                scores = m[::2] @ m[1::2].T
                scores[0, :] = -math.inf
                node_max, node_idx = scores.max(dim=-1)
                edge = torch.sort(node_max, descending=True, stable=True).indices
                unm, src = sorted(edge[r:].tolist()), edge[:r].tolist()
                na = (N + 1) // 2
                xs, ss = x * size, size.clone()
                new_x = [xs[2 * i] for i in unm] + [xs[2 * j + 1].clone() for j in range(N // 2)]
                new_s = [ss[2 * i] for i in unm] + [ss[2 * j + 1].clone() for j in range(N // 2)]
                new_src = [set(sources[2 * i]) for i in unm] + [set(sources[2 * j + 1])
                                                                for j in range(N // 2)]
                new_ids = [ids[2 * i] for i in unm] + [ids[2 * j + 1] for j in range(N // 2)]
                for i in src:
                    d = len(unm) + int(node_idx[i])
                    new_x[d] = new_x[d] + xs[2 * i]
                    new_s[d] = new_s[d] + ss[2 * i]
                    new_src[d] |= sources[2 * i]
                assert na - r == len(unm)
                size = torch.stack(new_s)
                x = torch.stack(new_x) / size
                sources, ids = new_src, new_ids
            x = x + layer.mlp(layer.layer_norm2(x))
    return x[1:], sources[1:], ids[1:]


@pytest.fixture(scope="module")
def synth():
    lm = vlmopt.load("builtin:synth-llava")
    samples = [synthvqa.sample(5, i) for i in range(3)]
    batch = inputs.encode(lm.processor, [s.prompt for s in samples], [s.image for s in samples])
    return lm, complete_inputs(batch)


def _layers_run(model) -> int:
    n = model.config.vision_config.num_hidden_layers
    return model.config.vision_feature_layer % (n + 1)


@pytest.mark.parametrize("cfg,prop", [(mv.tome(r=30), True), (mv.tome(r=[60, 0, 25]), True),
                                      (mv.tome(r=40, prop_attn=False), False)])
def test_merged_tokens_are_the_official_rule_on_synth_llava(synth, cfg, prop):
    lm, batch = synth
    model = lm.model
    f = _layers_run(model)
    gm, rep = run_passes(capture(model), [("merge_vision", cfg)], example=batch)
    rs = rep[0]["stats"]["r_per_layer"]
    feats, anchors = record_modules(gm, batch, {"vision_tome"})["vision_tome"][1]
    for b in range(batch["input_ids"].shape[0]):
        want, sources, ids = _official_tome(model.model.vision_tower,
                                            batch["pixel_values"][b:b + 1], f, rs, prop)
        assert feats.shape[1] == len(want) == 196 - sum(rs)
        assert sorted(ids) == anchors[b].tolist()  # each token sits at its surviving patch
        order = np.argsort(ids)
        torch.testing.assert_close(feats[b], want[order], rtol=1e-4, atol=1e-5)
        assert sorted(p for s in sources for p in s) == list(range(196))  # a partition


def test_llm_sees_the_projected_merged_tokens_in_patch_order(synth):
    lm, batch = synth
    model = lm.model
    one = single_sample(batch, 1)
    gm, rep = run_passes(capture(model), [("merge_vision", mv.tome(keep=64))], example=batch)
    rs = rep[0]["stats"]["r_per_layer"]
    want, _, ids = _official_tome(model.model.vision_tower, one["pixel_values"],
                                  _layers_run(model), rs)
    ids_ = one["input_ids"][0]
    vis = torch.nonzero(ids_ == model.config.image_token_id)[:, 0]
    with torch.no_grad():
        emb = model.get_input_embeddings()(one["input_ids"]).clone()
        proj = model.model.multi_modal_projector(want[np.argsort(ids)][None])[0]
        slots = vis[sorted(ids)]
        emb[0, slots] = proj.to(emb.dtype)
        keep = torch.sort(torch.cat([torch.nonzero(ids_ != model.config.image_token_id)[:, 0],
                                     slots])).values
        out = model.model.language_model(inputs_embeds=emb[:, keep])  # position_ids=None
        ref = model.lm_head(out.last_hidden_state)[0, -1]
        got = gm(**one)[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_keep_target_spreads_r_under_the_half_cap():
    from vlmopt.passes.merge_vision import schedule

    assert schedule(mv.tome(keep=64), 3, 196) == [44, 44, 44]
    assert schedule(mv.tome(keep=49), 2, 196) == [98, 49]  # every layer at its cap
    assert sum(schedule(mv.tome(keep=128), 23, 576)) == 448
    with pytest.raises(ValueError, match="field 'keep'=48 is out of ToMe's reach"):
        schedule(mv.tome(keep=48), 2, 196)
    assert schedule(mv.tome(r=200), 2, 196) == [98, 49]  # official cap: half the tokens


def test_identity_config_is_bit_identical(synth):
    lm, batch = synth
    gm, rep = run_passes(capture(lm.model), [("merge_vision", mv.Config())])
    assert rep[0]["changed"] is False
    with torch.no_grad():
        assert torch.equal(gm(**batch), capture(lm.model)(**batch))


def test_merging_keeps_every_text_token_and_the_weights(synth):
    lm, batch = synth
    model = lm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm, _ = run_passes(capture(model), [("merge_vision", mv.tome(keep=100,
                                                                 positions="original"))],
                       example=batch)
    hidden, pos, vis, amask, idx = record_modules(gm, batch, {"keep_visual"})["keep_visual"][1]
    text = batch["input_ids"] != model.config.image_token_id
    for b in range(idx.shape[0]):
        assert set(torch.nonzero(text[b])[:, 0].tolist()) <= set(idx[b].tolist())
        assert int(vis[b].sum()) == 100
        assert torch.equal(pos[b], batch["position_ids"][b][idx[b]])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_preset_and_config_fields():
    c = mv.tome(8)
    assert (c.r, c.prop_attn, c.positions) == (8, True, "contiguous")
    for kw, field in (({"r": -1}, "r"), ({"r": [1, 1.5]}, "r"), ({"keep": -2}, "keep"),
                      ({"prop_attn": 1}, "prop_attn"), ({"positions": "x"}, "positions")):
        with pytest.raises(ValueError, match=f"field '{field}'"):
            mv.Config(**kw)
    with pytest.raises(ValueError, match="exclude each other"):
        mv.Config(r=2, keep=10)


def test_too_long_r_list_is_refused_naming_the_node(synth):
    lm, _ = synth
    with pytest.raises(ValueError, match="merge_vision: node 'vision': field 'r' has 4"):
        run_passes(capture(lm.model), [("merge_vision", mv.tome(r=[1, 1, 1, 1]))])


def test_qwen_vl_is_refused_with_one_clear_error():
    qwen = build_tiny_qwen("qwen2_5_vl")
    with pytest.raises(ValueError, match="merge_vision: node 'vision': ToMe needs a fixed-grid"):
        run_passes(capture(qwen), [("merge_vision", mv.tome(r=2))])


def test_a_selection_after_merging_is_refused(synth):
    lm, _ = synth
    with pytest.raises(Exception, match="already merges tokens"):
        run_passes(capture(lm.model), [("merge_vision", mv.tome(r=10)),
                                       ("select_visual", sv.divprune(30))])


def test_cost_model_counts_the_merged_tower_as_flop_counter_does(synth):
    from vlmopt import api, cost
    from vlmopt.ir.verify import example_shapes

    lm, _ = synth
    gm, _ = run_passes(capture(lm.model), [("merge_vision", mv.tome(r=[60, 0, 25]))])
    measured = cost.measure_graph_breakdown(gm, example_shapes(gm, batch=1, n_text=16))
    f = api.flops(lm, gm, n_text=16)
    assert measured == {k: v for k, v in f["per_node"].items() if v}
    base = api.flops(lm, None, n_text=16)
    assert f["per_node"]["vision"] < base["per_node"]["vision"]
    assert f["visual_tokens_per_layer"] == [196 - 85] * 8
    # LLM ratio: the decoder only (the tower's saving is in the total alone)
    llm = sum(v for k, v in f["per_node"].items() if k.startswith("layer_") or k == "head")
    base_llm = sum(v for k, v in base["per_node"].items() if k.startswith("layer_")
                   or k == "head")
    assert f["llm_ratio"] == pytest.approx(llm / base_llm)


def test_compare_lists_tome_both_ways_on_fixed_grids_only():
    from vlmopt.compare import default_methods

    rows = {m.name: m.steps for m in default_methods(196, 8, None)}
    assert rows["ToMe 98/196 (vision tower)"] == [("merge_vision", {
        "keep": 98, "positions": "contiguous"})]
    assert "ToMe 98/196 (vision tower), original positions" in rows
    assert not any("ToMe" in m.name for m in default_methods(None, 8, None))
    odd = {m.name for m in default_methods(195, 8, None)}
    assert "ToMe 98/195 (vision tower)" in odd  # 97 merges: within one layer's cap


# ------------------------------------------------------------------------------------ export


def test_onnx_runtime_matches_pytorch_on_the_merged_graph(tmp_path):
    from vlmopt.export_graph import PrefillForm

    lm = vlmopt.load("builtin:synth-llava")
    gm = apply_plan(lm, plan_json(lm, [{"name": "merge_vision", "config": {
        "keep": 64, "positions": "contiguous"}}]))
    records = load_records(str(synthvqa.write_dataset(tmp_path / "d", 4, seed=5)))
    batch, _ = emit.calib_batch(lm, gm, records, 4)
    emit.export_prefill(gm, batch, tmp_path / "prefill.onnx")
    sess = ort.InferenceSession(str(tmp_path / "prefill.onnx"),
                                providers=["CPUExecutionProvider"])
    feeds = emit.export_feeds(gm, batch)
    out = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    with torch.no_grad():
        ref = PrefillForm(gm)(**feeds)
    assert out[2].shape == tuple(ref[2].shape)  # the same number of kept tokens
    for a, b in zip(out, ref):
        diff = float(np.abs(a - b.numpy()).max())
        assert diff <= emit.PARITY_ATOL, diff
