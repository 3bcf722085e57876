"""Idefics3 / SmolVLM family: tiles + pixel shuffle connector, a Llama decoder (vlmopt.frontend
.idefics3). Tiny random-weight checkpoints built here (tests/helpers_tiles.py)."""

from __future__ import annotations

import family_checks as fc
import numpy as np
import pytest
import torch
from helpers_tiles import make_tiny_dir

from vlmopt.frontend.load import load

SIZES = [(50, 70), (30, 30), (97, 41)]  # odd sizes: 3x4, 4x4 and 4x2 tiles + the global one


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def tiny(request, tmp_path_factory):
    return load(make_tiny_dir(tmp_path_factory.mktemp(request.param), request.param))


def test_identity_plan_is_bit_exact_with_padded_tiles(tiny):
    b = fc.batch(tiny, SIZES)
    n = b["pixel_values"].shape[1]
    assert (b["pixel_values"][2, n - 1] == 0).all()  # sample 2 has fewer tiles: padding
    fc.identity_is_bit_exact(tiny, b)


@pytest.mark.parametrize("size", SIZES)
def test_cost_model_matches_flop_counter(tiny, size):
    fc.cost_matches_flop_counter(tiny, size)


def test_cost_model_counts_every_parameter(tiny):
    fc.every_parameter_counted(tiny)


# ------------------------------------------------------------------ torch-free preprocessing

ODD = [(50, 70), (30, 30), (97, 41), (7, 300), (129, 128), (32, 32), (33, 31)]


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("size", ODD)
def test_numpy_preprocessing_matches_the_image_processor(tiny, size, split):
    from vlmopt import preprocess_idefics3 as pi

    ip = tiny.processor.image_processor
    cfg = pi.image_config(tiny.path)
    if not split:
        cfg = pi.TileImageConfig(**{**cfg.__dict__, "do_image_splitting": False})
    im = fc.images([size], seed=sum(size))[0]
    ref = ip(images=[[im]], return_tensors="np", return_row_col_info=True,
             do_image_splitting=split)
    tiles, mask, rows, cols = pi.pixels(im, cfg)
    assert tiles.dtype == np.float32 and np.array_equal(tiles, ref["pixel_values"][0])
    assert np.array_equal(mask, ref["pixel_attention_mask"][0])
    assert (rows, cols) == (ref["rows"][0][0], ref["cols"][0][0])
    assert pi.tiles_for_size(*size, cfg) == len(tiles)


@pytest.mark.parametrize("size", ODD[:4])
def test_image_prompt_is_the_processors(tiny, size):
    from vlmopt import preprocess_idefics3 as pi

    im = fc.images([size])[0]
    text = "what colour is the shape ? <image>"
    ref = tiny.processor(text=[text], images=[[im]], return_tensors="np")["input_ids"][0]
    _, _, rows, cols = pi.pixels(im, pi.image_config(tiny.path))
    mine = text.replace("<image>", pi.image_prompt(rows, cols, tiny.adapter.tokens_per_tile))
    ids = tiny.processor.tokenizer(mine, return_tensors="np")["input_ids"][0]
    assert np.array_equal(ids, ref)


# ------------------------------------------------------------------ passes, export, runtime

def test_plan_exports_with_parity_and_runs_without_torch(tiny, tmp_path):
    fc.exports_with_parity_and_runs_without_torch(
        tiny, tmp_path, [(50, 70), (97, 41)],
        ("input_ids", "attention_mask", "position_ids", "pixel_values", "pixel_attention_mask"))


def test_short_optimize_runs(tiny, tmp_path):
    fc.short_optimize_runs(tiny, tmp_path)


def test_padding_tiles_do_not_reach_the_llm(tiny):
    """A batch padded with all-zero tiles gives each sample the logits it has alone."""
    from vlmopt import inputs
    from vlmopt.ir.capture import capture, graph_runner

    run = graph_runner(capture(tiny))
    p = "what colour is the shape ? <image>"
    big, small = fc.images([(50, 70), (97, 41)])
    both = run(inputs.encode(tiny.processor, [p, p], [big, small]))
    alone = run(inputs.encode(tiny.processor, [p], [small]))
    assert torch.allclose(both[1], alone[0], atol=1e-5)
