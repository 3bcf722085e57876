"""select_visual: identity, exact budgets, faithfulness of VisionZip / DivPrune / k-center /
pooling against independent references, batching, cost and plan round-trip."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    build_tiny_model,
    make_tiny_config,
    record_modules,
    single_sample,
    tiny_model_and_batch,
)
from vlmopt.passes import select_visual as sv

from vlmopt import api, cost
from vlmopt.errors import VerifyError
from vlmopt.frontend.load import LoadedModel
from vlmopt.ir.capture import capture, decoder_nodes
from vlmopt.ir.select import ContextualMerge, DiversityScore
from vlmopt.ir.verify import example_shapes, verify_graph
from vlmopt.pipeline import make_config, run_passes

N_VIS = 196
NAMES = ("input_ids", "pixel_values", "attention_mask", "position_ids")
METHODS = {
    "visionzip": sv.visionzip(20, 6, positions="original", cls="patches"),
    "divprune": sv.Config("divprune", 30),
    "kcenter": sv.Config("kcenter", 30),
    "pool": sv.Config("pool", 49),
    "random": sv.Config("random", 30, seed=7),
    "mmtok": sv.Config("mmtok", 30),
    "vtc_cls": sv.vtc_cls(30, start_layer=-8, positions="original"),
}


def _model_and_batch(vision_layers: int = 1, feature_layer: int = -1, seed: int = 3):
    return tiny_model_and_batch(vision_layers=vision_layers, feature_layer=feature_layer,
                                seed=seed)


@pytest.fixture(scope="module")
def tiny():
    """A tiny 2-layer LLaVA (1-layer CLIP tower, features of its last layer) and a padded batch."""
    return _model_and_batch()


def _record(gm, batch, targets):
    """Args (for decoders) or outputs (otherwise) of the named modules in one run."""
    return {t: (args if t.startswith("layer_") else res)
            for t, (args, res) in record_modules(gm, batch, targets).items()}


def _kept_patches(gm, batch, image_id):
    """Per sample, the set of patch indices whose slots reach layer_0 (slot j = patch j)."""
    _, pos, vis, _, _ = _record(gm, batch, {"keep_visual"})["keep_visual"]
    kept = []
    for b in range(pos.shape[0]):
        vis_pos = batch["position_ids"][b][batch["input_ids"][b] == image_id].tolist()
        kept_pos = set(pos[b][vis[b]].tolist())
        kept.append({j for j, p in enumerate(vis_pos) if p in kept_pos})
    return kept


def _image_embeddings(model, batch):
    """HF's own post-projector visual embeddings, per sample [Nv, D]."""
    with torch.no_grad():
        return model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output


def test_identity_config_is_bit_identical(tiny):
    model, batch = tiny
    gm = capture(model)
    g2, rep = run_passes(gm, [("select_visual", sv.Config())], example=batch)
    assert rep[0]["changed"] is False
    with torch.no_grad():
        assert torch.equal(gm(**batch), g2(**batch))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_brings_exactly_keep_visual_tokens_and_every_text_token_to_layer_0(
        tiny, method):
    model, batch = tiny
    config = METHODS[method]
    base = capture(model)
    gm, rep = run_passes(base, [("select_visual", config)], example=batch)  # verify_values
    extra = {"visionzip": {"score": "cls", "cls": "patches"},
             "vtc_cls": {"score": "cls"}}.get(method, {})
    assert rep[0]["stats"] == {"method": method, "keep": config.keep, "n_visual_in": N_VIS,
                               **extra}
    assert [d.meta["vlmopt"]["n_visual"] for d in decoder_nodes(gm)] == [config.keep] * 2
    new = _record(gm, batch, {"layer_0"})["layer_0"]
    old = _record(base, batch, {"layer_0"})["layer_0"]
    image_id = model.config.image_token_id
    for b in range(batch["input_ids"].shape[0]):
        text = batch["input_ids"][b] != image_id
        assert int(new[4][b].sum()) == config.keep
        assert new[3][b][~new[4][b]].tolist() == batch["position_ids"][b][text].tolist()
        assert torch.equal(new[0][b][~new[4][b]], old[0][b][text]), "text rows changed"


