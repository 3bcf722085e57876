"""The command line: user errors are one line on stderr and exit code 2; commands do their job."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import write_jsonl
from PIL import Image

from vlmopt.cli import main
from vlmopt.data import synthvqa


def _fails_with_one_line(capsys, argv) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vlmopt: error: ")
    assert "Traceback" not in err + out
    return lines[0]


@pytest.fixture
def small_data(tmp_path):
    """data.jsonl with 3 good SynthVQA records under tmp_path/d."""
    return synthvqa.write_dataset(tmp_path / "d", 3, seed=7)


def test_wrong_model_path_is_one_line_error(capsys, tmp_path, small_data):
    msg = _fails_with_one_line(capsys, ["eval", str(tmp_path / "nope"), "--data",
                                        str(small_data)])
    assert "nope" in msg and "no such model directory" in msg


def test_model_errors_come_before_data_errors(capsys, tmp_path):
    msg = _fails_with_one_line(capsys, ["eval", str(tmp_path / "nope"), "--data",
                                        str(tmp_path / "missing.jsonl")])
    assert "no such model directory" in msg and "missing.jsonl" not in msg


def test_unsupported_family_dir_is_one_line_error(capsys, tmp_path, small_data):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    msg = _fails_with_one_line(capsys, ["eval", str(tmp_path / "bert"), "--data",
                                        str(small_data)])
    assert "unsupported model family" in msg and "'bert'" in msg


def test_bad_jsonl_line_is_one_line_error_naming_file_and_line(capsys, tiny_llava, small_data):
    with open(small_data, "a") as f:
        f.write("{broken\n")
    msg = _fails_with_one_line(capsys, ["eval", str(tiny_llava), "--data", str(small_data)])
    assert f"{small_data}:4" in msg


def test_missing_image_is_one_line_error(capsys, tiny_llava, small_data):
    (small_data.parent / "images" / "00001.png").unlink()
    msg = _fails_with_one_line(capsys, ["eval", str(tiny_llava), "--data", str(small_data)])
    assert f"{small_data}:2" in msg and "00001.png" in msg


def test_undecodable_image_is_one_line_error(capsys, tiny_llava, small_data):
    (small_data.parent / "images" / "00002.png").write_bytes(b"garbage")
    msg = _fails_with_one_line(capsys, ["eval", str(tiny_llava), "--data", str(small_data)])
    assert f"{small_data}:3" in msg and "00002.png" in msg


def test_prompt_without_placeholder_is_one_line_error(capsys, tiny_llava, tmp_path):
    Image.new("RGB", (112, 112)).save(tmp_path / "a.png")
    data = write_jsonl(tmp_path / "data.jsonl", [{"image": "a.png", "prompt": "no image here"}])
    msg = _fails_with_one_line(capsys, ["eval", str(tiny_llava), "--data", str(data)])
    assert f"{data}:1" in msg and "<image>" in msg


def test_eval_of_a_directory_model_requires_data(capsys, tiny_llava):
    assert "--data is required" in _fails_with_one_line(capsys, ["eval", str(tiny_llava)])


def test_data_synth_refuses_a_non_empty_directory_and_overwrites_nothing(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.jsonl").write_text("precious\n")
    msg = _fails_with_one_line(capsys, ["data", "synth", "--n", "2", "--out", str(out)])
    assert str(out) in msg and "not empty" in msg
    assert (out / "data.jsonl").read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == ["data.jsonl"]


def test_data_synth_writes_n_images_and_a_jsonl(capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["data", "synth", "--n", "5", "--seed", "3", "--out", str(out)]) == 0
    assert "wrote 5 samples" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:05d}.png" for i in range(5)]
    recs = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["answer"]) for r in recs] == [
        (synthvqa.sample(3, i).prompt, synthvqa.sample(3, i).answer) for i in range(5)]


def test_data_synth_into_an_existing_empty_directory_is_allowed(capsys, tmp_path):
    assert main(["data", "synth", "--n", "1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "data.jsonl").is_file()


def test_non_positive_n_is_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--n", "0", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "--n must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_json_prints_the_metrics(capsys, tiny_llava, synth_data):
    rc = main(["eval", str(tiny_llava), "--data", str(synth_data), "--json", "--limit", "7",
               "--batch-size", "4"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    assert {"accuracy", "per_type", "agreement", "kl", "samples_per_s"} <= set(res)
    assert res["n"] == 7 and res["model"] == str(tiny_llava)
    assert set(res["per_type"]) == set(synthvqa.QUESTION_TYPES)  # first 7 = one of each type
    assert 0.0 <= res["accuracy"] <= 1.0
    assert res["agreement"] == 1.0 and res["kl"] == 0.0 and res["reference"] == "self"
    assert res["samples_per_s"] > 0 and res["blank_image"] is False


def test_eval_json_blank_image_compares_with_the_real_image(capsys, tiny_llava, synth_data):
    rc = main(["eval", str(tiny_llava), "--data", str(synth_data), "--json", "--limit", "4",
               "--blank-image"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["blank_image"] is True and res["reference"] == "original"
    assert res["kl"] > 0


def test_eval_table_output(capsys, tiny_llava, synth_data):
    assert main(["eval", str(tiny_llava), "--data", str(synth_data), "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "overall" in out and "agreement: 1.000" in out and "samples: 3" in out


def test_cli_subprocess_error_is_exactly_one_stderr_line(tmp_path, small_data):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    r = subprocess.run([sys.executable, "-m", "vlmopt.cli", "eval", str(tmp_path / "bert"),
                        "--data", str(small_data)], capture_output=True, text=True, check=False,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmopt: error: "), r.stderr
    assert "unsupported model family" in lines[0]
