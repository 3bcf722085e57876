"""VisPruner's and DART's presets against independent re-implementations of the official rules
(Theia-4869/VisPruner at aefa01a, llava/model/llava_arch.py ``encode_images``; xqy1111111/DART
at 5a19452, llava/model/language_model/modeling_llama_self.py ``get_retained_image_token``),
written here on plain transformers modules with HF eager attention, not with the passes' helpers.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from artifacts import plan_json
from helpers import (
    BUILTIN_SYNTH_LLAVA,
    build_tiny_qwen,
    qwen_batch,
    record_modules,
    single_sample,
    tiny_model_and_batch,
)
from vlmopt.passes import drop_tokens as dt
from vlmopt.passes import select_visual as sv

from vlmopt import cost, inputs
from vlmopt.data import synthvqa
from vlmopt.errors import VerifyError
from vlmopt.ir.capture import capture, decoder_nodes
from vlmopt.ir.verify import verify_graph
from vlmopt.pipeline import run_passes


@pytest.fixture(scope="module")
def two_vit_layers():
    model, batch = tiny_model_and_batch(n_layers=2, vision_layers=2, feature_layer=-2, seed=3)
    model.set_attn_implementation("eager")
    return model, batch


def _official_vispruner(model, pixel_values, T: int, ratio: float) -> list[int]:
    """The official steps: CLS row of the feature layer's attention (head mean), the
    int(T * ratio) best, then rounds dropping up to 8 of the even half most similar to the
    odd half, until T - int(T * ratio) remain."""
    tower = model.model.vision_tower
    sel = model.config.vision_feature_layer
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    feats = out.hidden_states[sel][0, 1:]  # [N, C]
    att = out.attentions[sel][0, :, 0, 1:].mean(0)  # [N]
    n_imp = int(T * ratio)
    n_div = T - n_imp
    order = att.argsort(descending=True)
    important, residual = order[:n_imp], order[n_imp:]
    x = feats / feats.norm(dim=-1, keepdim=True)
    while n_div > 0:
        R = residual.shape[0]
        r = min(8, R - n_div)
        if r <= 0:
            break
        assert R % 2 == 0, "the official code needs an even residual here"
        a, b = x[residual[::2]], x[residual[1::2]]
        scores = (a @ b.T).max(dim=-1).values
        distinct = scores.argsort(descending=True)[r:]
        residual = torch.cat([residual[::2][distinct], residual[1::2]])
    chosen = torch.cat([important, residual]) if n_div > 0 else important
    return sorted(chosen.tolist())


def _graph_kept(gm, one, n_visual):
    """The patch indices the graph keeps (the visual slots scored 1 by select_slots)."""
    found = {}
    mod = gm.get_submodule("vispruner")
    h = mod.register_forward_hook(lambda m, a, out: found.setdefault("kept", out))
    try:
        with torch.no_grad():
            gm(**one)
    finally:
        h.remove()
    kept = found["kept"][0]
    assert kept.shape[0] == n_visual
    return sorted(torch.nonzero(kept)[:, 0].tolist())


@pytest.mark.parametrize("keep", [16, 32])
def test_vispruner_kept_set_is_the_official_rule(two_vit_layers, keep):
    model, batch = two_vit_layers
    n = int((batch["input_ids"][0] == model.config.image_token_id).sum())
    gm, _ = run_passes(capture(model), [("select_visual", sv.vispruner(keep))], example=batch)
    for i in range(batch["input_ids"].shape[0]):
        one = single_sample(batch, i)
        want = _official_vispruner(model, one["pixel_values"], keep, 0.5)
        assert len(want) == keep
        assert _graph_kept(gm, one, n) == want, f"sample {i}"


def test_vispruner_runs_the_language_model_on_the_pruned_contiguous_sequence(two_vit_layers):
    model, batch = two_vit_layers
    one = single_sample(batch, 1)
    cfg = sv.vispruner(16)
    assert cfg.positions == "contiguous" and cfg.important_ratio == 0.5
    gm, _ = run_passes(capture(model), [("select_visual", cfg)], example=batch)
    ids = one["input_ids"][0]
    vis = ids == model.config.image_token_id
    lm = model.model
    with torch.no_grad():
        emb = lm.get_input_embeddings()(one["input_ids"]).clone()
        feats = lm.get_image_features(pixel_values=one["pixel_values"]).pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
        emb[0, vis] = feats.reshape(-1, emb.shape[-1]).to(emb.dtype)
        chosen = torch.nonzero(vis)[:, 0][_official_vispruner(model, one["pixel_values"], 16,
                                                               0.5)]
        keep = torch.sort(torch.cat([torch.nonzero(~vis)[:, 0], chosen])).values
        out = lm.language_model(inputs_embeds=emb[:, keep])  # position_ids=None
        ref = model.lm_head(out.last_hidden_state)[0, -1]
        got = gm(**one)[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_vispruner_config_rejects_a_bad_important_ratio():
    with pytest.raises(ValueError, match="important_ratio"):
        sv.Config("vispruner", 16, important_ratio=1.5)



# ------------------------------------------------------------------------------------- DART


@pytest.fixture(scope="module")
def builtin():
    """The built-in checkpoint, its eager twin, and 8 samples: the SynthVQA prompts (question
    before the image: fewer than 4 text tokens follow it) and the same questions after the
    image (the official LLaVA-1.5 geometry)."""
    if not (BUILTIN_SYNTH_LLAVA / "model.safetensors").exists():
        pytest.skip("built-in checkpoint not trained yet")
    from vlmopt.frontend.load import load

    lm = load("builtin:synth-llava")
    eager = copy.deepcopy(lm.model)
    eager.set_attn_implementation("eager")
    s = [synthvqa.sample(11, i) for i in range(4)]
    prompts = [x.prompt for x in s] + ["<image>\n" + x.prompt.replace("\n<image>", "") for x in s]
    batch = inputs.encode(lm.processor, prompts, [x.image for x in s] * 2)
    return lm, eager, batch


def _official_dart(model, one, K: int, token_topk, image_id: int, pivots=(4, 4),
                   order: str = "list") -> list[int]:
    """DART's rule on one unpadded sample: layer K-1's post-RoPE keys (as the KV cache holds
    them), the final norm of the hidden entering layer K, and the official loop. ``order``
    "list": pivots visited as listed (image then text, by descending key norm; vlmopt's
    order); "set": the official ``list(set(...))`` order of this interpreter. Where fewer than
    the text pivots follow the image, the rest are the earlier text tokens by key norm.
    ``token_topk``: TOKEN_TOPK, or a list of counts in visiting order."""
    pi, pt = pivots
    with torch.no_grad():
        out = model(**one, use_cache=True, output_hidden_states=True, logits_to_keep=1)
    cache = out.past_key_values
    keys = cache.layers[K - 1].keys[0]  # [KV, T, hd]
    T = keys.shape[1]
    l1 = torch.norm(keys.permute(1, 0, 2).reshape(T, -1), p=1, dim=-1)  # [T]
    lm = model.model.language_model
    with torch.no_grad():
        hs = lm.norm(out.hidden_states[K])[0]  # [T, D]
    vis = one["input_ids"][0] == image_id
    start, n = int(vis.nonzero()[0]), int(vis.sum())
    assert bool(vis[start:start + n].all()), "one image span"
    img = (l1[start:start + n].topk(pi).indices + start).tolist()
    after = list(range(start + n, T))
    if len(after) >= pt:
        qry = (l1[start + n:].topk(pt).indices + start + n).tolist()
    else:
        qry = [after[i] for i in l1[after].argsort(descending=True).tolist()]
        qry += l1[:start].topk(pt - len(qry)).indices.tolist()
    visit = img + qry if order == "list" else list(set(img + qry))
    valid = set(range(start, start + n)) - set(img)
    chosen = set(img)
    counts = token_topk if isinstance(token_topk, list) else [token_topk] * len(visit)
    for item, c in zip(visit, counts):
        cand = list(valid)
        sim = -F.cosine_similarity(hs[item], hs[cand], dim=-1)
        top = [cand[i] for i in sim.topk(c).indices.tolist()]
        chosen.update(top)
        valid.difference_update(top)
    return sorted(chosen)


def _dart_kept(gm, one, K: int) -> list[int]:
    """The slots the graph's DART scorer keeps on one sample."""
    found = {}
    h = gm.get_submodule(f"score_{K}").register_forward_hook(
        lambda m, a, out: found.setdefault("kept", out))
    try:
        with torch.no_grad():
            gm(**one)
    finally:
        h.remove()
    return torch.nonzero(found["kept"][0])[:, 0].tolist()


