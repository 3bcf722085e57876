"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL: family adapter, capture and passes on tiny random models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import QWEN_TYPES, build_tiny_qwen, qwen_batch, record_modules
from vlmopt.passes import drop_tokens as dt
from vlmopt.passes import select_visual as sv

from vlmopt.frontend.load import adapter_for, model_shapes
from vlmopt.ir.capture import capture, complete_inputs, node_by_block
from vlmopt.pipeline import get_pass, run_passes

GRIDS = [[1, 8, 12], [1, 10, 6]]  # two images of different sizes: 24 and 15 visual tokens


@pytest.fixture(scope="module", params=QWEN_TYPES)
def qwen(request):
    return build_tiny_qwen(request.param)


def test_adapter_is_picked_from_the_model_type(qwen):
    a = adapter_for(qwen)
    assert a.family == "qwen_vl" and a.position_rows == 3
    assert a.extra_inputs == ("image_grid_thw",)
    assert a.fixed_n_visual() is None  # dynamic resolution


def test_positions_are_mrope_rows_from_the_models_own_rope_index(qwen):
    b = qwen_batch(qwen, GRIDS)
    pos = b["position_ids"]
    assert pos.shape == (3, 2, b["input_ids"].shape[1])
    vis = b["input_ids"] == 60
    text = b["attention_mask"].bool() & ~vis
    assert torch.equal(pos[0][text], pos[1][text]) and torch.equal(pos[1][text], pos[2][text])
    # an image's tokens carry its grid: 4 x 6 and 5 x 3 distinct (h, w) pairs
    for row, (h, w) in ((0, (4, 6)), (1, (5, 3))):
        hw = {(int(a), int(c)) for a, c in zip(pos[1, row][vis[row]], pos[2, row][vis[row]])}
        assert len(hw) == h * w


def test_identity_graph_is_bit_exact_against_hf_forward(qwen):
    b = qwen_batch(qwen, GRIDS)
    with torch.no_grad():
        ref = qwen(**b, logits_to_keep=1).logits[:, -1]
        # HF computing its own positions (mm_token_type_ids) agrees with the ones we pass
        own = qwen(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                   mm_token_type_ids=(b["input_ids"] == 60).int(), logits_to_keep=1).logits[:, -1]
        out = capture(qwen)(**complete_inputs(b))
    assert torch.equal(ref, own)
    assert torch.equal(out, ref), (out - ref).abs().max().item()


def test_capture_records_the_family_inputs_and_deepstack(qwen):
    gm = capture(qwen)
    meta = gm.meta["vlmopt"]
    assert meta["inputs"][-1] == "image_grid_thw" and meta["position_rows"] == 3
    assert meta["n_visual"] is None and meta["image_size"] is None
    ds = [n for n in gm.graph.nodes if n.meta.get("vlmopt", {}).get("block") == "deepstack"]
    n_ds = len(getattr(qwen.config.vision_config, "deepstack_visual_indexes", None) or [])
    assert len(ds) == n_ds == (2 if qwen.config.model_type == "qwen3_vl" else 0)
    assert node_by_block(gm, "vision").args[1].name == "image_grid_thw"


# ------------------------------------------------------------------ passes on Qwen-VL graphs

SAME = [[1, 8, 12], [1, 8, 12]]  # token passes batch images of one size (24 tokens each)


def _eager_attentions(model, batch):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        out = ref(**batch, output_attentions=True, logits_to_keep=1)
    return out.attentions  # per layer [B, H, T, T]


def _kept(gm, batch, target):
    """Per sample, the (t, h, w) M-RoPE positions of the visual tokens a drop node keeps."""
    _, pos, vis, amask, _ = record_modules(gm, batch, {target})[target][1]
    return [{tuple(pos[:, b, j].tolist()) for j in range(vis.shape[1]) if vis[b, j]}
            for b in range(vis.shape[0])]


