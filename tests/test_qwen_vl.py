"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL: family adapter, capture and passes on tiny random models."""

from __future__ import annotations

import pytest
import torch
from helpers import QWEN_TYPES, build_tiny_qwen, qwen_batch

from vlmopt.frontend.load import adapter_for
from vlmopt.ir.capture import capture, complete_inputs, node_by_block

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