def _pruned_hf_logits(model, one, K: int, keep: list[int]) -> torch.Tensor:
    """Plain HF with the official cut: before decoder layer K the hidden states are gathered
    at ``keep`` (sorted slots); that layer and every later one gets the rotary embeddings,
    mask and position ids of those slots (the original positions)."""
    idx = torch.tensor(keep)
    layers = list(model.model.language_model.layers)

    def pre(mod, args, kwargs):
        hs = args[0]
        if mod is layers[K]:
            hs = hs[:, idx]
        kw = dict(kwargs)
        kw["position_embeddings"] = tuple(p.index_select(p.dim() - 2, idx)
                                          for p in kw["position_embeddings"])
        m = kw.get("attention_mask")
        if isinstance(m, torch.Tensor):
            kw["attention_mask"] = m[..., idx, :][..., idx]
        if isinstance(kw.get("position_ids"), torch.Tensor):
            kw["position_ids"] = kw["position_ids"][..., idx]
        return (hs, *args[1:]), kw

    hooks = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in layers[K:]]
    try:
        with torch.no_grad():
            return model(**one, use_cache=False, logits_to_keep=1).logits[0, -1]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("budget", [None, 128])
def test_dart_kept_set_is_the_official_rule_on_the_builtin_model(builtin, budget):
    lm, eager, batch = builtin
    n = lm.model.config.image_seq_length
    cfg = dt.dart(2, n, budget=budget)  # reduction ratio 0.778 -> 4 + 8 * 5; 128 -> 4 + 8 * 16
    keep = cfg.keep["layer_2"]
    assert keep == {None: 44, 128: 132}[budget] and cfg.positions == "original"
    gm, _ = run_passes(capture(lm), [("drop_tokens", cfg)], example=batch)
    for i in range(batch["input_ids"].shape[0]):
        one = single_sample(batch, i)
        want = _official_dart(eager, one, 2, (keep - 4) // 8, lm.model.config.image_token_id)
        assert len(want) == keep
        assert _dart_kept(gm, one, 2) == want, f"sample {i}"


def test_dart_visiting_order_moves_about_a_tenth_of_the_kept_tokens(builtin):
    """The official code visits the pivots in Python set order; vlmopt in listed order. The
    kept sets still share most tokens (measured: 82-98% on these samples)."""
    lm, eager, batch = builtin
    image_id = lm.model.config.image_token_id
    gm, _ = run_passes(capture(lm), [("drop_tokens", dt.dart(2, 196, budget=None))])
    shares = []
    for i in range(batch["input_ids"].shape[0]):
        one = single_sample(batch, i)
        lit = _official_dart(eager, one, 2, 5, image_id, order="set")
        shares.append(len(set(_dart_kept(gm, one, 2)) & set(lit)) / len(lit))
    print(f"kept-set share with the literal set order: {np.round(shares, 3).tolist()}")
    assert min(shares) >= 0.75 and np.mean(shares) >= 0.85, shares


def test_dart_runs_the_language_model_on_the_pruned_original_position_sequence(builtin):
    lm, eager, batch = builtin
    gm, _ = run_passes(capture(lm), [("drop_tokens", dt.dart(2, 196, budget=None))],
                       example=batch)
    for i in (0, 5):
        one = single_sample(batch, i)
        keep = _official_dart(eager, one, 2, 5, lm.model.config.image_token_id)
        text = torch.nonzero(one["input_ids"][0] != lm.model.config.image_token_id)[:, 0]
        slots = sorted([*text.tolist(), *keep])
        ref = _pruned_hf_logits(eager, one, 2, slots)
        with torch.no_grad():
            got = gm(**one)[0]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def qwen25():
    model = build_tiny_qwen("qwen2_5_vl")
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return model, eager


def test_dart_kept_set_is_the_official_rule_on_qwen2_5_vl(qwen25):
    model, eager = qwen25
    cfg = dt.dart(2, None, reduction_ratio=0.5)  # dynamic resolution: a fraction
    assert cfg.keep == {"layer_2": 0.5}
    gm, _ = run_passes(capture(model), [("drop_tokens", cfg)])
    for seed, grid in enumerate(([1, 8, 12], [1, 6, 16], [1, 10, 16])):
        one = qwen_batch(model, [grid], n_text=(3, 4), seed=seed)
        n = int((one["input_ids"] == 60).sum())
        keep = max(1, (n + 1) // 2)  # round half up
        got = _dart_kept(gm, one, 2)
        assert len(got) == keep, (grid, len(got))
        assert (keep - 4) % 8 == 0  # 12, 12, 20: the official split
        assert got == _official_dart(eager, one, 2, (keep - 4) // 8, 60), grid
        ref = _pruned_hf_logits(eager, one, 2, sorted(
            [*torch.nonzero(one["input_ids"][0] != 60)[:, 0].tolist(), *got]))
        with torch.no_grad():
            torch.testing.assert_close(gm(**one)[0], ref, rtol=1e-4, atol=1e-4)


def test_dart_budget_below_the_pivots_keeps_exactly_the_budget(qwen25):
    model, _ = qwen25
    gm, _ = run_passes(capture(model), [("drop_tokens", dt.Config(keep={"layer_2": 0.1},
                                                                   scorer="dart"))])
    one = qwen_batch(model, [[1, 8, 12]], seed=1)  # 24 tokens -> 2, fewer than 4 pivots
    assert len(_dart_kept(gm, one, 2)) == 2


def test_dart_remainder_picks_go_to_the_first_pivots_and_counts_stay_exact(builtin):
    lm, eager, batch = builtin
    one = single_sample(batch, 6)
    # keep 4 + 8 * 5 + 3: the first three pivots take 6, the others 5
    gm, _ = run_passes(capture(lm), [("drop_tokens", dt.Config(keep={"layer_2": 47},
                                                                scorer="dart"))], example=batch)
    got = _dart_kept(gm, one, 2)
    assert len(got) == 47
    assert got == _official_dart(eager, one, 2, [6, 6, 6, 5, 5, 5, 5, 5],
                                 lm.model.config.image_token_id)


def test_dart_identity_and_text_tokens_and_other_layers_untouched(builtin):
    lm, _, batch = builtin
    gm = capture(lm)
    same, rep = run_passes(gm, [("drop_tokens", dt.Config(scorer="dart"))], example=batch)
    assert rep[0]["changed"] is False
    with torch.no_grad():
        assert torch.equal(gm(**batch), same(**batch))
    cut, _ = run_passes(capture(lm), [("drop_tokens", dt.dart(2, 196, budget=None))],
                        example=batch)
    info = [d.meta["vlmopt"]["n_visual"] for d in decoder_nodes(cut)]
    assert info == [196, 196] + [44] * 6
    rec = record_modules(cut, batch, {"layer_1", "layer_2"})
    base = record_modules(gm, batch, {"layer_1"})
    h1, _, _, pos1, vis1, _ = rec["layer_1"][0][:6]
    _, _, _, pos2, vis2, _ = rec["layer_2"][0][:6]
    assert torch.equal(h1, base["layer_1"][0][0])  # layers before the cut: the whole sequence
    assert vis2.sum(-1).tolist() == [44] * 8
    for b in range(8):  # every text token and padding slot survives, at its own position
        assert pos1[b][~vis1[b]].tolist() == pos2[b][~vis2[b]].tolist()
        assert set(pos2[b][vis2[b]].tolist()) <= set(pos1[b][vis1[b]].tolist())


def test_dart_config_rejects_bad_fields_naming_them():
    with pytest.raises(ValueError, match="'score_at'"):
        dt.Config(keep={"layer_2": 44}, scorer="dart", score_at="next")
    with pytest.raises(ValueError, match="'pivot_image'"):
        dt.Config(scorer="dart", pivot_image=-1)
    with pytest.raises(ValueError, match="'pivot_text'"):
        dt.Config(scorer="dart", pivot_image=0, pivot_text=0)
    with pytest.raises(ValueError, match="'keep'"):
        dt.Config(keep={"layer_2": 3}, scorer="dart")
    conf = dt.dart(2, 576)
    assert conf.keep == {"layer_2": 132}  # LLaVA-1.5: max_num_trunction 128 -> 4 + 8 * 16
    again = dt.Config(**json.loads(json.dumps(conf.__dict__)))
    assert again == conf


def test_verifier_rejects_a_dart_drop_that_moves_positions(builtin):
    lm, _, batch = builtin
    gm, _ = run_passes(capture(lm), [("drop_tokens", dt.dart(2, 196, budget=None))])
    verify_graph(gm, pass_name="drop_tokens", example=batch)
    drop = gm.get_submodule("drop_2")
    orig = drop.forward

    def broken(*args):
        h, p, v, a, idx = orig(*args)
        return h, p + 1000, v, a, idx

    drop.forward = broken
    with pytest.raises(VerifyError, match="positions unchanged|text tokens kept"):
        verify_graph(gm, pass_name="drop_tokens", example=batch)


def test_dart_scorer_cost_matches_flop_counter(builtin):
    from vlmopt.api import flops
    from vlmopt.ir.verify import example_shapes

    lm, _, _ = builtin
    gm, _ = run_passes(capture(lm), [("drop_tokens", dt.dart(2, 196, budget=None))])
    measured = cost.measure_graph_breakdown(gm, example_shapes(gm, batch=1, n_text=16))
    analytic = flops(lm, gm, n_text=16)
    for node in ("score_2", "layer_2", "total"):
        assert measured[node] == analytic["per_node"][node], (node, measured, analytic)


def test_a_dart_plan_exports_with_onnx_runtime_parity(loaded_tiny, synth_data, tmp_path):
    from vlmopt.api import apply_plan
    from vlmopt.data.dataset import load_records
    from vlmopt.emit import emit

    lm = loaded_tiny
    gm = apply_plan(lm, plan_json(lm, [{"name": "drop_tokens", "config": json.loads(
        json.dumps(dt.dart(1, 196, budget=None).__dict__))}]))
    out = tmp_path / "dart"
    out.mkdir()
    manifest = emit(lm, gm, out, load_records(str(synth_data)), parity_samples=4)
    par = manifest["parity"]
    print(f"DART LLaVA export parity: {par}")
    assert manifest["kv"]["n_visual_per_layer"] == [196, 44]
    assert par["max_abs_logit_diff"] <= par["atol"] and par["tie_flips"] < par["samples"]
    assert "min_selection_margin" in par  # DART's top-k boundaries screened like DivPrune's


def test_a_dart_plan_exports_on_qwen_with_symbolic_counts(tmp_path):
    """Dynamic resolution: the export's visual count is a shape, so the per-pivot split is
    symbolic arithmetic in the graph; images of two sizes through one ONNX graph."""
    from helpers import make_tiny_qwen_dir, write_mixed_size_data

    from vlmopt.api import apply_plan
    from vlmopt.data.dataset import load_records
    from vlmopt.emit import emit
    from vlmopt.frontend.load import load

    lm = load(make_tiny_qwen_dir(tmp_path / "model", "qwen2_5_vl"))
    data = write_mixed_size_data(synthvqa.write_dataset(tmp_path / "synth", 4, seed=5),
                                 tmp_path / "mixed")
    gm = apply_plan(lm, plan_json(lm, [{"name": "drop_tokens", "config": json.loads(
        json.dumps(dt.dart(2, None).__dict__))}]))
    out = tmp_path / "art"
    out.mkdir()
    par = emit(lm, gm, out, load_records(str(data)), parity_samples=2)["parity"]
    print(f"DART Qwen2.5-VL export parity: {par}")
    assert par["samples"] == 2 and par["max_abs_logit_diff"] <= par["atol"]
