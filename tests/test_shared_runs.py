"""Interrupted and shared `vlmopt optimize` runs never ship a wrong result: one writer per OUT,
kill -9 during the search, the re-ranking and the publish (the re-run finishes with the plan of
an uninterrupted run), and two workers on one PostgreSQL study ship the same plan.

Kills are real (SIGKILL of a child process). To give the kill a moment to land, the child runs
the CLI through a small harness that sleeps before each evaluation of one stage; the sleep
changes no result."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vlmopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
HARNESS = """
import sys, time
stage, slow = sys.argv[1], float(sys.argv[2])
if stage == "search":
    from vlmopt.search import evaluator as mod
    cls, name = mod.Evaluator, "evaluate"
elif stage == "rerank":
    import vlmopt.optimize as mod
    cls, name = mod, "_rerank"
elif stage == "export":
    import vlmopt.emit as mod
    cls, name = mod, "emit"
else:
    import vlmopt.report as mod
    cls, name = mod, "write"
real = getattr(cls, name)
def slowed(*a, **k):
    time.sleep(slow)
    return real(*a, **k)
setattr(cls, name, slowed)
from vlmopt.cli import main
raise SystemExit(main(sys.argv[3:]))
"""


def _args(model, data, out, *extra):
    return ["optimize", str(model), "--target-flops", "0.4", "--calib", str(data),
            "--eval", str(data), "--out", str(out), "--trials", "20", "--no-emit",
            "--search-samples", "4", "--finalists", "3", *extra]


def _child(args, stage="search", slow=0.0):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", HARNESS, stage, str(slow), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finished_trials(out: Path) -> int:
    db = out / "study.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as c:
            return c.execute("select count(*) from trials where state in "
                             "('COMPLETE', 'PRUNED')").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return 0


def _reranked(out: Path) -> int:
    db = out / "study.db"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as c:
            return c.execute("select count(*) from study_user_attributes where key like "
                             "'rerank:%'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _kill_when(proc, cond, timeout=300.0):
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill: {proc.communicate()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("the moment to kill never came")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _complete(out: Path) -> None:
    names = {p.name for p in out.iterdir()}
    assert {"plan.json", "report.json", "report.md", "report.html", "study.db"} <= names
    assert not names & {".publish", ".vlmopt-run.json", ".vlmopt.lock"}, names


@pytest.fixture(scope="module")
def reference(tiny_llava, synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(_args(tiny_llava, synth_data, out)) == 0
    return out


def test_a_second_process_on_one_out_is_refused_at_once(tiny_llava, synth_data, tmp_path,
                                                        capsys):
    out = tmp_path / "out"
    first = _child(_args(tiny_llava, synth_data, out), slow=0.5)
    try:
        t0 = time.monotonic()
        while not (out / ".vlmopt-run.json").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() - t0 < 120
            time.sleep(0.05)
        t = time.perf_counter()
        assert main(_args(tiny_llava, synth_data, out)) == 2
        assert time.perf_counter() - t < 10  # at once: before the model loads
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vlmopt: error:"), err
        assert "another vlmopt process" in err[0] and ".vlmopt.lock" in err[0]
        assert not (out / "plan.json").exists()
    finally:
        first.kill()
        first.communicate()


def test_kill_during_search_resumes_to_the_uninterrupted_plan(reference, tiny_llava,
                                                             synth_data, tmp_path):
    out = tmp_path / "out"
    proc = _child(_args(tiny_llava, synth_data, out), slow=0.3)
    _kill_when(proc, lambda: _finished_trials(out) >= 16)  # past the seeded trials: TPE's
    assert not (out / "plan.json").exists()
    assert main(_args(tiny_llava, synth_data, out)) == 0
    _complete(out)
    ref, got = _report(reference), _report(out)
    assert json.loads((out / "plan.json").read_text())["passes"] == \
        json.loads((reference / "plan.json").read_text())["passes"]
    # the same trials, in the same order: the killed one was queued again with its parameters
    assert [t["steps"] for t in got["trials"]] == [t["steps"] for t in ref["trials"]]
    assert got["trial_counts"]["interrupted"] <= 1
    n, n_ref = got["trial_counts"], ref["trial_counts"]
    assert (n["evaluated"], n["rejected_over_target"]) == \
        (n_ref["evaluated"], n_ref["rejected_over_target"])


def test_kill_during_re_ranking_keeps_what_was_re_ranked(reference, tiny_llava, synth_data,
                                                        tmp_path):
    out = tmp_path / "out"
    proc = _child(_args(tiny_llava, synth_data, out), stage="rerank", slow=1.5)
    _kill_when(proc, lambda: _reranked(out) >= 1)
    stored = _reranked(out)
    assert main(_args(tiny_llava, synth_data, out)) == 0
    _complete(out)
    ref, got = _report(reference), _report(out)
    assert got["chosen"]["steps"] == ref["chosen"]["steps"]
    # the same finalists with the same figures (KL from another process, whose float sums
    # may differ in the last bits: KLs near 0 to 1e-6)
    assert [f["steps"] for f in got["finalists"]] == [f["steps"] for f in ref["finalists"]]
    for a, b in zip(got["finalists"], ref["finalists"]):
        for k in ("search", "all"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6)
    # nothing of the search and none of the stored finalists was measured again
    assert got["search_evaluations"] == 0
    assert got["evaluations"] == ref["evaluations"] - ref["search_evaluations"] - stored


@pytest.mark.parametrize("stage", ["export", "report"])
def test_kill_while_writing_results_then_rerun_completes(reference, tiny_llava, synth_data,
                                                        tmp_path, stage):
    out = tmp_path / "out"
    args = _args(tiny_llava, synth_data, out)
    if stage == "export":  # with the ONNX package this time
        args.remove("--no-emit")
    proc = _child(args, stage=stage, slow=60)
    _kill_when(proc, lambda: (out / ".publish" / "plan.json").exists())
    assert (out / ".publish").exists() and not (out / "plan.json").exists()
    assert main(args) == 0
    _complete(out)
    assert _report(out)["chosen"]["steps"] == _report(reference)["chosen"]["steps"]
    if stage == "export":  # the package is whole: every file its manifest lists is there
        manifest = json.loads((out / "manifest.json").read_text())
        assert all((out / f).is_file() for f in manifest["files"])


def test_a_crash_in_the_middle_of_the_publish_is_finished_by_the_rerun(
        reference, tiny_llava, synth_data, tmp_path, monkeypatch, capsys):
    from vlmopt import outdir

    out = tmp_path / "out"
    real = os.replace

    def dying(src, dst):  # names move in sorted order, plan.json last
        if Path(src).parent.name == ".publish" and Path(src).name == "report.json":
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(outdir.os, "replace", dying)
    assert main(_args(tiny_llava, synth_data, out)) == 130
    names = {p.name for p in out.iterdir()}
    assert "plan.json" not in names and "report.html" in names  # half moved in
    monkeypatch.setattr(outdir.os, "replace", real)
    capsys.readouterr()
    assert main(_args(tiny_llava, synth_data, out)) == 0
    assert "finishing the publish" in capsys.readouterr().err
    _complete(out)
    assert _report(out)["chosen"]["steps"] == _report(reference)["chosen"]["steps"]
    assert main(_args(tiny_llava, synth_data, out)) == 2  # finished: never overwritten


def test_disk_full_while_writing_results_is_one_line_and_resumable(
        reference, tiny_llava, synth_data, tmp_path, monkeypatch, capsys):
    import errno

    from vlmopt import report

    out = tmp_path / "out"
    real = report.write

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write", full)
    assert main(_args(tiny_llava, synth_data, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the error
    assert [e for e in err if "error" in e.lower()] == err[-1:], err
    assert "No space left on device" in err[-1] and str(out) in err[-1], err
    assert {p.name for p in out.iterdir()} == {".vlmopt-run.json", "study.db"}
    monkeypatch.setattr(report, "write", real)
    assert main(_args(tiny_llava, synth_data, out)) == 0
    _complete(out)
    assert _report(out)["search_evaluations"] == 0  # the search came back from the study


# ---------------------------------------------------------------------- PostgreSQL


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    return None


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 from the machine's packages."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    pytest.importorskip("psycopg", reason="psycopg 3 (pip install 'vlmopt[postgres]')")
    root = Path(tempfile.mkdtemp(prefix="vlmopt-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        os.chown(root, 65534, 65534)
        as_user = ["runuser", "-u", "nobody", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust",
                    "-E", "UTF8"], check=True, capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_postgresql_workers_share_trials_and_ship_the_same_plan(postgres, tiny_llava,
                                                                   synth_data, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    extra = ("--storage", postgres, "--study", "shared")
    procs = [_child(_args(tiny_llava, synth_data, o, *extra), slow=0.2) for o in outs]
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr
    plans = [json.loads((o / "plan.json").read_text()) for o in outs]
    assert plans[0]["passes"] == plans[1]["passes"]
    reports = [_report(o) for o in outs]
    assert reports[0]["chosen"]["steps"] == reports[1]["chosen"]["steps"]
    assert [f["steps"] for f in reports[0]["finalists"]] == \
        [f["steps"] for f in reports[1]["finalists"]]
    trials = reports[0]["trials"]
    assert trials == reports[1]["trials"]  # both ranked the whole study
    n = reports[1]["trial_counts"]
    assert len(n["workers"]) == 2 and all(v > 0 for v in n["workers"].values())
    assert all(f"{w} ran {k}" in (outs[1] / "report.md").read_text()
               for w, k in n["workers"].items())
    # shared: 20 trials in all (one more when both finish their last at once) ...
    assert sum(n["workers"].values()) == n["evaluated"] + n["rejected_over_target"]
    assert 20 <= n["evaluated"] + n["rejected_over_target"] <= 21
    # ... and a plan one worker measured is not measured again by the other (two workers
    # proposing the same plan at the same moment may both measure it: at most a couple)
    distinct = len({json.dumps(t["steps"]) for t in trials if t["metrics"]})
    assert distinct <= sum(r["search_evaluations"] for r in reports) <= distinct + 2


def test_a_storage_without_its_driver_is_named_before_the_model_loads(tiny_llava, synth_data,
                                                                      tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_llava, synth_data, out, "--storage",
                      "postgresql+pg8000://u@127.0.0.1/db")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "driver is not installed" in err[0] and "pg8000" in err[0], err
    assert not out.exists()
