"""LLaVA-OneVision / LLaVA-NeXT family (AnyRes tiles, unpadding, OneVision's anyres_max_9
downsampling, image_newline rows): vlmopt.frontend.llava_next. Tiny random-weight checkpoints
built here (tests/helpers_anyres.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_anyres import PATCH, TILE, make_tiny_dir
from PIL import Image

from vlmopt import inputs
from vlmopt.frontend.load import load, model_shapes
from vlmopt.ir.capture import capture, complete_inputs, graph_runner

# odd sizes: 2x3 tiles unpadded to 8x12; one tile (4x4); 4x4 tiles, unpadded to 16x15 and
# (OneVision) downsampled to 12x11; a tall 3x1 grid
SIZES = [(50, 70), (30, 30), (130, 120), (97, 33)]
P = (TILE // PATCH) ** 2


def _images(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module", params=["llava_onevision", "llava_next"])
def tiny(request, tmp_path_factory):
    return load(make_tiny_dir(tmp_path_factory.mktemp(request.param), request.param))


def _batch(lm, sizes=SIZES):
    prompts = [f"what colour is the shape {'?' * i} <image>" for i in range(len(sizes))]
    return inputs.encode(lm.processor, prompts, _images(sizes))


def _newline_slots(lm, batch) -> torch.Tensor:
    """[B, T] True where the merged embedding IS the model's image_newline vector (an
    independent reading: the merge copies it there bit for bit)."""
    gm = capture(lm)
    ins = complete_inputs(batch)
    with torch.no_grad():
        feats, _ = gm.vision(ins["pixel_values"], ins["image_sizes"])
        hidden, _ = gm.merge(gm.embed(ins["input_ids"]), feats, ins["input_ids"])
    nl = lm.model.model.image_newline
    return (hidden == nl).all(-1) & (ins["input_ids"] == lm.adapter.image_token_id)


def test_identity_plan_is_bit_exact_with_padded_tiles(tiny):
    b = _batch(tiny)
    assert (b["pixel_values"][1, 2:] == 0).all()  # sample 1 has 2 tiles of 17: padding
    with torch.no_grad():
        ref = tiny.model(**b, logits_to_keep=1).logits[:, -1]
        got = graph_runner(capture(tiny))(b)
    assert torch.equal(ref, got)


def test_newline_slots_are_not_visual_and_counts_follow_the_layout(tiny):
    """The merge's visual mask is the image slots minus the newline rows; the slot counts the
    processor wrote match the layout (features + one newline per packed row)."""
    b = _batch(tiny)
    gm = capture(tiny)
    ins = complete_inputs(b)
    with torch.no_grad():
        feats, text_rows = gm.vision(ins["pixel_values"], ins["image_sizes"])
        _, visual = gm.merge(gm.embed(ins["input_ids"]), feats, ins["input_ids"], text_rows)
    nl = _newline_slots(tiny, b)
    img = ins["input_ids"] == tiny.adapter.image_token_id
    assert torch.equal(visual, img & ~nl)
    for i, (h, w) in enumerate(SIZES):
        lay = type(tiny.adapter).layout_of(tiny.config, h, w)
        rows, cols = lay.features
        assert int(img[i].sum()) == P + rows * (cols + 1) == lay.n_slots
        assert int(nl[i].sum()) == rows and int(visual[i].sum()) == lay.n_visual
    if tiny.config.model_type == "llava_onevision":  # 16 x 15 > 1.1^2 * 9 tiles: shrunk
        assert type(tiny.adapter).layout_of(tiny.config, 130, 120).features == (12, 11)


def test_export_packing_from_layout_inputs_matches_the_models(tiny):
    """The batch-1 packing ONNX gets (a gather of numpy layout inputs) against the model's own
    pack_image_features: exact where it copies, within float rounding where it interpolates."""
    from vlmopt.preprocess_anyres import layout_feeds

    gm = capture(tiny)
    spec = gm.meta["vlmopt"]["layout"]
    for size, im in zip(SIZES, _images()):
        b = complete_inputs(inputs.encode(tiny.processor, ["x <image>"], [im]))
        with torch.no_grad():
            ref, ref_text = gm.vision(b["pixel_values"], b["image_sizes"])
            lay = {k: torch.from_numpy(v) for k, v in layout_feeds(spec, *size).items()}
            (got, text), nv = gm.vision.export_forward(b["pixel_values"], **lay)
        assert torch.equal(text, ref_text) and nv == int((~ref_text).sum())
        assert torch.allclose(got, ref, atol=1e-6, rtol=0), (size, (got - ref).abs().max())
        exact = (lay["anyres_weight"][:, 0] == 1)
        assert torch.equal(got[exact], ref[exact])


@pytest.mark.parametrize("size", SIZES)
def test_cost_model_matches_flop_counter(tiny, size):
    from vlmopt import cost

    b = _batch(tiny, [size])
    grids = type(tiny.adapter).image_grids(tiny.path, tiny.config, *size)
    s = model_shapes(tiny.config, grids=grids)
    n_img = int((b["input_ids"] == tiny.adapter.image_token_id).sum())
    assert s.n_visual + s.n_image_text == n_img
    n_text = int(b["input_ids"].shape[1]) - n_img  # the prompt's non-image tokens
    analytic = cost.prefill_flops(s, cost.baseline_layers(s, n_text))
    measured = cost.measure_prefill_breakdown(tiny.model, b, fake=False)
    for k in ("vision", "project", "layer_0", "layer_1", "head", "total"):
        assert measured[k] == analytic[k], (k, measured, analytic)


@pytest.mark.parametrize("model,size", [("llava-onevision-7b", (1344, 1344)),
                                        ("llava-next-7b", (512, 768))])
def test_cost_model_matches_flop_counter_at_7b_shapes(model, size):
    """The shipped config-only 7B shapes (OneVision at 4 x 4 tiles, downsampled to 81 x 81;
    NeXT's 2 x 2 grid unpadded to 32 x 48), measured on fake weights."""
    from helpers import REPO

    from vlmopt import cost

    lm = load(REPO / "examples" / "configs" / model, device="meta")
    A = type(lm.adapter)
    lay = A.layout_of(lm.config, *size)
    s = lm.shapes(A.image_grids(None, lm.config, *size))
    ids = torch.cat([torch.full((16,), 5), torch.full((lay.n_slots,), lm.adapter.image_token_id),
                     torch.full((16,), 6)])[None]
    S = lm.config.vision_config.image_size
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
         "pixel_values": torch.zeros(1, lay.n_tiles, 3, S, S),
         "image_sizes": torch.tensor([list(size)])}
    analytic = cost.prefill_flops(s, cost.baseline_layers(s, 32))
    measured = cost.measure_prefill_breakdown(lm.model, b)
    for k in ("vision", "project", "layer_0", "head", "total"):
        assert measured[k] == analytic[k], (k, measured[k], analytic[k])


