"""A LLaVA whose vision tower is SigLIP (no [CLS], strategy "full", an attention-pooling head):
identity, exact cost, the CLS-free variants of the CLS-ranked selections (checked against HF's
own eager attentions), what the search / baselines / compare propose, optimize and ONNX."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_config, record_modules
from vlmopt.passes import select_visual as sv

from vlmopt import api, cost, inputs
from vlmopt.data import synthvqa
from vlmopt.frontend import synth_llava
from vlmopt.frontend.load import load, model_shapes
from vlmopt.ir.capture import capture, complete_inputs
from vlmopt.ir.verify import example_shapes
from vlmopt.pipeline import make_config, run_passes

PATCH = synth_llava.PATCH
N_VIS = (synthvqa.IMAGE_SIZE // PATCH) ** 2


def siglip_config(vision_layers: int = 2, feature_layer: int = -1, head: bool = True):
    """(LlavaConfig, vocab): the tiny LLaVA of tests/helpers.py with a SigLIP tower."""
    from transformers import SiglipVisionConfig

    cfg, vocab = make_tiny_config()
    cfg.vision_config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
        num_attention_heads=2, image_size=synthvqa.IMAGE_SIZE, patch_size=PATCH,
        vision_use_head=head)
    cfg.vision_feature_select_strategy = "full"  # SigLIP has no CLS to drop
    cfg.vision_feature_layer = feature_layer
    cfg.image_seq_length = N_VIS
    return cfg, vocab


def siglip_model(seed: int = 0, **kw):
    from transformers import LlavaForConditionalGeneration

    cfg, _ = siglip_config(**kw)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).eval()


def siglip_processor(vocab):
    """A real LlavaProcessor over the synth-llava tokenizer with a SigLIP image processor
    (resize to the tower's size, no crop) and no extra image token (no CLS)."""
    from transformers import LlavaProcessor, SiglipImageProcessorPil

    size = synthvqa.IMAGE_SIZE
    tok = synth_llava.make_processor(vocab).tokenizer
    ip = SiglipImageProcessorPil(size={"height": size, "width": size},
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                          vision_feature_select_strategy="full", num_additional_image_tokens=0,
                          chat_template=synth_llava.CHAT_TEMPLATE,
                          image_token=synth_llava.IMAGE_TOKEN)


def make_siglip_llava(path: Path) -> Path:
    """A tiny SigLIP-tower LLaVA checkpoint directory (safetensors, processor files)."""
    cfg, vocab = siglip_config()
    siglip_model().save_pretrained(path, safe_serialization=True)
    siglip_processor(vocab).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    return make_siglip_llava(tmp_path_factory.mktemp("tiny-siglip"))


@pytest.fixture(scope="module")
def lm(siglip_dir):
    return load(siglip_dir)


@pytest.fixture(scope="module")
def batch(lm):
    samples = [synthvqa.sample(5, i) for i in range(3)]
    return complete_inputs(inputs.encode(lm.processor, [s.prompt for s in samples],
                                         [s.image for s in samples]))


def _eager_attentions(model, pixel_values):
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        return tower(pixel_values, output_attentions=True).attentions  # L x [B, H, N, N]


def _kept_patches(gm, batch, image_id):
    """Per sample, the patches whose slots reach layer_0 (original positions: slot j = patch j)."""
    (_, (_, pos, vis, _, _)), = record_modules(gm, batch, {"keep_visual"}).values()
    out = []
    for b in range(pos.shape[0]):
        vis_pos = batch["position_ids"][b][batch["input_ids"][b] == image_id].tolist()
        kept = set(pos[b][vis[b]].tolist())
        out.append({j for j, p in enumerate(vis_pos) if p in kept})
    return out


def test_siglip_llava_loads_without_cls_and_the_identity_plan_is_bit_exact(lm, batch):
    assert lm.adapter.has_cls is False
    assert int((batch["input_ids"][0] == lm.config.image_token_id).sum()) == N_VIS
    gm = capture(lm.model)
    with torch.no_grad():
        ref = lm.model(**batch, logits_to_keep=1).logits[:, -1]
        assert torch.equal(gm(**batch), ref)


@pytest.mark.parametrize("head", [True, False], ids=["pooling_head", "no_head"])
def test_cost_matches_flop_counter_per_node_and_counts_every_parameter(head):
    """HF runs SigLIP's attention-pooling head on every image although LLaVA never reads it:
    it is in the tower's FLOPs and bytes (and the graph runs it too)."""
    cfg, _ = siglip_config(head=head)
    model = siglip_model(head=head)
    s = model_shapes(cfg, bytes_per_el=4)
    assert (s.has_cls, s.n_vision_tokens, s.n_visual) == (False, N_VIS, N_VIS)
    ids = torch.tensor([[2, 6] + [cfg.image_token_id] * N_VIS + [7, 8, 9]])
    pix = torch.zeros(1, 3, synthvqa.IMAGE_SIZE, synthvqa.IMAGE_SIZE)
    measured = cost.measure_prefill_breakdown(model, {"input_ids": ids, "pixel_values": pix})
    analytic = cost.prefill_flops(s, cost.baseline_layers(s, 5))
    assert measured["other"] == 0
    assert {k: measured[k] for k in analytic} == analytic
    assert cost.weight_bytes(s)["total"] == sum(p.numel() * 4 for p in model.parameters())


def test_visionzip_on_siglip_ranks_by_received_attention_of_the_feature_layer():
    cfg, vocab = siglip_config(vision_layers=3, feature_layer=-2)
    model = siglip_model(vision_layers=3, feature_layer=-2)
    samples = [synthvqa.sample(5, i) for i in range(3)]
    batch = complete_inputs(inputs.encode(siglip_processor(vocab), [s.prompt for s in samples],
                                          [s.image for s in samples]))
    config = sv.visionzip(20, 6, positions="original", cls="patches")
    gm, rep = run_passes(capture(model), [("select_visual", config)], example=batch)
    assert rep[0]["stats"]["score"] == "received"
    att = _eager_attentions(model, batch["pixel_values"])
    recv = att[-2].mean(dim=(1, 2))  # hidden_states[-2] comes from layer L-2: [B, N]
    for b, kept in enumerate(_kept_patches(gm, batch, cfg.image_token_id)):
        dom = set(recv[b].topk(20).indices.tolist())  # visionzip(20, 6): 20 dominant + 6
        rem = [j for j in range(N_VIS) if j not in dom]
        targets = set(rem[::len(rem) // 6][:6])  # VisionZip's uniform pick of contextual targets
        assert kept == dom | targets, f"sample {b}"


def test_vispruner_on_siglip_takes_its_important_tokens_by_the_last_layers_received_attention():
    cfg, vocab = siglip_config(vision_layers=3, feature_layer=-2)
    model = siglip_model(vision_layers=3, feature_layer=-2)
    samples = [synthvqa.sample(5, i) for i in range(2)]
    batch = complete_inputs(inputs.encode(siglip_processor(vocab), [s.prompt for s in samples],
                                          [s.image for s in samples]))
    gm, rep = run_passes(capture(model), [("select_visual", sv.Config(
        "vispruner", 30))], example=batch)
    assert rep[0]["stats"]["score"] == "received"
    att = _eager_attentions(model, batch["pixel_values"])
    recv = att[-1].mean(dim=-2).mean(dim=1)  # the official SigLIP rule: last layer, [B, N]
    for b, kept in enumerate(_kept_patches(gm, batch, cfg.image_token_id)):
        assert len(kept) == 30
        assert set(recv[b].topk(15).indices.tolist()) <= kept, f"sample {b}"


def test_methods_without_a_cls_free_variant_are_refused_with_one_error(lm):
    cases = [(sv.vtc_cls(30), "VTC-CLS needs a CLS token.*VTC-CLS defines no variant"),
             (sv.Config("visionzip", 30, score="cls"), "VisionZip needs.*field 'score'"),
             (sv.Config("vispruner", 30, score="cls"), "VisPruner needs.*field 'score'"),
             (sv.visionzip(24, 6), "VisionZip needs.*field 'cls'")]  # the preset counts CLS
    for config, msg in cases:
        with pytest.raises(ValueError, match=f"select_visual: node 'vision': {msg}"):
            run_passes(capture(lm.model), [("select_visual", config)], verify=False)
    with pytest.raises(ValueError, match="field 'score'"):
        sv.Config("vtc_cls", 30, score="received")


@pytest.mark.parametrize("config", [sv.visionzip(20, 6, cls="patches"),
                                    sv.Config("vispruner", 30)], ids=["visionzip", "vispruner"])
def test_received_attention_costs_what_flop_counter_counts(lm, config):
    gm, _ = run_passes(capture(lm.model), [("select_visual", config)])
    measured = cost.measure_graph_breakdown(gm, example_shapes(gm, batch=1, n_text=16))
    analytic = {k: v for k, v in api.flops(lm, gm, n_text=16)["per_node"].items() if v}
    if config.method == "vispruner":  # NOTE: its duplicate-removal matmuls are not modelled
        for d in (measured, analytic):  # (select_op "duplicates", CLS towers alike)
            d.pop("vispruner", None), d.pop("total")
    assert measured == analytic


def test_search_baselines_and_compare_propose_only_what_the_tower_runs(lm):
    from vlmopt.search import baselines
    from vlmopt.search.space import Space

    from vlmopt.compare import default_methods

    sp = Space(lm, n_text=16)
    assert sp.score == "received" and "visionzip" in sp.select_methods
    plans = [(name, sp.steps_of(c)) for name, c in baselines.at_target(sp, 0.3, "llm") if c]
    plans += [(m.name, m.steps) for m in default_methods(N_VIS, 2, ["layer_1", "layer_0"],
                                                         has_cls=False)]
    names = " ".join(n for n, _ in plans)
    assert "VisionZip (received attention)" in names and "VisPruner" in names
    assert "VTC-CLS" not in names and "patches only" not in names
    for name, steps in plans:
        for _, fields in steps:
            if fields.get("method") in ("visionzip", "vispruner"):
                assert fields["score"] == "received" and fields.get("cls", "patches") == \
                    "patches", name
        run_passes(capture(lm.model), [(n, make_config(n, f)) for n, f in steps],
                   verify=False)  # every proposed plan runs on this tower


def test_optimize_at_0_3_and_a_received_attention_plan_export_with_parity(
        siglip_dir, lm, synth_data, tmp_path):
    from vlmopt.api import apply_plan
    from vlmopt.cli import main
    from vlmopt.data.dataset import load_records
    from vlmopt.emit import emit

    out = tmp_path / "opt"
    assert main(["optimize", str(siglip_dir), "--target-flops", "0.3", "--calib",
                 str(synth_data), "--eval", str(synth_data), "--out", str(out), "--trials",
                 "3", "--search-samples", "4", "--finalists", "1", "--no-emit"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["chosen"]["ratio_llm"] <= 0.3
    assert any("VisionZip (received attention)" in m["method"] for m in r["methods"])
    assert "received attention" in (out / "report.md").read_text()
    plan = json.loads((out / "plan.json").read_text())
    zip_plan = {**plan, "passes": [{"name": "select_visual", "config": {
        "method": "visionzip", "keep": 40, "contextual": 6, "score": "received",
        "positions": "contiguous"}}]}
    recs = load_records(str(synth_data))[:2]
    todo = [("chosen", plan)]  # export is the slow part (~40 s a plan): the received-attention
    if not any(p["config"].get("method") == "visionzip" for p in plan["passes"]):
        todo.append(("visionzip", zip_plan))  # once, chosen or not
    for name, p in todo:
        gm = apply_plan(lm, p)
        (tmp_path / name).mkdir()
        par = emit(lm, gm, tmp_path / name, recs, parity_samples=2)["parity"]
        assert par["max_abs_logit_diff"] <= par["atol"], (name, par)