def test_fastv_kept_set_equals_hf_eager_attention_with_mrope(qwen):
    batch = qwen_batch(qwen, SAME)
    cfg = dt.Config(keep={"layer_2": 0.5})  # FastV: layer 1's last-query attention, R = 50%
    gm, _ = run_passes(capture(qwen), [("drop_tokens", cfg)], example=batch)
    kept = _kept(gm, batch, "drop_2")
    att = _eager_attentions(qwen, batch)[1]
    vis = batch["input_ids"] == 60
    for b in range(2):
        row = att[b].mean(0)[-1]  # [T]
        slots = vis[b].nonzero()[:, 0]
        top = slots[row[slots].topk(12).indices]
        ref = {tuple(batch["position_ids"][:, b, j].tolist()) for j in top.tolist()}
        assert kept[b] == ref, f"sample {b}: {len(kept[b] ^ ref)} positions differ"


def test_fraction_budgets_follow_each_image_size(qwen):
    cfg = dt.Config(keep={"layer_1": 0.5, "layer_2": 0.5}, score_at="next")
    gm, _ = run_passes(capture(qwen), [("drop_tokens", cfg)])
    for grid, counts in (([1, 8, 12], [24, 12, 6]), ([1, 10, 6], [15, 8, 4])):
        batch = qwen_batch(qwen, [grid, grid])
        rec = record_modules(gm, batch, {f"layer_{i}" for i in range(3)})
        n_vis = [int(rec[f"layer_{i}"][0][4][0].sum()) for i in range(3)]
        assert n_vis == counts


def test_mixed_sizes_in_one_batch_are_refused_by_a_token_pass(qwen):
    gm, _ = run_passes(capture(qwen), [("drop_tokens", dt.Config(keep={"layer_2": 0.5}))])
    with pytest.raises(ValueError, match="different visual-token counts"):
        gm(**complete_inputs(qwen_batch(qwen, GRIDS)))


def test_selection_keeps_deepstack_features_of_the_kept_tokens(qwen):
    """DivPrune before layer 0, against HF's own language model run on the kept tokens (their
    embeddings, original M-RoPE ids and, for Qwen3-VL, their deepstack features)."""
    batch = qwen_batch(qwen, SAME)
    gm, _ = run_passes(capture(qwen), [("select_visual", sv.Config("divprune", 0.25))],
                       example=batch)
    hidden, pos, vis, amask, idx = record_modules(gm, batch, {"keep_visual"})["keep_visual"][1]
    assert int(vis[0].sum()) == 6
    with torch.no_grad():
        out = gm(**complete_inputs(batch))
        inner = qwen.model
        kw = {}
        if qwen.config.model_type == "qwen3_vl":
            feats = inner.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
            slot_vis = batch["input_ids"] == 60
            keep_slot = torch.zeros_like(slot_vis).scatter(1, idx, True) & slot_vis
            order = torch.cumsum(slot_vis.flatten(), 0).view_as(slot_vis) - 1  # feature row
            rows = order[keep_slot]
            kw = {"visual_pos_masks": vis,
                  "deepstack_visual_embeds": [f[rows] for f in feats.deepstack_features]}
        lm = inner.language_model(inputs_embeds=hidden, attention_mask=amask, position_ids=pos,
                                  **kw)
        ref = qwen.lm_head(lm.last_hidden_state[:, -1])
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max().item()


@pytest.mark.parametrize("passes", [
    [("freeze_visual", {"layers": ["layer_1"]})],
    [("lowrank_qk", {"q_ratio": {"_default": 0.5}, "k_ratio": {"_default": 0.5},
                     "whiten": False})],
    [("quantize", {"bits": {"_default": 8}})],
    [("select_visual", {"method": "random", "keep": 0.5}),
     ("drop_tokens", {"keep": {"layer_2": 0.5}, "score_at": "next"}),
     ("freeze_visual", {"layers": ["layer_2"]})],
])
def test_every_pass_runs_and_verifies_on_qwen(qwen, passes):
    batch = qwen_batch(qwen, SAME)
    passes = [(name, get_pass(name).config(**cfg)) for name, cfg in passes]
    with torch.no_grad():
        ref = capture(qwen)(**complete_inputs(batch))
        gm, _ = run_passes(capture(qwen), passes, example=batch)
        out = gm(**complete_inputs(batch))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    p = ref.softmax(-1)
    kl = (p * (p.log() - out.log_softmax(-1))).sum(-1).max().item()
    assert kl < 0.5, kl  # a random tiny model: the rewrite changes little, not nothing


