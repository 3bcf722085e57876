"""What the plans keep, drawn: the cells highlighted in `vlmopt show`'s and the report's PNGs are
the visual tokens the rewritten graph actually kept (read back from the pixels and compared with
the keep-top-k indices recorded from an independent run of the graph), on LLaVA and Qwen-VL;
the `show` verb's output and errors; the report's embedded drawings (also in headless Chromium)
and its ONNX Runtime latency row."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import make_tiny_qwen_dir, record_modules
from PIL import Image

import vlmopt
from vlmopt import inputs, visualize
from vlmopt.cli import main
from vlmopt.data import synthvqa
from vlmopt.ir.capture import complete_inputs
from vlmopt.ir.tokens import KeepTopK, keep_count

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _plan(lm, passes: list) -> dict:
    return {"schema": "vlmopt.plan/1", "model": {"name": lm.name, "fingerprint": lm.fingerprint},
            "passes": [{"name": n, "config": c} for n, c in passes]}


@pytest.fixture(scope="module")
def synth():
    return vlmopt.load("builtin:synth-llava")


@pytest.fixture(scope="module")
def batch2(synth):
    """Two SynthVQA samples whose prompts differ in length: the first row is left-padded."""
    ss = [synthvqa.sample(11, i) for i in range(6)]
    a = min(ss, key=lambda s: len(s.prompt))
    b = max(ss, key=lambda s: len(s.prompt))
    assert len(a.prompt) < len(b.prompt)
    batch = complete_inputs(inputs.encode(synth.processor, [a.prompt, b.prompt],
                                          [a.image, b.image]))
    assert not bool(batch["attention_mask"][0].all())  # padding on the first row
    return batch


def graph_keep_sets(gm, batch) -> list[list[set[int]]]:
    """Per keep-top-k node of ``gm`` (graph order), per sample: the visual tokens (index in the
    image's token order) it kept, from the slot indices the node returned, composed back to the
    original sequence. Recorded with tests/helpers.record_modules, not vlmopt.visualize."""
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"
               and isinstance(gm.get_submodule(n.target), KeepTopK)]
    rec = record_modules(gm, batch, set(targets))
    image_id = gm.meta["vlmopt"]["image_token_id"]
    B, T = batch["input_ids"].shape
    slots = torch.arange(T).expand(B, T)
    out = []
    for t in targets:
        slots = slots.gather(1, rec[t][1][4])
        per = []
        for b in range(B):
            vis = (batch["input_ids"][b] == image_id).nonzero()[:, 0].tolist()
            per.append({vis.index(s) for s in slots[b].tolist() if s in vis})
        out.append(per)
    return out


def lit(panel: dict, *states: str) -> set[int]:
    return {j for j, c in enumerate(panel["cells"]) if c in states}


# ----------------------------------------------------------------------------- LLaVA


PLANS = {
    "FastV": ([("drop_tokens", {"keep": {"layer_2": 49}})], [49]),
    "PyramidDrop": ([("drop_tokens", {"keep": {"layer_2": 98, "layer_4": 49, "layer_6": 24},
                                      "score_at": "next"})], [98, 49, 24]),
    "VisionZip + drop": ([("select_visual", {"method": "visionzip", "keep": 64,
                                             "contextual": 10}),
                          ("drop_tokens", {"keep": {"layer_3": 30}})], [64, 30]),
    "DivPrune": ([("select_visual", {"method": "divprune", "keep": 36})], [36]),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_highlighted_cells_are_the_tokens_the_graph_kept(synth, batch2, name):
    passes, counts = PLANS[name]
    gm = vlmopt.apply_plan(synth, _plan(synth, passes))
    want = graph_keep_sets(gm, batch2)
    assert len(want) == len(counts)
    for b, tr in enumerate(visualize.trace(synth, gm, batch2)):
        panels = visualize.read_cells(visualize.render(tr, name))
        assert panels[0]["kind"] == "input" and len(lit(panels[0], "kept")) == 196
        cuts = [p for p in panels if p["kind"] in ("select", "drop")]
        assert [p["count"] for p in cuts] == counts  # the plan's own budgets
        for p, w in zip(cuts, want):
            got = lit(p, "kept", "merged")
            assert len(got) == p["count"], p["label"]
            assert got == w[b], f"{p['label']}: drawn {sorted(got - w[b])[:5]} not kept, " \
                f"kept {sorted(w[b] - got)[:5]} not drawn"
        if not any(n == "select_visual" for n, _ in passes):
            assert all(not lit(p, "merged") for p in panels)  # nothing merged by a drop


def test_visionzip_contextual_tokens_are_drawn_as_merged(synth, batch2):
    gm = vlmopt.apply_plan(synth, _plan(synth, PLANS["VisionZip + drop"][0]))
    # independent: the patches whose vision features the contextual merge rewrote
    (feats, _, _), (merged_feats, _) = record_modules(gm, batch2, {"visionzip"})["visionzip"]
    changed = (merged_feats != feats).any(-1)  # [B, Nv]
    for b, tr in enumerate(visualize.trace(synth, gm, batch2)):
        sel = visualize.read_cells(visualize.render(tr))[1]
        assert sel["kind"] == "select"
        merged = lit(sel, "merged")
        assert merged == set(changed[b].nonzero()[:, 0].tolist())
        assert 1 <= len(merged) <= 10  # at most the contextual count; dominant ones are kept
        assert len(lit(sel, "kept")) == 64 - len(merged)


def test_frozen_layers_show_the_tokens_that_reach_them_as_frozen(synth, batch2):
    passes = [("drop_tokens", {"keep": {"layer_2": 60}}),
              ("freeze_visual", {"layers": ["layer_3", "layer_4", "layer_6"]})]
    gm = vlmopt.apply_plan(synth, _plan(synth, passes))
    (want,) = graph_keep_sets(gm, batch2)
    for b, tr in enumerate(visualize.trace(synth, gm, batch2)):
        panels = visualize.read_cells(visualize.render(tr))
        assert [(p["kind"], p["layers"]) for p in panels] == [
            ("input", [0, 0]), ("drop", [2, 2]), ("frozen", [3, 4]), ("frozen", [6, 6])]
        assert lit(panels[1], "kept") == want[b]
        for p in panels[2:]:
            assert lit(p, "frozen") == want[b] and not lit(p, "kept", "merged")


def test_seen_image_is_the_processed_pixels(synth, batch2):
    img = synth.adapter.seen_image(batch2, 1, synth.processor)
    assert img.shape == (112, 112, 3) and img.dtype == np.uint8
    ip = synth.processor.image_processor
    x = (img / 255.0 - np.array(ip.image_mean)) / np.array(ip.image_std)
    got = torch.from_numpy(x).permute(2, 0, 1).float()
    assert (got - batch2["pixel_values"][1]).abs().max() <= 1.01 / 255 / min(ip.image_std)


# ----------------------------------------------------------------------------- Qwen-VL


def test_qwen_grid_follows_the_image_size_and_its_mrope_positions(tmp_path):
    lm = vlmopt.load(make_tiny_qwen_dir(tmp_path / "qwen"))
    s = synthvqa.sample(5, 1)
    image = s.image.resize((96, 128))  # W x H, not square
    batch = visualize.encode_one(lm, s.prompt, image)
    rows, cols = lm.adapter.token_grid(batch, 0)
    t, gh, gw = batch["image_grid_thw"][0].tolist()
    m = lm.config.vision_config.spatial_merge_size
    assert (rows, cols) == (gh // m, gw // m) and rows > cols
    # the model's own M-RoPE numbering of the visual tokens is the same row-major grid
    vis = batch["input_ids"][0] == lm.config.image_token_id
    pos = batch["position_ids"][:, 0][:, vis]  # [3, n]
    hw = list(zip((pos[1] - pos[1].min()).tolist(), (pos[2] - pos[2].min()).tolist()))
    assert hw == [divmod(j, cols) for j in range(rows * cols)]
    seen = lm.adapter.seen_image(batch, 0, lm.processor)
    p = lm.config.vision_config.patch_size
    assert seen.shape == (gh * p, gw * p, 3)
    ref = np.asarray(image.resize((gw * p, gh * p), Image.BICUBIC)).astype(int)
    assert np.abs(seen.astype(int) - ref).max() <= 1

    plan = _plan(lm, [("drop_tokens", {"keep": {"layer_1": 0.5}}),
                      ("freeze_visual", {"layers": ["layer_2"]})])
    gm = vlmopt.apply_plan(lm, plan)
    (want,) = graph_keep_sets(gm, batch)
    tr = visualize.trace(lm, gm, batch)[0]
    panels = visualize.read_cells(visualize.render(tr))
    assert [p["kind"] for p in panels] == ["input", "drop", "frozen"]
    assert panels[1]["rows"] == rows and panels[1]["cols"] == cols
    assert panels[1]["count"] == keep_count(0.5, rows * cols)
    assert lit(panels[1], "kept") == want[0] and len(want[0]) == panels[1]["count"]
    assert lit(panels[2], "frozen") == want[0]


# ----------------------------------------------------------------------------- the CLI verb

PROMPT = "What colour is the circle?\n<image>"
SHOW_PLAN = [("drop_tokens", {"keep": {"layer_2": 98, "layer_4": 49}, "score_at": "next"}),
             ("freeze_visual", {"layers": ["layer_5"]})]


@pytest.fixture(scope="module")
def applied(synth, tmp_path_factory):
    """``vlmopt apply --no-onnx`` output (plan.json inside) and an image."""
    d = tmp_path_factory.mktemp("show")
    (d / "plan.json").write_text(json.dumps(_plan(synth, SHOW_PLAN)))
    assert main(["apply", str(d / "plan.json"), "builtin:synth-llava", "--out",
                 str(d / "applied"), "--no-onnx"]) == 0
    synthvqa.sample(3, 0).image.save(d / "img.png")
    return d


def _show(applied, out, *extra):
    return ["show", str(applied / "applied"), "--image", str(applied / "img.png"),
            "--prompt", PROMPT, "--out", str(out), *extra]


def test_show_writes_one_png_with_a_panel_per_stage(applied, tmp_path, capsys):
    out = tmp_path / "kept.png"
    assert main(_show(applied, out)) == 0
    with Image.open(out) as im:
        im.verify()  # a valid PNG
    panels = visualize.read_cells(str(out))
    assert [(p["kind"], p["count"]) for p in panels] == [
        ("input", 196), ("drop", 98), ("drop", 49), ("frozen", 49)]
    assert [len(lit(p, "kept", "frozen")) for p in panels[1:]] == [98, 49, 49]
    assert f"wrote {out}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.png"]  # no temp file left
    # --plan and --model draw the same
    again = tmp_path / "again.png"
    assert main(["show", "--plan", str(applied / "plan.json"), "--model",
                 "builtin:synth-llava", "--image", str(applied / "img.png"), "--prompt",
                 PROMPT, "--out", str(again)]) == 0
    assert [p["cells"] for p in visualize.read_cells(str(again))] == [p["cells"] for p in panels]


def _one_error_line(capsys, *words) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlmopt: error: "), err
    for w in words:
        assert w in err[0], err[0]
    return err[0]


def test_show_never_overwrites_an_existing_file_unless_forced(applied, tmp_path, capsys):
    out = tmp_path / "mine.png"
    out.write_bytes(b"the user's file")
    assert main(_show(applied, out)) == 2
    _one_error_line(capsys, "--out", "exists", "--force")
    assert out.read_bytes() == b"the user's file"
    assert main(_show(applied, out, "--force")) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png"]


@pytest.mark.parametrize("case", ["no-image-token", "missing-image", "out-is-dir", "not-png",
                                  "no-parent", "no-plan-json", "both", "neither",
                                  "other-model"])
def test_show_refuses_bad_input_with_one_line(applied, tmp_path, capsys, case, tiny_llava):
    out = tmp_path / "k.png"
    src = ["show", str(applied / "applied")]
    rest = ["--image", str(applied / "img.png"), "--prompt", PROMPT]
    words = {"no-image-token": ["--prompt", "<image>"], "missing-image": ["--image"],
             "out-is-dir": ["--out", "directory"], "not-png": ["--out", ".png"],
             "no-parent": ["--out", "parent"], "no-plan-json": ["no plan.json", "--plan"],
             "both": ["not both"], "neither": ["--plan"], "other-model": ["fingerprint"]}[case]
    if case == "no-image-token":
        rest[3] = "What colour is the circle?"
    elif case == "missing-image":
        rest[1] = str(tmp_path / "nope.png")
    elif case == "out-is-dir":
        out = tmp_path
    elif case == "not-png":
        out = tmp_path / "k.jpg"
    elif case == "no-parent":
        out = tmp_path / "nope" / "k.png"
    elif case == "no-plan-json":  # an artifact's manifest names its passes only
        art = tmp_path / "artifact"
        art.mkdir()
        (art / "manifest.json").write_text("{}")
        src = ["show", str(art)]
    elif case == "both":
        src += ["--plan", str(applied / "plan.json")]
    elif case == "neither":
        src = ["show"]
    elif case == "other-model":
        rest += ["--model", str(tiny_llava)]
    assert main([*src, *rest, "--out", str(out)]) == 2
    _one_error_line(capsys, *words)
    assert not list(tmp_path.rglob("*.png"))


def test_show_exits_non_zero_from_the_shell(applied, tmp_path):
    res = subprocess.run([sys.executable, "-m", "vlmopt.cli", *_show(applied, tmp_path / "k.txt")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "--out" in res.stderr
    assert not (tmp_path / "k.txt").exists()


# ----------------------------------------------------------------------------- the report


@pytest.fixture(scope="module")
def optimized(tiny_llava, synth_data, tmp_path_factory):
    """``vlmopt optimize`` with the ONNX export (for the latency row) on the tiny checkpoint."""
    out = tmp_path_factory.mktemp("report") / "out"
    assert main(["optimize", str(tiny_llava), "--target-flops", "0.4", "--calib", str(synth_data),
                 "--eval", str(synth_data), "--eval-limit", "2", "--out", str(out),
                 "--trials", "3"]) == 0
    return out


def test_report_embeds_the_kept_tokens_of_the_chosen_plan_and_the_best_baseline(optimized):
    r = json.loads((optimized / "report.json").read_text())
    html = (optimized / "report.html").read_text()
    plans = r["kept"]["plans"]
    assert set(plans) == {"chosen", "baseline"} and len(r["kept"]["images"]) == 3
    rows = [m for m in r["methods"] if not m.get("unreachable") and m["method"] != "original"
            and not m["method"].startswith("vlmopt")]
    best = max(rows, key=lambda m: (m["calib"]["fidelity"], -m["calib"]["kl"]))
    assert f", {best['method']}: " in plans["baseline"]["title"]
    embedded = re.findall(r'<img class="kept" src="data:image/png;base64,([^"]+)"', html)
    assert len(embedded) == 6
    files = [f for i in range(3) for f in (plans["chosen"]["files"][i],
                                           plans["baseline"]["files"][i])]
    assert sorted(p.name for p in (optimized / "kept").iterdir()) == sorted(files)
    for data, f in zip(embedded, files):
        assert base64.b64decode(data) == (optimized / "kept" / f).read_bytes()
    # the drawn counts are the chosen plan's per-layer visual tokens
    counts = r["chosen"]["counts"]
    for f in plans["chosen"]["files"]:
        for p in visualize.read_cells(str(optimized / "kept" / f))[1:]:
            assert len(lit(p, "kept", "merged", "frozen")) == counts[p["layers"][0]]
    md = (optimized / "report.md").read_text()
    assert "kept/chosen-0.png" in md and "kept/baseline-2.png" in md


def test_report_latency_row_shows_onnx_runtime_beside_pytorch(optimized):
    r = json.loads((optimized / "report.json").read_text())
    ort, pt = r["latency_ort_s"], r["latency_s"]
    assert set(ort) == {"original", "chosen"} and all(v > 0 for v in ort.values())
    assert r["latency_ratio_ort"] == pytest.approx(ort["chosen"] / ort["original"])
    html = (optimized / "report.html").read_text()
    row = html[html.index("measured prefill latency ratio (ONNX Runtime:"):]
    row = " ".join(row[:row.index("</tr>")].split())
    assert f"{r['latency_ratio_ort']:.3f}" in row
    assert f"{1e3 * ort['chosen']:.1f} ms against {1e3 * ort['original']:.1f} ms" in row
    assert f"{1e3 * pt['chosen']:.1f} ms" in " ".join(html.split())
    assert "(ONNX Runtime, the artifact)" in (optimized / "report.md").read_text()


def _find(haystack: np.ndarray, needle: np.ndarray, colour) -> tuple[int, int]:
    """Top-left (y, x) where ``needle`` appears in ``haystack`` pixel for pixel, anchored on
    the first pixel of ``colour`` in it (rare on the page, unlike the white margin)."""
    ay, ax = (int(v[0]) for v in np.nonzero((needle == colour).all(-1)))
    ys, xs = np.nonzero((haystack == colour).all(-1))
    h, w = needle.shape[:2]
    for y, x in zip(ys - ay, xs - ax):
        if y >= 0 and x >= 0 and np.array_equal(haystack[y:y + h, x:x + w], needle):
            return int(y), int(x)
    raise AssertionError("the drawing is not in the screenshot")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_in_headless_chromium_shows_the_overlays(optimized, tmp_path):
    shot = tmp_path / "report.png"
    res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                          "--hide-scrollbars", "--force-device-scale-factor=1",
                          f"--screenshot={shot}", "--window-size=1200,7000",
                          (optimized / "report.html").resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert shot.is_file(), res.stderr[-500:]
    page = np.asarray(Image.open(shot).convert("RGB"))
    f = json.loads((optimized / "report.json").read_text())["kept"]["plans"]["chosen"]["files"][0]
    png = optimized / "kept" / f
    drawing = np.asarray(Image.open(png).convert("RGB"))
    panels = visualize.read_cells(str(png))
    p = panels[1]  # the first stage that changes the tokens
    # the part of the drawing up to the end of that panel, as the browser shows it
    right = p["x"] + p["cols"] * p["cell_w"]
    y0, x0 = _find(page, drawing[:, :right], visualize.COLOURS["kept"])
    colours = {tuple(c): k for k, c in visualize.COLOURS.items()}
    seen = []
    for j in range(p["rows"] * p["cols"]):
        y = y0 + p["y"] + (j // p["cols"]) * p["cell_h"] + p["cell_h"] // 2
        x = x0 + p["x"] + (j % p["cols"]) * p["cell_w"]
        seen.append(colours.get(tuple(int(v) for v in page[y, x]), "dropped"))
    assert seen == p["cells"]
    assert sum(c != "dropped" for c in seen) == p["count"]
    # and the overlay colour is there on screen, below the plots
    ys = np.nonzero((page == visualize.COLOURS["kept"]).all(-1))[0]
    assert ys.size and ys.min() >= y0
