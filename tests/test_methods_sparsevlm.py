"""SparseVLM (drop_tokens scorer "sparsevlm") against an independent re-implementation of the
official rule (Gumpest/SparseVLMs at 26a5f48, v1.0: modelling_sparse_llama.py
``LlamaDynamicvitModel.forward``, score.py ``attn_postprocess_topk``, utils.py
``cluster_and_merge``), written here as a plain layer loop over the HF decoder layers with eager
attention (its probabilities read by a hook), not with the pass's helpers; then structure,
identity, negative, verifier, cost and ONNX Runtime checks.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from artifacts import plan_json
from helpers import build_tiny_qwen, qwen_batch, record_modules, single_sample
from vlmopt.passes import drop_tokens as dt

from vlmopt import cost, inputs
from vlmopt.data import synthvqa
from vlmopt.errors import VerifyError
from vlmopt.ir.capture import capture, complete_inputs, decoder_nodes
from vlmopt.ir.verify import verify_graph
from vlmopt.pipeline import run_passes


@pytest.fixture(scope="module")
def builtin():
    """synth-llava, its eager twin, and 8 samples: SynthVQA prompts (question before the image)
    and the same questions after the image (the official LLaVA-1.5 geometry)."""
    from vlmopt.frontend.load import load

    lm = load("builtin:synth-llava")
    eager = copy.deepcopy(lm.model)
    eager.set_attn_implementation("eager")
    s = [synthvqa.sample(7, i) for i in range(4)]
    prompts = [x.prompt for x in s] + ["<image>\n" + x.prompt.replace("\n<image>", "") for x in s]
    batch = complete_inputs(inputs.encode(lm.processor, prompts, [x.image for x in s] * 2))
    return lm, eager, batch


# ------------------------------------------------------------------ the official rule, re-written

def _cluster_and_merge(x: torch.Tensor, k: int) -> torch.Tensor:
    """utils.cluster_and_merge on one sample x [n, C] (no tie-breaking noise)."""
    n, C = x.shape
    dist = (x[:, None] - x[None]).norm(dim=-1) / C ** 0.5  # [n, n]
    near = torch.topk(dist, k=k, dim=-1, largest=False).values
    density = (-(near ** 2).mean(-1)).exp()
    mask = (density[None, :] > density[:, None]).float()
    dmax = dist.max()
    parent = (dist * mask + dmax * (1 - mask)).min(dim=-1).values
    down = torch.topk(parent * density, k=k).indices
    cluster = dist[down].argmin(dim=0)
    cluster[down] = torch.arange(k)
    out = torch.zeros(k, C)
    count = torch.zeros(k, 1)
    for i in range(n):
        out[cluster[i]] += x[i]
        count[cluster[i]] += 1
    return out / (count + 1e-6)


def _official_sparsevlm(model, one, stages: dict, recycle: bool, image_id: int,
                        positions: str = "contiguous"):
    """Logits at the last token of the official forward on one unpadded sample: raters on the
    input embeddings; after each decoder layer l in ``stages`` ({l: count}) the relevance of
    layer l's eager attention; prune, recycle, renumber positions. Returns (logits, the visual
    indices kept at the first stage)."""
    lm = model.model.language_model
    ids = one["input_ids"][0]
    vis = ids == image_id
    with torch.no_grad():
        out = model(**one, output_hidden_states=True, logits_to_keep=1)
        h = out.hidden_states[0]  # [1, T, D] the LLM input (image features merged)
    start, n = int(vis.nonzero()[0]), int(vis.sum())
    text_start = start + n
    v_t, t_t = h[0, start:text_start], h[0, text_start:]
    assert t_t.shape[0] > 1, "text after the image"
    m = (v_t @ t_t.T).softmax(1).mean(0)  # [n_text]
    raters = torch.where(m > m.mean())[0]  # relative to the text start
    pos = torch.arange(h.shape[1])[None]
    orig_pos = pos.clone()
    first_kept = None
    seen = {}
    hooks = [layer.self_attn.register_forward_hook(
        lambda mod, a, o, i=i: seen.__setitem__(i, o[1])) for i, layer in enumerate(lm.layers)]
    try:
        with torch.no_grad():
            for i, layer in enumerate(lm.layers):
                T = h.shape[1]
                mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
                h = layer(h, attention_mask=mask, position_ids=pos,
                          position_embeddings=lm.rotary_emb(h, pos))
                if i not in stages:
                    continue
                attn = seen[i][0].mean(0)  # [T, T]
                rel = attn[raters + text_start][:, start:text_start].mean(0)  # [n]
                keep = min(stages[i], n - 1)
                top = torch.topk(rel, keep).indices
                kept = torch.zeros(n, dtype=torch.bool)
                kept[top] = True
                if first_kept is None:
                    first_kept = sorted(top.tolist())
                vis_h = h[0, start:text_start]
                parts = [vis_h[kept]]
                vis_pos = orig_pos[0, start:text_start]
                new_pos = [vis_pos[kept]]
                if recycle:
                    pruned = torch.where(~kept)[0]
                    n2 = int(pruned.shape[0] * 0.3) + 1
                    sel = rel[pruned].topk(n2).indices
                    c = int(n2 / 10) + 1
                    parts.append(_cluster_and_merge(vis_h[pruned][sel], c))
                    new_pos.append(vis_pos[-1:].expand(c))
                h = torch.cat([h[0, :start], *parts, h[0, text_start:]])[None]
                orig_pos = torch.cat([orig_pos[0, :start], *new_pos,
                                      orig_pos[0, text_start:]])[None]
                pos = torch.arange(h.shape[1])[None] if positions == "contiguous" else orig_pos
                n = sum(p.shape[0] for p in parts)
                text_start = start + n
    finally:
        for hk in hooks:
            hk.remove()
    return model.lm_head(lm.norm(h))[0, -1], first_kept


def _first_kept(gm, one, k: int, image_id: int, keep: int) -> list[int]:
    """The visual indices the drop before layer k keeps (its first ``keep`` visual outputs;
    the merged tokens follow them)."""
    out = record_modules(gm, one, {f"drop_{k}"})[f"drop_{k}"][1]
    slots = out[4][0][out[2][0]][:keep]
    order = torch.cumsum(one["input_ids"][0] == image_id, 0) - 1
    return sorted(order[s].item() for s in slots.tolist())


@pytest.mark.parametrize("budget,recycle", [(192, 0.3), (64, 0.3), (128, 0.0)])
def test_sparsevlm_matches_the_official_forward_on_the_builtin_model(builtin, budget, recycle):
    lm, eager, batch = builtin
    cfg = dt.sparsevlm(budget, 196, 8, recycle=recycle)
    assert sorted(cfg.keep) == ["layer_1", "layer_3", "layer_5"]  # after layers 0, 2, 4
    gm, _ = run_passes(capture(lm), [("drop_tokens", cfg)], example=batch)
    image_id = lm.model.config.image_token_id
    stages = {int(k.split("_")[1]) - 1: v for k, v in cfg.keep.items()}
    for i in range(4, 8):  # the official geometry: text after the image
        one = single_sample(batch, i)
        ref, kept = _official_sparsevlm(eager, one, stages, recycle > 0, image_id)
        assert _first_kept(gm, one, 1, image_id, cfg.keep["layer_1"]) == kept, f"sample {i}"
        with torch.no_grad():
            got = gm(**one)[0]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-4)


def test_sparsevlm_original_positions_give_merged_tokens_the_image_end(builtin):
    lm, eager, batch = builtin
    cfg = dt.sparsevlm(192, 196, 8, positions="original")
    gm, _ = run_passes(capture(lm), [("drop_tokens", cfg)], example=batch)
    stages = {int(k.split("_")[1]) - 1: v for k, v in cfg.keep.items()}
    one = single_sample(batch, 5)
    ref, _ = _official_sparsevlm(eager, one, stages, True, lm.model.config.image_token_id,
                                 positions="original")
    with torch.no_grad():
        torch.testing.assert_close(gm(**one)[0], ref, rtol=1e-4, atol=2e-4)


def test_a_padded_batch_gives_each_row_its_single_sample_result(builtin):
    lm, _, batch = builtin
    gm, _ = run_passes(capture(lm), [("drop_tokens", dt.sparsevlm(192, 196, 8))])
    with torch.no_grad():
        full = gm(**batch)
        for i in range(batch["input_ids"].shape[0]):
            torch.testing.assert_close(full[i], gm(**single_sample(batch, i))[0],
                                       rtol=1e-4, atol=1e-4)


def test_recycling_counts_are_static_and_follow_the_official_arithmetic(builtin):
    lm, _, batch = builtin
    cfg = dt.sparsevlm(192, 576, 32)  # LLaVA-1.5-7B: 576 -> 300 + 9 -> 200 + 4 -> 110 + 3
    assert cfg.keep == {"layer_3": 300, "layer_7": 200, "layer_16": 110}
    assert cfg.positions == "contiguous" and cfg.recycle == 0.3
    gm, rep = run_passes(capture(lm), [("drop_tokens", dt.sparsevlm(192, 196, 8))],
                         example=batch)
    assert [d.meta["vlmopt"]["n_visual"] for d in decoder_nodes(gm)] == \
        [196, 105, 105, 70, 70, 39, 39, 39]  # 102 + 3, 68 + 2, 37 + 2
    assert rep[0]["stats"]["merged"] == {"layer_1": 3, "layer_3": 2, "layer_5": 2}
    rec = record_modules(gm, batch, {"layer_0", "layer_1"})
    vis0, vis1 = rec["layer_0"][0][4], rec["layer_1"][0][4]
    pos0, pos1 = rec["layer_0"][0][3], rec["layer_1"][0][3]
    assert vis1.sum(-1).tolist() == [105] * 8
    assert ((~vis0).sum(-1) == (~vis1).sum(-1)).all()  # every text and padding slot survives
    amask = rec["layer_1"][0][5]
    for b in range(8):  # contiguous: 0.. over the real tokens
        n = int(amask[b].sum())
        assert pos1[b][-n:].tolist() == list(range(n))
    assert pos0.shape[1] - pos1.shape[1] == 196 - 105


def test_identity_config_is_bit_identical_and_leaves_the_vision_tower_alone(builtin):
    lm, _, batch = builtin
    gm = capture(lm)
    same, rep = run_passes(gm, [("drop_tokens", dt.Config(scorer="sparsevlm"))], example=batch)
    assert rep[0]["changed"] is False
    cut, _ = run_passes(capture(lm), [("drop_tokens", dt.sparsevlm(64, 196, 8))])
    with torch.no_grad():
        assert torch.equal(gm(**batch), same(**batch))
    a = record_modules(gm, batch, {"vision", "layer_0"})
    b = record_modules(cut, batch, {"vision", "layer_0"})
    assert torch.equal(a["vision"][1], b["vision"][1])
    assert torch.equal(a["layer_0"][1], b["layer_0"][1])  # layers before the cut: untouched


def test_config_rejects_bad_sparsevlm_fields_naming_them():
    with pytest.raises(ValueError, match="'raters'"):
        dt.Config(scorer="sparsevlm", raters="question")
    with pytest.raises(ValueError, match="'recycle'"):
        dt.Config(scorer="sparsevlm", recycle=1.0)
    with pytest.raises(ValueError, match="'recycle'"):
        dt.Config(keep={"layer_2": 10}, recycle=0.3)  # FastV's scorer
    with pytest.raises(ValueError, match="'score_at'"):
        dt.Config(keep={"layer_2": 10}, scorer="sparsevlm", score_at="next")
    with pytest.raises(ValueError, match="'keep'"):
        dt.Config(keep={"layer_2": 0.5}, scorer="sparsevlm", recycle=0.3)
    with pytest.raises(ValueError, match="budget"):
        dt.sparsevlm(100)
    conf = dt.sparsevlm(128, 576, 32)
    assert dt.Config(**json.loads(json.dumps(conf.__dict__))) == conf


def test_verifier_rejects_a_sparsevlm_drop_that_loses_a_text_token(builtin):
    lm, _, batch = builtin
    gm, _ = run_passes(capture(lm), [("drop_tokens", dt.sparsevlm(192, 196, 8))])
    verify_graph(gm, pass_name="drop_tokens", example=batch)
    drop = gm.get_submodule("drop_1")
    orig = drop.forward

    def broken(*args):
        h, p, v, a, idx = orig(*args)
        return h[:, 1:], p[:, 1:], v[:, 1:], a[:, 1:], idx[:, 1:]

    drop.forward = broken
    with pytest.raises(VerifyError):
        verify_graph(gm, pass_name="drop_tokens", example=batch)


@pytest.mark.parametrize("recycle", [0.3, 0.0])
def test_cost_model_counts_raters_scorers_and_clustering_as_flop_counter_does(builtin, recycle):
    from vlmopt.api import flops
    from vlmopt.ir.verify import example_shapes

    lm, _, _ = builtin
    gm, _ = run_passes(capture(lm), [("drop_tokens", dt.sparsevlm(192, 196, 8,
                                                                   recycle=recycle))])
    measured = cost.measure_graph_breakdown(gm, example_shapes(gm, batch=1, n_text=16))
    analytic = flops(lm, gm, n_text=16)["per_node"]
    assert measured == {k: v for k, v in analytic.items() if v}
    assert ("drop_1" in measured) == (recycle > 0)


# -------------------------------------------------------------------------------- Qwen2.5-VL

def test_sparsevlm_prunes_qwen_by_fractions_and_refuses_recycling_there():
    model = build_tiny_qwen("qwen2_5_vl")
    batch = complete_inputs(qwen_batch(model, [(1, 16, 16), (1, 16, 16)]))
    cfg = dt.sparsevlm(192, None, 2, positions="original")  # stages collapse onto layer_1
    assert cfg.recycle == 0.0 and cfg.keep == {"layer_1": pytest.approx(110 / 576)}
    gm, _ = run_passes(capture(model), [("drop_tokens", cfg)], example=batch)
    rec = record_modules(gm, batch, {"layer_1"})
    assert rec["layer_1"][0][4].sum(-1).tolist() == [12, 12]  # 64 tokens -> round(12.2)
    with pytest.raises(ValueError, match="recycling needs a fixed visual-token count"):
        run_passes(capture(model), [("drop_tokens", dt.Config(
            keep={"layer_1": 8}, scorer="sparsevlm", recycle=0.3))])


def test_sparsevlm_kept_set_is_the_official_rule_on_qwen2_5_vl():
    """Raters on the input embeddings and layer 0's eager attention (HF's own probabilities,
    M-RoPE), the official top-k: the graph keeps the same tokens (original positions)."""
    model = build_tiny_qwen("qwen2_5_vl")
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    cfg = dt.Config(keep={"layer_1": 0.3}, scorer="sparsevlm", positions="original")
    for seed, grid in ((0, (1, 16, 16)), (1, (1, 12, 20))):
        one = complete_inputs(qwen_batch(model, [grid], n_text=(3, 6), seed=seed))
        gm, _ = run_passes(capture(model), [("drop_tokens", cfg)], example=one)
        with torch.no_grad():
            out = eager(**one, output_hidden_states=True, output_attentions=True)
        vis = one["input_ids"][0] == 60
        start, n = int(vis.nonzero()[0]), int(vis.sum())
        h = out.hidden_states[0][0]
        m = (h[start:start + n] @ h[start + n:].T).softmax(1).mean(0)
        raters = torch.where(m > m.mean())[0] + start + n
        rel = out.attentions[0][0].mean(0)[raters][:, start:start + n].mean(0)
        want = sorted(rel.topk(round(0.3 * n)).indices.tolist())
        got = record_modules(gm, one, {"drop_1"})["drop_1"][1][4][0]
        got = sorted(s - start for s in got.tolist() if vis[s])
        assert got == want, grid


# ------------------------------------------------------------------------------------- export

def test_a_sparsevlm_plan_with_recycling_exports_with_onnx_runtime_parity(loaded_tiny,
                                                                        synth_data, tmp_path):
    from vlmopt.api import apply_plan
    from vlmopt.data.dataset import load_records
    from vlmopt.emit import emit

    lm = loaded_tiny
    cfg = dt.sparsevlm(192, 196, 2)
    assert cfg.keep == {"layer_1": 37}
    gm = apply_plan(lm, plan_json(lm, [{"name": "drop_tokens",
                                        "config": json.loads(json.dumps(cfg.__dict__))}]))
    out = tmp_path / "svlm"
    out.mkdir()
    manifest = emit(lm, gm, out, load_records(str(synth_data)), parity_samples=4)
    par = manifest["parity"]
    print(f"SparseVLM LLaVA export parity: {par}")
    assert manifest["kv"]["n_visual_per_layer"] == [196, 37 + 5]  # 159 pruned: 48 -> 5
    assert par["samples"] == 4 and par["max_abs_logit_diff"] <= par["atol"]