# ------------------------------------------------------------------ cost model

@pytest.mark.parametrize("grid", [[1, 8, 12], [1, 10, 6]])
def test_cost_model_matches_flop_counter_on_the_whole_prefill(qwen, grid):
    from vlmopt import cost

    batch = qwen_batch(qwen, [grid])
    n_text = int(batch["input_ids"].shape[1]) - int(grid[1] * grid[2] // 4)
    s = model_shapes(qwen.config, grids=[grid])
    analytic = cost.prefill_flops(s, cost.baseline_layers(s, n_text))
    measured = cost.measure_prefill_breakdown(qwen, batch, fake=False)
    assert s.n_visual == grid[1] * grid[2] // 4
    assert measured["total"] == analytic["total"], (measured, analytic)
    assert measured["vision"] == analytic["vision"] + analytic["project"]  # merger in the tower
    for i in range(3):
        assert measured[f"layer_{i}"] == analytic[f"layer_{i}"]


def test_cost_model_counts_every_parameter(qwen):
    from vlmopt import cost

    s = model_shapes(qwen.config)
    wb = cost.weight_bytes(s, bytes_per_el=4)
    n = sum(p.numel() for p in qwen.parameters())
    assert wb["total"] == 4 * n, (wb["total"], 4 * n)


# ------------------------------------------------------------------ export layout (torch-free)

LAYOUT_GRIDS = [[1, 8, 12], [1, 10, 6], [1, 4, 4], [1, 12, 12]]  # incl. divisible by windows


def test_layout_tensors_equal_transformers_own_helpers():
    from transformers import vision_utils as vu

    from vlmopt import qwen_layout as ql

    g = torch.tensor(LAYOUT_GRIDS)
    assert np.array_equal(ql.vision_position_ids(g.numpy(), 2),
                          vu.get_vision_position_ids(g, 2).numpy())
    for window, patch in ((16, 4), (56, 4), (112, 14)):
        idx, cu = vu.get_vision_window_index(g, 2, window, patch)
        idx2, cu2 = ql.window_layout(g.numpy(), 2, window, patch)
        assert np.array_equal(idx.numpy(), idx2) and cu.tolist() == cu2
    ti, tw = vu.get_vision_interpolation_indices_and_weights(
        g, 8, mode="bilinear", align_corners=True, spatial_merge_size=2)
    ni, nw = ql.interpolation(g.numpy(), 8, 2)
    assert np.array_equal(ti.numpy(), ni) and np.abs(tw.numpy() - nw).max() < 1e-6


def test_mrope_positions_without_torch_equal_get_rope_index(qwen):
    from vlmopt import qwen_layout as ql

    b = qwen_batch(qwen, GRIDS)
    pos = ql.mrope_positions(b["input_ids"].numpy(), b["attention_mask"].numpy(),
                             b["image_grid_thw"].numpy(), 60, 2)
    assert np.array_equal(pos, b["position_ids"].numpy())


def test_vision_export_form_equals_the_tower(qwen):
    from vlmopt.export_vision import QwenVisionExport, layout_spec, layout_tensors
    from vlmopt.ir.blocks import QwenVision

    b = qwen_batch(qwen, GRIDS)
    n_ds = adapter_for(qwen).deepstack_layers()
    with torch.no_grad():
        ref = QwenVision(qwen.model.visual, n_ds)(b["pixel_values"], b["image_grid_thw"])
        out = QwenVisionExport(qwen.model.visual, n_ds)(
            b["pixel_values"], **layout_tensors(layout_spec(qwen.config), b["image_grid_thw"]))
    for r, o in zip(ref if n_ds else [ref], out if n_ds else [out]):
        assert (r - o).abs().max() <= 1e-6, (r - o).abs().max().item()


def test_visionzip_on_cls_free_towers_keeps_the_most_attended_tokens(qwen):
    """Dominant tokens by the head-mean attention received in the last ViT block, per 2x2
    merge group, computed here chunk by chunk from the block's own q/k."""
    from transformers import vision_utils as vu

    tower = qwen.model.visual
    batch = qwen_batch(qwen, SAME)
    seen = {}
    hook = tower.blocks[-1].register_forward_pre_hook(
        lambda m, a, kw: seen.update(x=a[0], kw=kw), with_kwargs=True)
    with torch.no_grad():
        tower(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    hook.remove()
    blk = tower.blocks[-1]
    x = blk.norm1(seen["x"])
    cos, sin = seen["kw"]["position_embeddings"]
    cu = seen["kw"]["cu_seqlens"].tolist()
    N, H = x.shape[0], blk.attn.num_heads
    q, k, _ = blk.attn.qkv(x).reshape(N, 3, H, -1).permute(1, 0, 2, 3).unbind(0)
    mod = __import__(type(blk.attn).__module__, fromlist=["x"])
    q, k = mod.apply_rotary_pos_emb_vision(q, k, cos, sin)
    recv = torch.zeros(N)
    for a, b in zip(cu, cu[1:]):
        p = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]).mul(blk.attn.scaling).softmax(-1)
        recv[a:b] = p.mean(0).sum(0).detach()
    recv = recv.reshape(-1, 4).mean(-1)
    if hasattr(tower, "fullatt_block_indexes"):
        idx, _ = vu.get_vision_window_index(batch["image_grid_thw"], 2, tower.window_size,
                                            tower.patch_size)
        recv = recv[torch.argsort(idx)]
    gm, _ = run_passes(capture(qwen), [("select_visual", sv.Config("visionzip", 0.25))],
                       example=batch)
    kept = _kept(gm, batch, "keep_visual")
    vis = batch["input_ids"] == 60
    for b in range(2):
        top = recv[24 * b:24 * (b + 1)].topk(6).indices
        slots = vis[b].nonzero()[:, 0][top]
        ref = {tuple(batch["position_ids"][:, b, j].tolist()) for j in slots.tolist()}
        assert kept[b] == ref, f"sample {b}: {len(kept[b] ^ ref)} positions differ"


