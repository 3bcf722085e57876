"""VisionZip on tile towers (Idefics3 / SmolVLM, InternVL): dominant tokens by the attention
each pixel-shuffle group receives (vlmopt.ir.received_tiles). The reference here reads HF's own
eager attention probabilities (``output_attentions``) and maps patches to LLM tokens by index
arithmetic, not by the shuffle the module runs."""

from __future__ import annotations

import family_checks as fc
import pytest
import torch
from helpers import record_modules
from helpers_internvl import make_tiny_dir as internvl_dir
from helpers_tiles import make_tiny_dir as tiles_dir
from vlmopt.passes import select_visual as sv

from vlmopt.frontend.load import load, model_shapes
from vlmopt.ir.capture import capture
from vlmopt.pipeline import run_passes

SIZES = [(50, 70), (97, 41)]
SAME = [(50, 70), (50, 70)]  # one batch: the same token count in every row


@pytest.fixture(scope="module", params=["idefics3", "internvl"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return load(tiles_dir(d) if request.param == "idefics3" else internvl_dir(d))


def _eager(module):
    """HF's tower with eager attention (so it returns its probabilities)."""
    cfg = module.config
    old, cfg._attn_implementation = cfg._attn_implementation, "eager"
    return cfg, old


def _group_mean(recv: torch.Tensor, side: int, s: int) -> torch.Tensor:
    """[n, side*side] per patch -> [n, (side/s)^2] per LLM token: token (i // s, j // s) of
    the row-major (side/s)-grid is the mean of the patches (i, j) it covers."""
    n = recv.shape[0]
    g = side // s
    out = torch.zeros(n, g * g)
    for i in range(side):
        for j in range(side):
            out[:, (i // s) * g + j // s] += recv[:, i * side + j]
    return out / (s * s)


def reference_scores(lm, b, patch_mask=None) -> torch.Tensor:
    """Received attention per LLM token of every real tile, in the LLM's order [N_total]."""
    if lm.adapter.family == "idefics3":
        tower = lm.model.model.vision_model
        pv = b["pixel_values"].flatten(0, 1)
        real = pv.flatten(1).ne(0).any(1)
        pam = b["pixel_attention_mask"].flatten(0, 1)[real]
        p = lm.config.vision_config.patch_size
        pm = pam.unfold(1, p, p).unfold(2, p, p).any(-1).any(-1)
        cfg, old = _eager(tower)
        try:
            with torch.no_grad():
                att = tower(pixel_values=pv[real], patch_attention_mask=pm,
                            output_attentions=True).attentions[-1]  # [n, H, N, N]
        finally:
            cfg._attn_implementation = old
        valid = pm.flatten(1).float()  # [n, N]
        recv = (att.mean(1) * valid[:, :, None]).sum(1) * valid
        side, s = pm.shape[-1], int(lm.config.scale_factor)
    else:
        tower = lm.model.model.vision_tower
        cfg, old = _eager(tower)
        try:
            with torch.no_grad():
                att = tower(b["pixel_values"], output_attentions=True).attentions
        finally:
            cfg._attn_implementation = old
        f = lm.config.vision_feature_layer % (len(att) + 1)
        recv = att[f - 1].mean(1).sum(1)[:, 1:]  # every query, CLS receives nothing
        side = int(recv.shape[1] ** 0.5)
        s = int(round(1 / lm.config.downsample_ratio))
    return _group_mean(recv, side, s).flatten()


def test_visionzip_keeps_the_most_attended_tokens_of_each_image(tiny):
    b = fc.batch(tiny, SAME)
    gm, stats = run_passes(capture(tiny), [("select_visual", sv.Config("visionzip", 0.25))],
                           example=b)
    assert stats[0]["stats"]["score"] == "received"
    vis = record_modules(gm, b, {"keep_visual"})["keep_visual"][1][2]
    recv = reference_scores(tiny, b)
    slots = b["input_ids"] == tiny.adapter.image_token_id
    start = 0
    for r in range(len(SAME)):
        nv = int(slots[r].sum())
        keep = max(1, int(nv * 0.25 + 0.5))
        top = recv[start:start + nv].topk(keep).indices
        start += nv
        ref = set(slots[r].nonzero()[:, 0][top].tolist())
        kept_slots = _kept_slots(gm, b, r)
        assert len(kept_slots) == keep == int(vis[r].sum())
        assert kept_slots == ref, f"sample {r}: {len(kept_slots ^ ref)} tokens differ"


def _kept_slots(gm, b, r):
    """Original sequence slots of sample r's visual tokens after the keep node."""
    res = record_modules(gm, b, {"keep_visual"})["keep_visual"][1]
    vis, idx = res[2][r], res[4][r]
    return set(idx[vis].tolist())


def test_padded_patches_are_neither_queries_nor_scored(tmp_path):
    """A tile whose right half is padding (pixel_attention_mask 0): the score equals HF's
    eager probabilities with those patches left out, and they score 0."""
    from vlmopt.ir.blocks import TileVision
    from vlmopt.ir.received_tiles import TileVisionReceived

    lm = load(tiles_dir(tmp_path))
    b = fc.batch(lm, SIZES[:1])
    b["pixel_attention_mask"][0, 0, :, 40:] = 0  # patches from column 5 on (patch 8)
    vm = lm.model.model.vision_model
    block = TileVision(vm, lm.model.model.connector, lm.config.vision_config.patch_size)
    with torch.no_grad():
        emb, recv = TileVisionReceived(block)(b["pixel_values"], b["pixel_attention_mask"])
        ref_emb = block(b["pixel_values"], b["pixel_attention_mask"])
    assert torch.equal(emb, ref_emb)
    ref = reference_scores(lm, b)
    torch.testing.assert_close(recv, ref, rtol=1e-5, atol=1e-6)
    per_tile = recv.reshape(-1, 16)
    assert (per_tile[0].reshape(4, 4)[:, 3] == 0).all()  # token column 3: patches 6, 7


def test_received_attention_costs_what_flop_counter_counts(tiny):
    from torch.utils.flop_counter import FlopCounterMode

    from vlmopt import cost
    from vlmopt.ir.received_tiles import for_tower

    cost.register_sdpa_flop_formulas()
    b = fc.batch(tiny, SIZES[:1])
    gm = capture(tiny)
    vis = next(n for n in gm.graph.nodes if n.meta.get("vlmopt", {}).get("block") == "vision")
    block = gm.get_submodule(vis.target)
    args = [b[k] for k in ("pixel_values", "pixel_attention_mask") if k in b]
    counts = []
    for mod in (block, for_tower(block)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            mod(*args)
        counts.append(counter.get_total_flops())
    grids = type(tiny.adapter).image_grids(tiny.path, tiny.config, *SIZES[0])
    s = model_shapes(tiny.config, grids=grids)
    assert counts[1] - counts[0] == cost.select_flops(s, {"select_op": "received_attention"})


def test_visionzip_plan_exports_with_parity(tiny, tmp_path):
    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values") + (
        ("pixel_attention_mask",) if tiny.adapter.family == "idefics3" else ())
    fc.exports_with_parity_and_runs_without_torch(
        tiny, tmp_path, SIZES, keys,
        [{"name": "select_visual", "config": {"method": "visionzip", "keep": 0.25}}])


def test_cls_scored_methods_stay_refused(tiny):
    for m in ("vispruner", "vtc_cls"):
        with pytest.raises(ValueError, match=f"method '{m}' on"):
            run_passes(capture(tiny), [("select_visual", sv.Config(m, 4))])