@pytest.mark.parametrize("vision_layers,feature_layer", [(1, -1), (3, -2)])
def test_visionzip_dominant_set_is_topk_of_hf_eager_cls_attention(vision_layers, feature_layer):
    model, batch = _model_and_batch(vision_layers, feature_layer)
    gm, _ = run_passes(capture(model), [("select_visual", sv.Config("visionzip", 24))],
                       example=batch)
    kept = _kept_patches(gm, batch, model.config.image_token_id)
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        att = tower(batch["pixel_values"], output_attentions=True).attentions
    # hidden_states[f] is produced by layer f - 1: its attention is attentions[f - 1]
    f = feature_layer % (vision_layers + 1)
    cls_row = att[f - 1][:, :, 0, 1:].sum(1)  # [B, Nv]
    for b in range(cls_row.shape[0]):
        assert kept[b] == set(cls_row[b].topk(24).indices.tolist()), f"sample {b}"


def _greedy_max_min(emb: np.ndarray, k: int, start: str) -> set[int]:
    """Plain greedy max-min (farthest-point) selection on cosine distance, float64 loops."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    n = len(e)
    dist = [[1.0 - float(e[i] @ e[j]) for j in range(n)] for i in range(n)]
    if start == "isolated":  # DivPrune: the column whose nearest other token is farthest
        first = max(range(n), key=lambda j: min(dist[i][j] for i in range(n) if i != j))
    else:  # k-center: the token most similar to the mean embedding
        c = emb.mean(0) / np.linalg.norm(emb.mean(0))
        first = max(range(n), key=lambda j: float(e[j] @ c))
    chosen = [first]
    while len(chosen) < k:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: min(dist[i][j] for i in chosen)))
    return set(chosen)


@pytest.mark.parametrize("method,start", [("divprune", "isolated"), ("kcenter", "mean")])
def test_diversity_selection_equals_plain_greedy_max_min_on_hf_embeddings(tiny, method, start):
    model, batch = tiny
    gm, _ = run_passes(capture(model), [("select_visual", sv.Config(method, 16))])
    kept = _kept_patches(gm, batch, model.config.image_token_id)
    for b, emb in enumerate(_image_embeddings(model, batch)):
        ref = _greedy_max_min(emb.double().numpy(), 16, start)
        assert kept[b] == ref, f"sample {b}: {sorted(kept[b] ^ ref)} differ"


def test_diversity_selection_never_picks_a_token_twice_among_duplicates():
    a, b, c = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    emb = torch.tensor([a, a, b, a, c, a])  # four copies of a: distance 0 to each other
    hidden = torch.cat([torch.ones(1, 3), emb, torch.ones(1, 3)])[None]  # [1, 8, 3]
    visual = torch.tensor([[False] + [True] * 6 + [False]])
    scores = DiversityScore(6, 5, "isolated")(hidden, visual)
    chosen = {j for j in range(6) if scores[0, 1 + j] == 1}
    assert chosen == _greedy_max_min(emb.double().numpy(), 5, "isolated") == {0, 1, 2, 3, 4}


def test_decision_margin_is_the_smallest_winning_gap_of_the_greedy_path():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(2, 12, 5, generator=g, dtype=torch.float64).float()
    hidden = torch.cat([torch.ones(2, 1, 5), emb], 1)  # one text token, then 12 visual
    visual = torch.tensor([[False] + [True] * 12] * 2)
    margin = DiversityScore(12, 6, "isolated").decision_margin(hidden, visual)
    for b in range(2):  # the gaps recomputed by hand in float64
        e = F.normalize(emb[b].double(), dim=-1)
        dist = 1 - e @ e.T
        iso = (dist + torch.eye(12) * 1e9).amin(0)
        gaps = [float(iso.topk(2).values[0] - iso.topk(2).values[1])]
        chosen = [int(iso.argmax())]
        mind = dist[chosen[0]].clone()
        while len(chosen) < 6:
            score = mind.clone()
            score[chosen] = -float("inf")
            top = score.topk(2).values
            gaps.append(float(top[0] - top[1]))
            chosen.append(int(score.argmax()))
            mind = torch.minimum(mind, dist[chosen[-1]])
        assert margin[b].item() == pytest.approx(min(gaps), abs=1e-5)
    # duplicates are exact ties: no margin at all
    a, c = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    dup = torch.cat([torch.ones(1, 3), torch.tensor([a, a, c, a])])[None]
    vis = torch.tensor([[False, True, True, True, True]])
    assert DiversityScore(4, 3, "isolated").decision_margin(dup, vis).item() == 0.0


def test_pool_equals_avg_pool2d_on_the_grid_when_windows_are_exact(tiny):
    model, batch = tiny
    gm, _ = run_passes(capture(model), [("select_visual", sv.Config("pool", 49))],
                       example=batch)
    hidden, _, _, pos, vis = _record(gm, batch, {"layer_0"})["layer_0"][:5]
    image_id = model.config.image_token_id
    for b, emb in enumerate(_image_embeddings(model, batch)):  # emb: [196, D]
        grid = emb.T.reshape(1, -1, 14, 14)
        ref = F.avg_pool2d(grid, 2)[0].flatten(1).T  # [49, D], row-major cells
        assert torch.allclose(hidden[b][vis[b]], ref, atol=1e-6)
        # each cell sits at the upper-left patch of its 2 x 2 window (nearest its centre)
        vis_pos = batch["position_ids"][b][batch["input_ids"][b] == image_id]
        want = [vis_pos[28 * r + 2 * c].item() for r in range(7) for c in range(7)]
        assert pos[b][vis[b]].tolist() == want


def test_contextual_token_is_target_plus_mean_of_its_assigned_patches():
    # 6 patches: CLS attention makes 1 and 4 dominant; remaining [0, 2, 3, 5], step 4 // 2 = 2,
    # so the targets are patches 0 and 3; by key cosine both 2 and 5 join target 3.
    x = torch.arange(6 * 3, dtype=torch.float32).reshape(1, 6, 3) ** 1.5
    cls = torch.tensor([[0.1, 0.9, 0.2, 0.1, 0.8, 0.0]])
    keys = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.1, 1.0], [0.0, 1.0], [1.0, 1.0],
                          [0.3, 2.0]]])
    feats, kept = ContextualMerge(6, dominant=2, contextual=2)(x, cls, keys)
    assert kept[0].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert torch.allclose(feats[0, 3], x[0, 3] + (x[0, 2] + x[0, 5]) / 2)
    assert torch.equal(feats[0, 0], x[0, 0])  # a target nobody joined keeps its features
    for j in (1, 2, 4, 5):
        assert torch.equal(feats[0, j], x[0, j])


def test_visionzip_merges_before_the_projector(tiny):
    model, batch = tiny
    gm, _ = run_passes(capture(model), [("select_visual", sv.visionzip(20, 6, cls="patches"))])
    rec = _record(gm, batch, {"visionzip", "layer_0"})
    feats, kept = rec["visionzip"]
    hidden, vis = rec["layer_0"][0], rec["layer_0"][4]
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        for b in range(feats.shape[0]):
            want = projector(feats[b][kept[b].bool()])  # [keep, D]
            assert torch.allclose(hidden[b][vis[b]], want, atol=1e-6)
    raw = _image_embeddings(model, batch)
    n_same = sum(int(torch.isclose(hidden[b][vis[b]], raw[b][kept[b].bool()]).all(-1).sum())
                 for b in range(feats.shape[0]))
    assert n_same == 3 * 20, "exactly the dominant tokens keep HF's own embeddings"


@pytest.mark.parametrize("method", list(METHODS))
def test_batched_selection_gives_same_answers_as_single_samples(tiny, method):
    model, batch = tiny
    gm, _ = run_passes(capture(model), [("select_visual", METHODS[method])])
    with torch.no_grad():
        together = gm(**batch)
        for i in range(batch["input_ids"].shape[0]):
            one = single_sample(batch, i)
            assert torch.allclose(gm(**one)[0], together[i], atol=1e-4), f"sample {i}"


@pytest.mark.parametrize("method", list(METHODS))
def test_select_graph_cost_matches_flopcounter_per_node(tiny, method):
    model, _ = tiny
    gm, _ = run_passes(capture(model), [("select_visual", METHODS[method])])
    lm = LoadedModel(model, None, Path("."), "tiny", "sha256:test", True)
    measured = cost.measure_graph_breakdown(gm, example_shapes(gm, batch=1, n_text=16))
    analytic = api.flops(lm, gm, n_text=16)
    per_node = {k: v for k, v in analytic["per_node"].items() if v}
    assert measured == per_node
    assert analytic["ratio"] < 0.6


def test_configs_round_trip_through_json():
    for config in [sv.Config(), *METHODS.values()]:
        d = json.loads(json.dumps(dataclasses.asdict(config)))
        assert make_config("select_visual", d) == config


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="method"):
        sv.Config(method="tome")
    with pytest.raises(ValueError, match="keep"):
        sv.Config(method="divprune")  # keep 0 with a method
    with pytest.raises(ValueError, match="keep"):
        sv.Config(method="pool", keep=50)  # not g * g
    with pytest.raises(ValueError, match="contextual"):
        sv.Config(method="visionzip", keep=10, contextual=11)
    with pytest.raises(ValueError, match="contextual"):
        sv.Config(method="divprune", keep=10, contextual=2)
    with pytest.raises(ValueError, match="keep"):
        sv.Config(method="random", keep=True)


def test_budget_above_the_visual_count_is_rejected_and_equal_is_a_no_op(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="select_visual.*keep=197"):
        run_passes(capture(model), [("select_visual", sv.Config("divprune", 197))])
    _, rep = run_passes(capture(model), [("select_visual", sv.Config("divprune", N_VIS))])
    assert rep[0]["changed"] is False and "skipped" in rep[0]["stats"]


def test_cls_scores_on_a_tower_whose_cls_is_an_llm_token_are_refused_or_received():
    cfg, _ = make_tiny_config()
    cfg.vision_feature_select_strategy = "full"  # CLS is an LLM token: no CLS ranks patches
    model = build_tiny_model(cfg=cfg)
    for config in (sv.visionzip(20, 4), sv.Config("visionzip", 20, score="cls"),
                   sv.vtc_cls(20)):
        with pytest.raises(ValueError, match="select_visual: node 'vision': .* needs a CLS.*field"):
            run_passes(capture(model), [("select_visual", config)], verify=False)
    _, rep = run_passes(capture(model), [("select_visual", sv.visionzip(20, 4, cls="patches"))],
                        verify=False)
    assert rep[0]["stats"]["score"] == "received"


def test_verifier_rejects_a_selection_that_renumbers_positions(tiny):
    # VisionZip's own LLaVA code renumbers kept tokens contiguously; here positions must stay
    model, batch = tiny
    gm, _ = run_passes(capture(model), [("select_visual", sv.Config("random", 30))])
    keeper = gm.get_submodule("keep_visual")
    orig = keeper.forward

    def renumbered(*args):
        h, _, v, a, idx = orig(*args)
        return h, (a.cumsum(-1) - 1).clamp(min=0), v, a, idx

    keeper.forward = renumbered
    with pytest.raises(VerifyError, match="positions unchanged|text tokens kept"):
        verify_graph(gm, pass_name="select_visual", example=batch)


def test_visionzip_then_shortv_plan_verifies_and_runs():
    """Regression: the verifier must not look the vision module up by name (VisionZip replaces
    it and freeze_visual drops unused modules)."""
    from vlmopt.pipeline import make_config

    model = build_tiny_model()
    steps = [("select_visual", make_config("select_visual", {"method": "visionzip", "keep": 49,
                                                             "contextual": 8})),
             ("freeze_visual", make_config("freeze_visual", {"layers": ["layer_1"]}))]
    gm, rep = run_passes(capture(model), steps)
    assert [r["changed"] for r in rep] == [True, True]
    assert [d.meta["vlmopt"]["n_visual"] for d in decoder_nodes(gm)] == [49, 49]