def test_received_attention_holds_one_heads_probabilities_at_a_time():
    """The score never materializes [H, N, N]: the largest tensor it makes is one head's
    [N, N] (1344-px images on a 7B tower have ~9k patches: 5 GB for all 16 heads at once)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vlmopt.ir.received import received_attention

    class Largest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.most = max(self.most, t.numel())
            return out

    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

    N = 64
    attn = hf.Qwen2_5_VLVisionAttention(Qwen2_5_VLVisionConfig(hidden_size=16, num_heads=4))
    x = torch.randn(N, 16)
    cos, sin = torch.ones(N, 4), torch.zeros(N, 4)  # the identity rotation
    allowed = torch.ones(N, N, dtype=torch.bool)
    with torch.no_grad(), Largest() as m:
        got = received_attention(attn, x, cos, sin, allowed, 4)
    assert m.most <= N * N, f"largest tensor {m.most} elements (one head: {N * N})"
    q, k, _ = attn.qkv(x).reshape(N, 3, 4, 4).permute(1, 2, 0, 3).unbind(0)  # [H, N, hd]
    ref = (q @ k.transpose(1, 2) * attn.scaling).softmax(-1).mean(0).sum(0).reshape(16, 4).mean(-1)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)


def test_visionzip_contextual_tokens_need_a_fixed_grid(qwen):
    with pytest.raises(ValueError, match="contextual tokens need a fixed"):
        run_passes(capture(qwen), [("select_visual", sv.Config("visionzip", 12, 2))])


def test_received_attention_costs_what_flop_counter_counts(qwen):
    from torch.utils.flop_counter import FlopCounterMode

    from vlmopt import cost
    from vlmopt.cost_vision import received_attention_flops
    from vlmopt.ir.blocks import QwenVision
    from vlmopt.ir.received import QwenVisionReceived

    cost.register_sdpa_flop_formulas()
    b = qwen_batch(qwen, SAME[:1])  # one sample: the cost model's unit
    n_ds = adapter_for(qwen).deepstack_layers()
    counts = []
    for mod in (QwenVision(qwen.model.visual, n_ds), QwenVisionReceived(qwen.model.visual, n_ds)):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            mod(b["pixel_values"], b["image_grid_thw"])
        counts.append(fc.get_total_flops())
    extra = received_attention_flops(qwen.config.vision_config, SAME[:1])
    assert counts[1] - counts[0] == extra, (counts, extra)
