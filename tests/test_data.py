"""Calibration-format datasets: every error names the file and the line."""

from __future__ import annotations

import json

import pytest
from helpers import write_jsonl
from PIL import Image

from vlmopt.data import dataset, synthvqa
from vlmopt.data.dataset import Record, load_records
from vlmopt.errors import VlmoptError


@pytest.fixture
def img_dir(tmp_path):
    """tmp_path with a real image at images/a.png."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (112, 112), (10, 20, 30)).save(tmp_path / "images" / "a.png")
    return tmp_path


GOOD = {"image": "images/a.png", "prompt": "<image>\nWhat colour is the square?",
        "answer": "red", "type": "colour"}


def _error(spec, **kw) -> str:
    with pytest.raises(VlmoptError) as e:
        load_records(spec, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_good_file_loads_with_images_resolved_relative_to_the_jsonl(img_dir, tmp_path_factory,
                                                                    monkeypatch):
    path = write_jsonl(img_dir / "data.jsonl", [GOOD, {**GOOD, "answer": None, "type": None}])
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # not relative to the cwd
    recs = load_records(path)
    assert len(recs) == 2
    assert recs[0].image == (img_dir / "images" / "a.png").resolve()
    assert (recs[0].prompt, recs[0].answer, recs[0].type) == (GOOD["prompt"], "red", "colour")
    assert recs[1].answer is None and recs[1].type is None
    assert recs[0].where == f"{path}:1" and recs[1].where == f"{path}:2"
    im = recs[0].load_image()
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (10, 20, 30)


def test_directory_spec_reads_its_data_jsonl(img_dir):
    write_jsonl(img_dir / "data.jsonl", [GOOD])
    assert load_records(img_dir)[0].image == (img_dir / "images" / "a.png").resolve()


def test_limit_returns_n_records_but_the_whole_file_is_validated(img_dir):
    path = write_jsonl(img_dir / "data.jsonl", [GOOD] * 5)
    assert len(load_records(path, limit=3)) == 3
    bad = write_jsonl(img_dir / "bad.jsonl", [GOOD] * 5 + ["not json"])
    with pytest.raises(VlmoptError, match=f"{bad}:6"):
        load_records(bad, limit=3)  # a broken file is broken whatever the limit


def test_blank_lines_are_skipped_but_still_counted(img_dir):
    path = write_jsonl(img_dir / "data.jsonl", [GOOD, "", "   ", "{oops"])
    assert f"{path}:4" in _error(path)


def test_line_that_is_not_json_names_file_and_line(img_dir):
    path = write_jsonl(img_dir / "data.jsonl", [GOOD, "{not json"])
    msg = _error(path)
    assert f"{path}:2" in msg and "data.jsonl:2" in msg
    assert "not valid JSON" in msg


def test_line_that_is_not_an_object_names_file_and_line(img_dir):
    path = write_jsonl(img_dir / "data.jsonl", [GOOD, GOOD, "[1, 2]"])
    msg = _error(path)
    assert f"{path}:3" in msg and "JSON object" in msg


def test_line_without_prompt_names_file_and_line(img_dir):
    path = write_jsonl(img_dir / "data.jsonl", [GOOD, {"image": "images/a.png"}])
    msg = _error(path)
    assert f"{path}:2" in msg and "'prompt'" in msg


def test_line_without_image_names_file_and_line(img_dir):
    path = write_jsonl(img_dir / "data.jsonl", [{"prompt": "<image> hi"}])
    msg = _error(path)
    assert f"{path}:1" in msg and "'image'" in msg


@pytest.mark.parametrize("prompt", ["What colour is the square?", "<image> <image> twice"])
def test_prompt_without_exactly_one_placeholder_names_file_and_line(img_dir, prompt):
    path = write_jsonl(img_dir / "data.jsonl", [GOOD, {**GOOD, "prompt": prompt}])
    msg = _error(path)
    assert f"{path}:2" in msg and "<image>" in msg


def test_non_string_answer_names_file_and_line(img_dir):
    path = write_jsonl(img_dir / "data.jsonl", [{**GOOD, "answer": 3}])
    assert f"{path}:1" in _error(path)


def test_missing_image_names_file_line_and_image(img_dir):
    path = write_jsonl(img_dir / "data.jsonl", [GOOD, {**GOOD, "image": "images/nope.png"}])
    msg = _error(path)
    assert f"{path}:2" in msg and "nope.png" in msg and "not found" in msg


def test_missing_image_is_reported_at_load_image_when_not_checked_upfront(img_dir):
    path = write_jsonl(img_dir / "data.jsonl", [{**GOOD, "image": "images/nope.png"}])
    (rec,) = load_records(path, check_images=False)
    with pytest.raises(VlmoptError, match="nope.png") as e:
        rec.load_image()
    assert f"{path}:1" in str(e.value)


def test_undecodable_image_raises_vlmopt_error_naming_the_file(img_dir):
    (img_dir / "x.png").write_bytes(b"this is not a png \x00\x01\x02" * 10)
    path = write_jsonl(img_dir / "data.jsonl", [GOOD, {**GOOD, "image": "x.png"}])
    recs = load_records(path)  # the file exists: decoding happens later
    recs[0].load_image()
    with pytest.raises(VlmoptError) as e:
        recs[1].load_image()
    msg = str(e.value)
    assert f"{path}:2" in msg and "x.png" in msg and "cannot decode" in msg


def test_truncated_png_raises_vlmopt_error(img_dir):
    good = (img_dir / "images" / "a.png").read_bytes()
    (img_dir / "cut.png").write_bytes(good[: len(good) // 2])
    rec = Record(img_dir / "cut.png", "<image>", None, None, "here:7")
    with pytest.raises(VlmoptError, match="here:7"):
        rec.load_image()


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    msg = _error(path)
    assert str(path) in msg and "empty" in msg


def test_missing_dataset_file_is_an_error(tmp_path):
    msg = _error(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in msg and "not found" in msg


def test_unknown_builtin_dataset_lists_the_known_ones():
    msg = _error("builtin:nope")
    assert "builtin:nope" in msg
    assert "builtin:synthvqa-calib" in msg and "builtin:synthvqa-test" in msg


def test_builtin_split_is_generated_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(synthvqa.SPLIT_SIZES, "calib", 4)
    recs = load_records("builtin:synthvqa-calib")
    name = f"synthvqa-calib-v{synthvqa.GENERATOR_VERSION}-n4"
    path = tmp_path / "cache" / name / "data.jsonl"
    assert path.is_file() and len(recs) == 4
    seed = synthvqa.SPLIT_SEEDS["calib"]
    for i, r in enumerate(recs):
        s = synthvqa.sample(seed, i)
        assert (r.prompt, r.answer, r.type) == (s.prompt, s.answer, s.type)
        assert r.load_image().tobytes() == s.image.tobytes()
    mtime = path.stat().st_mtime_ns
    assert dataset.builtin_split("calib") == path
    assert path.stat().st_mtime_ns == mtime  # reused, not regenerated
    assert [p.name for p in path.parent.parent.iterdir()] == [name]  # no temp dirs
    assert json.loads(path.read_text().splitlines()[0])["image"] == "images/00000.png"
