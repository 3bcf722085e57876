"""InternVL family: InternViT tiles (CLS dropped), pixel shuffle, LayerNorm MLP projector, a
Qwen2 decoder (vlmopt.frontend.internvl). A tiny random-weight checkpoint built here
(tests/helpers_internvl.py)."""

from __future__ import annotations

import family_checks as fc
import numpy as np
import pytest
from helpers_internvl import make_tiny_dir

from vlmopt.frontend.load import load

SIZES = [(50, 70), (30, 130), (97, 41)]  # 1x1, 4x1 + thumbnail, 1x2 + thumbnail


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load(make_tiny_dir(tmp_path_factory.mktemp("internvl")))


def test_identity_plan_is_bit_exact(tiny):
    b = fc.batch(tiny, SIZES)
    assert b["pixel_values"].shape[0] > len(SIZES)  # tiled: more tiles than images
    fc.identity_is_bit_exact(tiny, b)


@pytest.mark.parametrize("size", SIZES)
def test_cost_model_matches_flop_counter(tiny, size):
    fc.cost_matches_flop_counter(tiny, size)


def test_cost_model_counts_every_parameter(tiny):
    fc.every_parameter_counted(tiny)


ODD = [(50, 70), (30, 130), (97, 41), (7, 300), (129, 128), (64, 64), (33, 31), (200, 90)]


@pytest.mark.parametrize("size", ODD)
def test_numpy_preprocessing_matches_the_image_processor(tiny, size):
    from vlmopt import preprocess_internvl as pv

    im = fc.images([size], seed=sum(size))[0]
    ref = tiny.processor.image_processor(images=[im], return_tensors="np")
    tiles = pv.pixels(im, pv.image_config(tiny.path))
    assert tiles.dtype == np.float32 and np.array_equal(tiles, ref["pixel_values"])
    assert pv.tiles_for_size(*size, pv.image_config(tiny.path)) == len(tiles)


def test_plan_exports_with_parity_and_runs_without_torch(tiny, tmp_path):
    fc.exports_with_parity_and_runs_without_torch(
        tiny, tmp_path, [(50, 70), (30, 130)],
        ("input_ids", "attention_mask", "position_ids", "pixel_values"))


def test_short_optimize_runs(tiny, tmp_path):
    fc.short_optimize_runs(tiny, tmp_path)


def test_tile_preprocessing_imports_and_runs_with_torch_unimportable(tmp_path):
    """The runtime's tile preprocessing (InternVL and Idefics3) needs neither torch nor
    transformers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    shim = tmp_path / "shim"
    shim.mkdir()
    # NOTE: sys.modules[name] = None makes every `import torch` raise ImportError
    (shim / "sitecustomize.py").write_text(
        "import sys\nfor m in ('torch', 'torchvision', 'transformers'):\n"
        "    sys.modules[m] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), str(repo)]))
    code = ("from PIL import Image\nimport vlmopt.preprocess_internvl as v\n"
            "import vlmopt.preprocess_idefics3 as i\nimport vlmopt.runtime_tiles\n"
            "im = Image.new('RGB', (37, 91))\n"
            "print(len(v.pixels(im, v.TilingConfig(tile=32))), "
            "len(i.pixels(im, i.TileImageConfig(longest_edge=128, tile=32))[0]))\n")
    assert subprocess.run([sys.executable, "-c", "import torch"], env=env,
                          capture_output=True).returncode != 0  # the shim works
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    from vlmopt import preprocess_idefics3 as pi
    from vlmopt import preprocess_internvl as pv

    im = fc.images([(91, 37)])[0]
    assert run.stdout.split() == [
        str(len(pv.pixels(im, pv.TilingConfig(tile=32)))),
        str(len(pi.pixels(im, pi.TileImageConfig(longest_edge=128, tile=32))[0]))]


@pytest.mark.parametrize("config,family,needle", [
    (b"\xff\xfe{", "smolvlm-2b", "not valid JSON"),
    (b"[1, 2]", "smolvlm-2b", "expected a JSON object"),
    (b'{"size": 5}', "smolvlm-2b", "size must be a dict"),
    (b'{"max_image_size": {"longest_edge": 0}}', "smolvlm-2b", "tile must be a positive"),
    (b'{"size": {"height": 448, "width": 300}}', "internvl3-8b", "must be a square"),
    (b'{"crop_to_patches": true, "max_patches": -2, "size": {"height": 448, "width": 448}}',
     "internvl3-8b", "max_patches must be a positive integer"),
])
def test_a_bad_tile_image_config_is_one_error_line(tmp_path, capsys, config, family, needle):
    """The tile families' image processor config: one line naming the file, exit 2."""
    import shutil
    from pathlib import Path

    from vlmopt.cli import main

    ck = tmp_path / family
    shutil.copytree(Path(__file__).resolve().parent.parent / "examples/configs" / family, ck)
    (ck / "preprocessor_config.json").write_bytes(config)
    assert main(["flops", str(ck), "--image-size", "300x200"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "preprocessor_config.json" in err[0] and needle in err[0], err