def test_cost_model_counts_every_parameter(tiny):
    from vlmopt import cost

    wb = cost.weight_bytes(model_shapes(tiny.config), bytes_per_el=4)
    assert wb["total"] == 4 * sum(p.numel() for p in tiny.model.parameters())


# ------------------------------------------------------------------ torch-free preprocessing

ODD = [(50, 70), (30, 30), (130, 120), (97, 33), (7, 300), (33, 31), (64, 64), (1, 1)]


@pytest.mark.parametrize("size", ODD)
def test_numpy_preprocessing_matches_the_image_processor(tiny, size):
    from vlmopt import preprocess_anyres as pa

    ip = tiny.processor.image_processor
    cfg = pa.image_config(tiny.path)
    im = _images([size], seed=sum(size))[0]
    ref = ip(images=[im], return_tensors="np")
    tiles = pa.pixels(im, cfg)
    assert tiles.dtype == np.float32 and np.array_equal(tiles, ref["pixel_values"][0])
    assert tuple(ref["image_sizes"][0]) == size
    lay = type(tiny.adapter).layout_of(tiny.config, *size)
    assert lay.n_tiles == len(tiles)


@pytest.mark.parametrize("size", ODD[:5])
def test_image_prompt_is_the_processors(tiny, size):
    from vlmopt import preprocess_anyres as pa

    im = _images([size])[0]
    text = "what colour is the shape ? <image>"
    ref = tiny.processor(text=[text], images=[im], return_tensors="np")["input_ids"][0]
    n = pa.layout_feeds(capture(tiny).meta["vlmopt"]["layout"], *size)["anyres_index"].shape[0]
    ids = tiny.processor.tokenizer(text.replace("<image>", "<image>" * n),
                                   return_tensors="np")["input_ids"][0]
    assert np.array_equal(ids, ref)


# ------------------------------------------------------------------ passes keep newlines text

def _kept_slots(gm, batch) -> list[torch.Tensor]:
    """The original slots each KeepTopK keeps, composed along the chain ([B, T'] each)."""
    from vlmopt.ir.tokens import KeepTopK

    seen = []
    hooks = [m.register_forward_hook(lambda mod, a, out: seen.append(out[4]))
             for m in gm.modules() if isinstance(m, KeepTopK)]
    try:
        with torch.no_grad():
            gm(**complete_inputs(batch))
    finally:
        for h in hooks:
            h.remove()
    slots, out = None, []
    for idx in seen:
        slots = idx if slots is None else slots.gather(1, idx)
        out.append(slots)
    return out


@pytest.mark.parametrize("method", ["divprune", "random"])
def test_select_and_drop_never_remove_a_newline(tiny, method):
    from vlmopt.api import apply_plan
    from vlmopt.ir.tokens import keep_count

    sizes = [(130, 120)] * 2  # one size per batch: rectangular counts
    b = _batch(tiny, sizes)
    plan = {"schema": "vlmopt.plan/1", "model": {"name": tiny.name,
                                                   "fingerprint": tiny.fingerprint},
            "passes": [{"name": "select_visual", "config": {"method": method, "keep": 0.25}},
                       {"name": "drop_tokens", "config": {"keep": {"layer_1": 0.5}}}]}
    gm = apply_plan(tiny, plan, example=b)
    nl = _newline_slots(tiny, b)
    img = b["input_ids"] == tiny.adapter.image_token_id
    n_feat = int((img & ~nl)[0].sum())
    kept = _kept_slots(gm, b)
    assert len(kept) == 2
    want = keep_count(0.25, n_feat)
    for slots in kept:
        for r in range(2):
            s = set(slots[r].tolist())
            assert set(torch.nonzero(nl[r]).flatten().tolist()) <= s  # every newline stays
            assert set(torch.nonzero(~img[r]).flatten().tolist()) <= s  # and all text
            assert int(img[r, slots[r]].sum()) - int(nl[r].sum()) == want
        want = keep_count(0.5, want)


