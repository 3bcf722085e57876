"""The Qwen-VL vision-tower cost model (vlmopt.cost_vision) against FlopCounterMode, exactly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from vlmopt import cost
from vlmopt.cost_vision import (
    n_llm_tokens,
    qwen_vision_breakdown,
    qwen_vision_flops,
    qwen_vision_param_bytes,
)

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"
# several images at once, non-square, a 2-frame video; with patch 4, merge 2 and a 24 px window
# (3 x 3 merged cells) the 8 x 12 grid cuts into 3x3, 3x3, 1x3, 1x3 windows and the 10 x 6 grid
# into 3x3, 2x3; the 12 x 12 grid divides evenly (HF pads a whole empty window row there)
GRID_SETS = [[(1, 8, 12)], [(1, 8, 12), (1, 10, 6)], [(1, 12, 12), (2, 4, 6), (1, 2, 2)]]
_MERGER = re.compile(r"\.(merger|deepstack_merger_list\.\d+)$")


def tiny_vision_config(family: str, attn: str = "sdpa", **overrides):
    """Depth 4, hidden 32, 2 heads, 4 px patches; Qwen2.5 windows 24 px, full attention in
    block 1; Qwen3 with deepstack mergers after blocks 0 and 2."""
    from transformers import Qwen2_5_VLVisionConfig, Qwen2VLVisionConfig, Qwen3VLVisionConfig

    common = dict(depth=4, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    if family == "qwen2_vl":
        vc = Qwen2VLVisionConfig(embed_dim=32, hidden_size=48, mlp_ratio=4, **common)
    elif family == "qwen2_5_vl":
        vc = Qwen2_5_VLVisionConfig(hidden_size=32, intermediate_size=40, out_hidden_size=48,
                                    window_size=24, fullatt_block_indexes=[1], **common)
    else:
        vc = Qwen3VLVisionConfig(hidden_size=32, intermediate_size=40, out_hidden_size=48,
                                 num_position_embeddings=16, deepstack_visual_indexes=[0, 2],
                                 **common)
    for k, v in overrides.items():
        setattr(vc, k, v)
    vc._attn_implementation = attn
    return vc


def vision_module(vc) -> torch.nn.Module:
    """The HF vision tower (what ``model.model.visual`` holds) for a vision config."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q25
    from transformers.models.qwen2_vl import modeling_qwen2_vl as q2
    from transformers.models.qwen3_vl import modeling_qwen3_vl as q3

    cls = {"qwen2_vl_vision": q2.Qwen2VisionTransformerPretrainedModel,
           "qwen2_5_vl_vision": q25.Qwen2_5_VisionTransformerPretrainedModel,
           "qwen3_vl_vision": q3.Qwen3VLVisionModel}[vc.model_type]
    return cls(vc).eval()


def pixels(vc, grids) -> torch.Tensor:
    """Flattened patches as the image processor emits them: [N, C * tp * p * p]."""
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2)


