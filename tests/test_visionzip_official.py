"""VisionZip as its official code counts it (dvlab-research/VisionZip at 3151f6d): CLS is the
first of the dominant tokens, the LLM reads [CLS, dominant patches, contextual tokens] with
positions renumbered; checked against a re-implementation of that rule written here from HF's
own eager attentions, hidden states and keys; plus cost, export, the presets and the rows."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import single_sample, tiny_model_and_batch
from vlmopt.passes import select_visual as sv

from vlmopt import api, cost
from vlmopt.frontend.load import LoadedModel
from vlmopt.ir.capture import capture
from vlmopt.ir.verify import example_shapes
from vlmopt.pipeline import make_config, run_passes

DOMINANT, CONTEXTUAL = 20, 6  # as visionzip(model, dominant=20, contextual=6)


@pytest.fixture(scope="module")
def llava15_like():
    """A tiny LLaVA whose projector reads hidden_states[-2] of a 3-layer CLIP tower (LLaVA-1.5's
    layer, the one the official code hard-codes) and a left-padded batch of 3."""
    return tiny_model_and_batch(vision_layers=3, feature_layer=-2, seed=4)


def _official_visual_tokens(model, pixel_values, dominant: int, contextual: int):
    """The official rule, written from its description (not vlmopt's code): ViT layer -2's
    attention and output, its keys averaged over heads; CLS + top-(dominant - 1) patches by
    CLS attention summed over heads, in index order; of the other tokens, every step-th is a
    target (step = len // contextual), each other joins the target of highest key cosine,
    contextual = target + mean of its group; -> [B, dominant + contextual, Dv]."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    layer = getattr(tower, "vision_model", tower).encoder.layers[-2]
    seen = {}
    hook = layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.update(k=out))
    with torch.no_grad():
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    hook.remove()
    x, att = out.hidden_states[-2], out.attentions[-2]  # [B, N, Dv], [B, H, N, N]
    B, N, _ = x.shape
    H = att.shape[1]
    keys = seen["k"].view(B, N, H, -1).mean(2)  # [B, N, hd]
    rows = []
    for b in range(B):
        score = att[b, :, 0, 1:].sum(0)  # CLS -> patch j + 1
        dom = sorted([0] + [int(j) + 1 for j in score.topk(dominant - 1).indices])
        rest = [i for i in range(N) if i not in dom]
        step = max(1, len(rest) // contextual)
        targets = [rest[i] for i in range(0, len(rest), step)][:contextual]
        others = [i for i in rest if i not in targets]
        k = torch.nn.functional.normalize(keys[b], dim=-1)
        groups = {t: [] for t in targets}
        for i in others:
            groups[targets[int((k[targets] @ k[i]).argmax())]].append(i)
        ctx = [x[b, t] + (x[b, g].mean(0) if g else 0) for t, g in groups.items()]
        rows.append(torch.stack([x[b, i] for i in dom] + ctx))
    return torch.stack(rows)


def _reference_logits(model, one, visual):
    """The LLM on the shortened prompt: text embeddings with the image run replaced by
    ``visual`` [n, D], position_ids=None (the official llava_arch.py rebuild)."""
    ids = one["input_ids"][0]
    vis = (ids == model.config.image_token_id).nonzero()[:, 0]
    lm = model.model
    with torch.no_grad():
        emb = lm.get_input_embeddings()(ids)
        seq = torch.cat([emb[:vis[0]], visual, emb[vis[-1] + 1:]])[None]
        out = lm.language_model(inputs_embeds=seq)
        return model.lm_head(out.last_hidden_state)[0, -1]


def test_preset_defaults_to_the_official_counting_and_keeps_lightcompress_as_a_variant():
    off = sv.visionzip(54, 10)
    assert (off.keep, off.contextual, off.cls, off.positions) == (64, 10, "official",
                                                                 "contiguous")
    lc = sv.visionzip(54, 10, cls="patches")
    assert (lc.keep, lc.cls) == (64, "patches")
    for c in (off, lc, sv.visionzip(54, 10, positions="original", cls="patches", layer=-2)):
        assert make_config("select_visual", json.loads(json.dumps(dataclasses.asdict(c)))) == c


@pytest.mark.parametrize("fields,msg", [
    ({"positions": "original"}, "field 'cls'.*contiguous"),
    ({"score": "received"}, "field 'cls'.*CLS token"),
    ({"keep": 6, "contextual": 6}, "field 'cls'.*>= 1"),
    ({"method": "divprune", "contextual": 0}, "field 'cls' is for method 'visionzip'"),
    ({"cls": "both"}, "field 'cls' must be one of"),
    ({"score": "keys"}, "field 'score' must be one of"),
])
def test_official_counting_rejects_fields_it_cannot_serve(fields, msg):
    base = {"method": "visionzip", "keep": 26, "contextual": 6, "cls": "official",
            "positions": "contiguous"}
    with pytest.raises(ValueError, match=msg):
        sv.Config(**{**base, **fields})


def test_llm_reads_cls_dominant_then_contextual_tokens_as_the_official_rule(llava15_like):
    model, batch = llava15_like
    gm, rep = run_passes(capture(model), [("select_visual", sv.visionzip(DOMINANT, CONTEXTUAL))],
                         example=batch)
    assert rep[0]["stats"]["cls"] == "official" and rep[0]["stats"]["score"] == "cls"
    want = _official_visual_tokens(model, batch["pixel_values"], DOMINANT, CONTEXTUAL)
    with torch.no_grad():
        want = model.model.multi_modal_projector(want)  # [B, 26, D]
    for b in range(batch["input_ids"].shape[0]):
        one = single_sample(batch, b)
        with torch.no_grad():
            got = gm(**one)[0]
        torch.testing.assert_close(got, _reference_logits(model, one, want[b]), rtol=1e-4,
                                   atol=1e-5, msg=f"sample {b}")


def test_layer_minus_2_reads_what_the_official_code_reads_on_a_last_layer_projector():
    """The official code hard-codes hidden_states[-2]; vlmopt reads the projector's layer (the
    same on LLaVA-1.5) unless ``layer`` says otherwise."""
    model, batch = tiny_model_and_batch(vision_layers=3, feature_layer=-1, seed=4)
    one = single_sample(batch, 1)
    want = _official_visual_tokens(model, one["pixel_values"], DOMINANT, CONTEXTUAL)
    with torch.no_grad():
        ref = _reference_logits(model, one, model.model.multi_modal_projector(want[0]))
    lit, _ = run_passes(capture(model), [("select_visual", sv.visionzip(
        DOMINANT, CONTEXTUAL, layer=-2))], example=batch)
    own, _ = run_passes(capture(model), [("select_visual", sv.visionzip(DOMINANT, CONTEXTUAL))])
    with torch.no_grad():
        torch.testing.assert_close(lit(**one)[0], ref, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(own(**one)[0], ref, atol=1e-4)
    with pytest.raises(ValueError, match="select_visual: node 'vision': field 'layer'.*-4..3"):
        run_passes(capture(model), [("select_visual", sv.visionzip(20, 6, layer=-5))])
    with pytest.raises(ValueError, match="field 'layer' is an integer for method 'visionzip'"):
        sv.Config("divprune", 20, layer=-2)


def test_the_official_set_is_not_lightcompress_counting(llava15_like):
    """The two countings keep different tokens (CLS + 19 patches vs 20 patches), so the test
    above can tell them apart."""
    model, batch = llava15_like
    one = single_sample(batch, 0)
    want = _official_visual_tokens(model, batch["pixel_values"][:1], DOMINANT, CONTEXTUAL)
    with torch.no_grad():
        ref = _reference_logits(model, one, model.model.multi_modal_projector(want[0]))
    lc, _ = run_passes(capture(model), [("select_visual", sv.visionzip(
        DOMINANT, CONTEXTUAL, cls="patches"))])
    with torch.no_grad():
        assert not torch.allclose(lc(**one)[0], ref, atol=1e-4)


def test_cost_model_and_flop_counter_agree_per_node(llava15_like):
    model, _ = llava15_like
    gm, _ = run_passes(capture(model), [("select_visual", sv.visionzip(DOMINANT, CONTEXTUAL))])
    lm = LoadedModel(model, None, Path("."), "tiny", "sha256:test", True)
    measured = cost.measure_graph_breakdown(gm, example_shapes(gm, batch=1, n_text=16))
    analytic = api.flops(lm, gm, n_text=16)
    assert measured == {k: v for k, v in analytic["per_node"].items() if v}
    assert analytic["visual_tokens_per_layer"] == [DOMINANT + CONTEXTUAL] * 2


def test_official_plan_exports_to_onnx_with_parity(loaded_tiny, synth_data, tmp_path):
    from artifacts import plan_json

    from vlmopt.api import apply_plan
    from vlmopt.data.dataset import load_records
    from vlmopt.emit import emit

    config = dataclasses.asdict(sv.visionzip(DOMINANT, CONTEXTUAL))
    gm = apply_plan(loaded_tiny, plan_json(loaded_tiny, [{"name": "select_visual",
                                                          "config": config}]))
    par = emit(loaded_tiny, gm, tmp_path, load_records(str(synth_data))[:3],
               parity_samples=3)["parity"]
    assert par["max_abs_logit_diff"] <= par["atol"], par


def test_compare_and_baselines_show_both_countings(loaded_tiny):
    from vlmopt.search import baselines
    from vlmopt.search.space import Space

    from vlmopt.compare import default_methods

    names = {m.name: m.steps for m in default_methods(196, 2, None)}
    off = names["VisionZip 25/196"][0][1]
    assert off["cls"] == "official" and off["positions"] == "contiguous"
    assert "cls" not in names["VisionZip 25/196, patches only (LightCompress)"][0][1]
    sp = Space(loaded_tiny, n_text=20)
    rows = {n: c for n, c in baselines.at_target(sp, 0.4, "llm")}
    assert rows["VisionZip"].cls == "official"
    assert rows["VisionZip, patches only (LightCompress)"].cls == "patches"
    assert rows["VisionZip, original positions"].positions == "original"
    for name in ("VisionZip", "VisionZip, patches only (LightCompress)"):
        steps = sp.steps_of(rows[name])
        assert sp.ratio(steps, "llm") <= 0.4, name
        run_passes(capture(loaded_tiny.model), [(n, make_config(n, f)) for n, f in steps])


def test_show_refuses_the_official_layout_it_cannot_draw(loaded_tiny):
    from vlmopt import visualize
    from vlmopt.data import synthvqa
    from vlmopt.errors import VlmoptError

    s = synthvqa.sample(5, 0)
    batch = visualize.encode_one(loaded_tiny, s.prompt, s.image)
    for cls, ok in (("official", False), ("patches", True)):
        gm, _ = run_passes(capture(loaded_tiny.model), [("select_visual", sv.visionzip(
            DOMINANT, CONTEXTUAL, cls=cls))])
        if ok:
            assert visualize.trace(loaded_tiny, gm, batch)[0].stages[1].kind == "select"
        else:
            with pytest.raises(VlmoptError, match="official order.*cannot be drawn"):
                visualize.trace(loaded_tiny, gm, batch)