@pytest.mark.parametrize("method", ["visionzip", "vispruner", "vtc_cls", "mmtok"])
def test_cls_scored_and_coverage_selections_are_refused(tiny, method):
    from vlmopt.pipeline import make_config, run_passes

    with pytest.raises(ValueError, match=f"method '{method}' on {tiny.config.model_type}"):
        run_passes(capture(tiny), [("select_visual", make_config(
            "select_visual", {"method": method, "keep": 0.25}))])


def test_search_and_compare_do_not_propose_refused_methods(tiny):
    from vlmopt.search.space import Space

    from vlmopt.compare import default_methods

    ms = default_methods(None, 2, ["layer_0", "layer_1"], refused=tiny.adapter.refused_select)
    used = {f.get("method") for m in ms for n, f in m.steps if n == "select_visual"}
    assert {"divprune", "kcenter", "random"} <= used and not used & set(tiny.adapter.refused_select)
    from vlmopt.pipeline import make_config, run_passes

    for method in used - {"divprune", "kcenter", "random"}:  # others offered here also run
        run_passes(capture(tiny), [("select_visual", make_config(
            "select_visual", {"method": method, "keep": 0.25}))])
    sp = Space(tiny, 20, image_sizes={(50, 70): 1})
    assert set(sp.select_methods) <= {"none", "divprune"}
    assert sp.default_select not in tiny.adapter.refused_select


# ------------------------------------------------------------------ export and runtime

def _plan(lm, path, passes):
    import json

    path.write_text(json.dumps({"schema": "vlmopt.plan/1",
                                "model": {"name": str(lm.path), "fingerprint": lm.fingerprint},
                                "passes": passes}))
    return path


def test_plan_exports_with_parity_and_runs_without_torch(tiny, tmp_path):
    """apply (DivPrune at a quarter of each image's features + a drop after layer 0) -> ONNX
    parity on calibration prompts of two image sizes (one downsampled on OneVision); the
    torch-free preprocessing gives the HF processor's inputs; ``vlmopt run`` answers."""
    from helpers import write_jsonl

    from vlmopt import runtime
    from vlmopt.cli import main

    imgs = _images([(50, 70), (130, 120)])
    rows = []
    for i, im in enumerate(imgs):
        im.save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": "what colour is the shape ? <image>",
                     "answer": "red"})
    calib = write_jsonl(tmp_path / "calib.jsonl", rows)
    plan = _plan(tiny, tmp_path / "plan.json", [
        {"name": "select_visual", "config": {"method": "divprune", "keep": 0.25}},
        {"name": "drop_tokens", "config": {"keep": {"layer_1": 0.5}}}])
    out = tmp_path / "out"
    assert main(["apply", str(plan), str(tiny.path), "--out", str(out),
                 "--calib", str(calib)]) == 0
    art = runtime.Artifact(out)
    par = art.manifest["parity"]
    assert par["samples"] == 2 and par["max_abs_logit_diff"] <= 1e-4, par
    pre = runtime.preprocessor(art)
    for r in rows:
        im = Image.open(tmp_path / r["image"])
        mine = pre.encode([r["prompt"]], [im])
        ref = inputs.encode(tiny.processor, [r["prompt"]], [im])
        for k in ("input_ids", "attention_mask", "position_ids", "pixel_values"):
            assert np.array_equal(mine[k], ref[k].numpy()), k
    text = art.generate(pre, [rows[0]["prompt"]], [tmp_path / "0.png"], max_new_tokens=3)
    assert len(text) == 1 and isinstance(text[0], str)
    assert main(["run", str(out), "--image", str(tmp_path / "1.png"),
                 "--prompt", rows[1]["prompt"], "--max-new-tokens", "2"]) == 0


def test_short_optimize_runs(tiny, tmp_path):
    from vlmopt.cli import main

    if tiny.config.model_type != "llava_onevision":
        pytest.skip("one family member is enough for the search loop")
    out = tmp_path / "opt"
    assert main(["optimize", str(tiny.path), "--target-flops", "0.3",
                 "--calib", "builtin:synthvqa-calib", "--calib-limit", "8",
                 "--eval", "builtin:synthvqa-test", "--eval-limit", "8", "--trials", "3",
                 "--finalists", "1", "--no-emit", "--out", str(out)]) == 0
    import json

    rep = json.loads((out / "report.json").read_text())
    assert rep["chosen"]["within_target"] and rep["chosen"]["ratio_llm"] <= 0.3 + 1e-9