def measure(model: torch.nn.Module, vc, grids) -> tuple[dict[str, int], int]:
    """FlopCounterMode FLOPs of one forward ("vision", "merger", "total") and the number of
    merged tokens it returns. Real parameters are swapped for fake ones (cost.fake_weights)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils.flop_counter import FlopCounterMode

    cost.register_sdpa_flop_formulas()
    x, grid_thw = pixels(vc, grids), torch.tensor(grids)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        if isinstance(next(model.parameters()), FakeTensor):
            out = model(x, grid_thw)
        else:
            with cost.fake_weights(model):
                out = model(x, grid_thw)
    merger = sum(sum(c.values()) for mod, c in fc.get_flop_counts().items() if _MERGER.search(mod))
    total = fc.get_total_flops()
    return {"vision": total - merger, "merger": merger, "total": total}, out.pooler_output.shape[0]


def assert_exact(measured: dict, analytic: dict, what: str) -> None:
    assert measured == analytic, f"{what}: FlopCounterMode {measured} != formula {analytic}"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("grids", GRID_SETS, ids=lambda g: "+".join("x".join(map(str, x))
                                                                    for x in g))
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_formula_matches_flop_counter_exactly(family, grids, attn):
    vc = tiny_vision_config(family, attn)
    torch.manual_seed(0)
    measured, n_out = measure(vision_module(vc), vc, grids)
    assert_exact(measured, qwen_vision_breakdown(vc, grids), f"{family} {grids} {attn}")
    assert n_llm_tokens(vc, grids) == n_out


def test_window_attention_is_priced_per_window_at_its_real_size():
    """Every block windowed vs every block full: only attention changes, by exactly the sum of
    the windows' n^2 against the frames' n^2 (8 x 12 grid: windows of 36, 36, 12, 12 tokens)."""
    grids = [(1, 8, 12)]
    windowed = tiny_vision_config("qwen2_5_vl", fullatt_block_indexes=[])
    full = tiny_vision_config("qwen2_5_vl", fullatt_block_indexes=[0, 1, 2, 3])
    measured_w, _ = measure(vision_module(windowed), windowed, grids)
    measured_f, _ = measure(vision_module(full), full, grids)
    assert_exact(measured_w, qwen_vision_breakdown(windowed, grids), "all windowed")
    assert_exact(measured_f, qwen_vision_breakdown(full, grids), "all full")
    d, depth = 32, 4
    per_window = sum(4 * n * n * d for n in (36, 36, 12, 12))  # QK^T and A.V, 2 FLOPs a MAC
    assert measured_f["total"] - measured_w["total"] == depth * (4 * 96 ** 2 * d - per_window)


def test_deepstack_mergers_are_counted_once_per_existing_block():
    """Qwen3-VL builds a merger per listed index; one listed past the last block never runs."""
    grids = [(1, 8, 12)]
    vc = tiny_vision_config("qwen3_vl", deepstack_visual_indexes=[1, 9])
    model = vision_module(vc)
    measured, _ = measure(model, vc, grids)
    assert_exact(measured, qwen_vision_breakdown(vc, grids), "deepstack [1, 9]")
    single = qwen_vision_breakdown(tiny_vision_config("qwen3_vl", deepstack_visual_indexes=[]),
                                   grids)["merger"]
    assert measured["merger"] == 2 * single  # final merger + the one after block 1
    assert qwen_vision_param_bytes(vc, 1) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_param_bytes_count_every_parameter_of_the_module(family):
    vc = tiny_vision_config(family)
    n = sum(p.numel() for p in vision_module(vc).parameters())
    assert qwen_vision_param_bytes(vc, 1) == n
    assert qwen_vision_param_bytes(vc, 2) == 2 * n


def _real(name: str):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(CONFIGS / name)
    cfg.vision_config._attn_implementation = "sdpa"
    return cfg


@pytest.mark.parametrize("name,grid", [("qwen2-vl-7b", (1, 32, 32)),
                                       ("qwen2.5-vl-7b", (1, 32, 32)),
                                       ("qwen3-vl-8b", (1, 28, 28))])
def test_real_shapes_match_under_fake_tensors(name, grid):
    """The published 7B/8B towers at one 448 x 448 image, built with fake parameters."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = _real(name)
    vc = cfg.vision_config
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = vision_module(vc)
    measured, n_out = measure(model, vc, [grid])
    assert_exact(measured, qwen_vision_breakdown(cfg, [grid]), f"{name} {grid}")
    assert n_out == n_llm_tokens(vc, [grid]) == grid[1] * grid[2] // 4
    assert qwen_vision_param_bytes(vc, 2) == 2 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,cls,arch", [
    ("qwen2-vl-7b", "Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    ("qwen2.5-vl-7b", "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    ("qwen3-vl-8b", "Qwen3VLConfig", "Qwen3VLForConditionalGeneration")])
def test_config_only_checkpoints_load_and_map_images_to_grids(name, cls, arch):
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
        smart_resize,
    )

    cfg = getattr(transformers, cls).from_pretrained(CONFIGS / name)
    assert cfg.architectures == [arch]
    proc = Qwen2VLImageProcessorPil.from_pretrained(CONFIGS / name)
    vc = cfg.vision_config
    assert (proc.patch_size, proc.merge_size, proc.temporal_patch_size) == (
        vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size)
    factor = vc.patch_size * vc.spatial_merge_size
    h, w = smart_resize(448, 448, factor=factor, min_pixels=proc.size.shortest_edge,
                        max_pixels=proc.size.longest_edge)
    assert (h // vc.patch_size, w // vc.patch_size) == ((32, 32) if factor == 28 else (28, 28))


def test_formula_rejects_what_it_cannot_price():
    vc = tiny_vision_config("qwen2_5_vl")
    with pytest.raises(ValueError, match="spatial_merge_size"):
        qwen_vision_flops(vc, [(1, 7, 8)])
    with pytest.raises(ValueError, match="window_size"):
        qwen_vision_flops(tiny_vision_config("qwen2_5_vl", window_size=4), [(1, 8, 8)])
    from transformers import CLIPVisionConfig

    with pytest.raises(ValueError, match="not a Qwen-VL"):
        qwen_vision_flops(CLIPVisionConfig(), [(1, 8, 8)])
