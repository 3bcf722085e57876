"""Runtime: ONNX Runtime alone (no torch), its own preprocessing, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from artifacts import build
from PIL import Image

from vlmopt import inputs
from vlmopt.cli import main
from vlmopt.data.dataset import load_records
from vlmopt.runtime import Artifact, Preprocessor

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def arts(tmp_path_factory, tiny_llava, loaded_tiny, synth_data):
    return build(tmp_path_factory, tiny_llava, loaded_tiny, synth_data)


@pytest.fixture
def art_copy(arts, tmp_path):
    d = tmp_path / "art"
    shutil.copytree(arts["identity"].dir, d)
    return d


def test_preprocessing_equals_the_hf_processor(tiny_llava, loaded_tiny, synth_data):
    recs = load_records(str(synth_data))[:5]
    images = [r.load_image() for r in recs]
    rng = np.random.default_rng(0)  # odd sizes and modes: resize, crop and RGB conversion
    images.append(Image.fromarray(rng.integers(0, 255, (150, 131, 4), dtype=np.uint8), "RGBA"))
    images.append(Image.fromarray(rng.integers(0, 255, (97, 240), dtype=np.uint8), "L"))
    prompts = [r.prompt for r in recs] + ["Is there a red circle?\n<image>",
                                          "<image>\nWhat is in the top left corner?"]
    ref = inputs.encode(loaded_tiny.processor, prompts, images)
    got = Preprocessor(tiny_llava).encode(prompts, images)
    for k in ("input_ids", "attention_mask", "position_ids"):
        assert np.array_equal(got[k], ref[k].numpy()), k
    diff = np.abs(got["pixel_values"] - ref["pixel_values"].numpy()).max()
    assert got["pixel_values"].shape == tuple(ref["pixel_values"].shape) and diff <= 1e-6, diff


def _no_torch_env(tmp_path) -> dict:
    shim = tmp_path / "shim"
    shim.mkdir()
    # NOTE: sys.modules[name] = None makes every `import torch` raise ImportError
    (shim / "sitecustomize.py").write_text(
        "import sys\nfor m in ('torch', 'torchvision', 'transformers'):\n"
        "    sys.modules[m] = None\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(REPO)])
    return env


def test_run_generates_with_onnx_runtime_alone_without_torch(arts, synth_data, tmp_path):
    rec = load_records(str(synth_data))[0]
    env = _no_torch_env(tmp_path)
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    assert check.returncode != 0  # the shim works
    a = arts["optimized"]
    cmd = [sys.executable, "-m", "vlmopt.cli", "run", str(a.dir), "--image",
           str(rec.image), "--prompt", rec.prompt, "--max-new-tokens", "3"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    art = Artifact(a.dir)
    pre = Preprocessor(a.dir / "processor")
    expect = art.generate(pre, [rec.prompt], [rec.load_image()], max_new_tokens=3)[0]
    assert p.stdout.strip() == expect


def _err(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_run_on_a_directory_that_is_not_an_artifact_is_one_error_line(tmp_path, capsys):
    assert main(["run", str(tmp_path), "--image", "x.png", "--prompt", "<image>"]) == 2
    err = _err(capsys)
    assert len(err) == 1 and err[0].startswith("vlmopt: error:") and "manifest.json" in err[0]


def test_run_on_a_missing_directory_is_one_error_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope"), "--image", "x.png", "--prompt", "<image>"]) == 2
    assert "no such artifact" in _err(capsys)[0]


def test_a_checksum_mismatch_is_refused(art_copy, synth_data, capsys):
    tok = art_copy / "processor" / "tokenizer.json"
    tok.write_text(tok.read_text().replace("circle", "circel"))
    rec = load_records(str(synth_data))[0]
    assert main(["run", str(art_copy), "--image", str(rec.image), "--prompt",
                 rec.prompt]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "checksum mismatch" in err[0] and "tokenizer.json" in err[0]


def test_a_missing_graph_file_is_refused(art_copy, synth_data, capsys):
    (art_copy / "onnx" / "decode.onnx").unlink()
    assert main(["eval", str(art_copy), "--data", str(synth_data)]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "onnx/decode.onnx is missing" in err[0]


def test_a_manifest_that_is_not_json_is_refused(art_copy, capsys):
    (art_copy / "manifest.json").write_text("{not json")
    assert main(["run", str(art_copy), "--image", "x.png", "--prompt", "<image>"]) == 2
    assert "not valid JSON" in _err(capsys)[0]


def test_an_image_of_the_wrong_kind_is_refused(arts, synth_data, capsys):
    assert main(["run", str(arts["identity"].dir), "--image", str(synth_data), "--prompt",
                 "What is it?\n<image>"]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "not an image" in err[0]


def test_a_missing_image_and_a_prompt_without_image_token_are_refused(arts, synth_data,
                                                                      capsys):
    d = str(arts["identity"].dir)
    assert main(["run", d, "--image", "nope.png", "--prompt", "<image>"]) == 2
    assert "no such file" in _err(capsys)[0]
    rec = load_records(str(synth_data))[0]
    assert main(["run", d, "--image", str(rec.image), "--prompt", "no image"]) == 2
    assert "<image>" in _err(capsys)[0]


def test_manifest_checksums_cover_every_graph_and_processor_file(arts):
    d = arts["identity"].dir
    m = json.loads((d / "manifest.json").read_text())
    on_disk = {p.relative_to(d).as_posix() for p in d.rglob("*")
               if p.is_file() and p.parts[len(d.parts)] in ("onnx", "processor")}
    assert set(m["files"]) == on_disk


def test_cuda_provider_without_onnxruntime_gpu_is_one_error_line(arts, synth_data, capsys):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    rec = load_records(str(synth_data))[0]
    assert main(["run", str(arts["identity"].dir), "--image", str(rec.image), "--prompt",
                 rec.prompt, "--provider", "cuda"]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "onnxruntime-gpu" in err[0]


def test_benchmark_sessions_can_stop_spinning(arts):
    d = arts["identity"].dir
    key = "session.intra_op.allow_spinning"
    calm = Artifact(d, spinning=False).prefill.get_session_options()
    assert calm.get_session_config_entry(key) == "0"
    default = Artifact(d).prefill.get_session_options()  # ONNX Runtime's own default: unset
    with pytest.raises(RuntimeError, match="does not have configuration"):
        default.get_session_config_entry(key)
