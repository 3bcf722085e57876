"""`vlmopt optimize` end to end on the tiny checkpoint: outputs, the FLOPs constraint, resume
after a kill, the report, and bad input."""

from __future__ import annotations

import html
import json

import pytest

from vlmopt.cli import main


def _args(model, data, out, *extra):
    return ["optimize", str(model), "--target-flops", "0.4", "--calib", str(data),
            "--eval", str(data), "--out", str(out), "--trials", "4", "--no-emit", *extra]


@pytest.fixture(scope="module")
def finished(tiny_llava, synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("opt") / "out"
    assert main(_args(tiny_llava, synth_data, out)) == 0
    return out


def test_optimize_writes_plan_and_report_within_the_flops_target(finished):
    names = {p.name for p in finished.iterdir()}
    assert {"plan.json", "report.html", "report.md", "report.json"} <= names
    assert ".vlmopt-run.json" not in names  # the resume state is gone once finished
    r = json.loads((finished / "report.json").read_text())
    assert r["chosen"]["ratio_llm"] <= 0.4
    plan = json.loads((finished / "plan.json").read_text())
    assert plan["target"] == {"flops": 0.4, "scope": "llm", "prompt_tokens": r["n_text"],
                              "achieved": {"llm": r["chosen"]["ratio_llm"],
                                           "total": r["chosen"]["ratio_total"]}}
    assert plan["provenance"]["search"] == "joint"
    for t in r["trials"]:  # nothing over the target was ever evaluated
        assert t["metrics"] is None or t["ratio_llm"] <= 0.4 + 1e-12
    methods = [m["method"] for m in r["methods"]]
    for name in ("original", "vlmopt (joint)", "VisionZip", "DivPrune", "random",
                 "downsampling", "FastV K=1", "PyramidDrop"):
        assert any(m.startswith(name.split(" K=")[0]) for m in methods), name
    for m in r["methods"]:
        if not m.get("unreachable"):
            assert m["ratio_llm"] <= 0.4 + 1e-9 or m["method"] == "original"
            assert "eval" in m  # held-out accuracy for every row


def test_report_times_each_step(finished):
    """Every announced step has its seconds, in order, and they add up to the search time at
    least (the steps cover the whole run up to the report)."""
    r = json.loads((finished / "report.json").read_text())
    steps = r["stage_seconds"]
    names = list(steps)
    assert names[0] == "checking the inputs" and names[-1] == "writing the report"
    for want in ("searching (joint)", "baselines at the same FLOPs", "drawing the kept visual "
                 "tokens"):
        assert want in names
    assert names.index("searching (joint)") < names.index("baselines at the same FLOPs")
    assert all(v >= 0 for v in steps.values())
    assert sum(steps.values()) >= r["search_seconds"] * 0.99
    assert "Seconds per step (to the report): checking the inputs" in \
        (finished / "report.md").read_text()


def test_the_plan_reapplies_to_the_same_flops(finished, tiny_llava):
    from vlmopt.search.space import Space

    import vlmopt

    r = json.loads((finished / "report.json").read_text())
    lm = vlmopt.load(tiny_llava)
    gm = vlmopt.apply_plan(lm, finished / "plan.json")
    sp = Space(lm, r["n_text"])
    full = vlmopt.flops(lm, gm, n_text=r["n_text"])
    assert full["ratio"] == pytest.approx(r["chosen"]["ratio_total"])
    assert sp.flops([tuple(s) for s in r["chosen"]["steps"]])["ratio_llm"] == \
        pytest.approx(r["chosen"]["ratio_llm"])


def test_flops_on_the_plan_reproduces_the_ratio_optimize_reported(finished, tiny_llava, capsys):
    r = json.loads((finished / "report.json").read_text())
    capsys.readouterr()
    assert main(["flops", str(tiny_llava), "--plan", str(finished / "plan.json"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["prompt_tokens_from"] == "the plan's calibration prompts"
    assert res["n_text"] == r["n_text"]
    assert res["llm_ratio"] == pytest.approx(r["chosen"]["ratio_llm"], rel=1e-12)
    assert res["ratio"] == pytest.approx(r["chosen"]["ratio_total"], rel=1e-12)
    # at another prompt length the same plan costs another share: the default is not a guess
    assert main(["flops", str(tiny_llava), "--plan", str(finished / "plan.json"), "--json",
                 "--prompt-tokens", str(r["n_text"] + 200)]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["prompt_tokens_from"] == "--prompt-tokens"
    assert other["llm_ratio"] != pytest.approx(res["llm_ratio"], rel=1e-6)
    assert main(["flops", str(tiny_llava), "--plan", str(finished / "plan.json")]) == 0
    text = capsys.readouterr().out
    assert f"LLM prefill FLOPs ratio {r['chosen']['ratio_llm']:.4f}" in text
    assert "optimize reported LLM" in text


def test_report_says_where_flops_were_counted(finished):
    r = json.loads((finished / "report.json").read_text())
    for name in ("report.md", "report.html"):
        text = html.unescape((finished / name).read_text())
        assert f"at {r['n_text']} text tokens (the calibration prompts' mean)" in text, name
        assert "--plan plan.json" in text, name


def test_optuna_dashboard_shows_each_trials_flops_and_fidelity(finished):
    """The real optuna-dashboard server on OUT/study.db: its REST API (what its pages read) lists
    the trials with the LLM and total FLOPs ratios and the fidelity as sortable user attributes,
    equal to the report's trials."""
    import shutil
    import socket
    import subprocess
    import time
    import urllib.request

    exe = shutil.which("optuna-dashboard")
    assert exe, "optuna-dashboard is in the dev extra (pyproject.toml)"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([exe, f"sqlite:///{finished / 'study.db'}", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        def get(path):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return json.loads(r.read())

        for _ in range(120):
            try:
                studies = get("/api/studies")["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.5)
        else:
            raise AssertionError("optuna-dashboard did not answer within 60 s")
        assert len(studies) == 1
        study = get(f"/api/studies/{studies[0]['study_id']}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert study["objective_names"] == ["score (fidelity - 0.01 KL)"]
    sortable = {a["key"] for a in study["union_user_attrs"] if a["sortable"]}
    assert {"ratio_llm", "ratio_total", "fidelity", "kl", "agreement"} <= sortable
    report = {t["number"]: t for t in json.loads((finished / "report.json").read_text())["trials"]}
    done = [t for t in study["trials"] if t["state"] == "Complete"]
    assert done
    for t in done:
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        r = report[t["number"]]
        assert float(attrs["ratio_llm"]) == pytest.approx(r["ratio_llm"], rel=1e-12)
        assert float(attrs["ratio_total"]) == pytest.approx(r["ratio_total"], rel=1e-12)
        assert float(attrs["fidelity"]) == pytest.approx(r["metrics"]["fidelity"], rel=1e-12)


def test_report_html_is_self_contained_with_plots_and_tables(finished):
    html = (finished / "report.html").read_text()
    # three plots, and the kept-token drawings (tests/test_show.py checks those)
    assert html.count('src="data:image/png;base64,') == 3 + html.count('<img class="kept"')
    assert "Methods at the same FLOPs" in html and "Layer Contribution" in html
    assert "http://" not in html and "https://" not in html  # nothing fetched when opened
    md = (finished / "report.md").read_text()
    assert "| vlmopt (joint) |" in md


def test_finalists_are_re_ranked_on_the_whole_calibration_set(tiny_llava, synth_data, tmp_path):
    out = tmp_path / "out"
    assert main(_args(tiny_llava, synth_data, out, "--search-samples", "4",
                      "--finalists", "3")) == 0
    r = json.loads((out / "report.json").read_text())
    assert (r["n_search"], r["n_calib"]) == (4, 10)
    assert 1 <= len(r["finalists"]) <= 3
    chosen = [f for f in r["finalists"] if f["steps"] == r["chosen"]["steps"]]
    assert chosen and chosen[0]["all"] == r["chosen"]["metrics"]  # chosen on all 10 samples
    searched = {json.dumps(t["steps"]): t["metrics"] for t in r["trials"] if t["metrics"]}
    for f in r["finalists"]:  # screening figures are the trials' own
        assert searched[json.dumps(f["steps"])] == f["search"]
    assert r["methods"][0]["calib"]["agreement"] == 1.0
    s = min(f["all"]["fidelity"] for f in r["finalists"])  # all-sample fidelity is in 1/10s
    assert abs(s * 10 - round(s * 10)) < 1e-9
    assert "re-ranked" in (out / "report.md").read_text()


def test_a_killed_run_resumes_where_it_stopped(tiny_llava, synth_data, tmp_path, monkeypatch):
    from vlmopt.search import study as study_mod

    out = tmp_path / "out"
    real = study_mod.Context.measure
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(study_mod.Context, "measure", dying)
    assert main(_args(tiny_llava, synth_data, out, "--trials", "8")) == 130
    assert {p.name for p in out.iterdir()} == {".vlmopt-run.json", "study.db"}  # no results
    import optuna

    before = [t for s in optuna.get_all_study_summaries(f"sqlite:///{out / 'study.db'}")
              for t in optuna.load_study(study_name=s.study_name,
                                         storage=f"sqlite:///{out / 'study.db'}").trials
              if t.user_attrs.get("metrics")]
    assert len(before) == 1
    # other settings never resume a foreign run
    assert main(_args(tiny_llava, synth_data, out, "--trials", "8", "--seed", "1")) == 2
    monkeypatch.setattr(study_mod.Context, "measure", real)
    assert main(_args(tiny_llava, synth_data, out, "--trials", "8")) == 0
    r = json.loads((out / "report.json").read_text())
    plans = {json.dumps(t["steps"]) for t in r["trials"] if t["metrics"]}
    # the plans measured before the kill came back from the study: not evaluated again
    assert {json.dumps(json.loads(t.user_attrs["steps"])) for t in before} <= plans
    assert r["search_evaluations"] == len(plans) - len(before)
    assert len({t["number"] for t in r["trials"]}) == len(r["trials"])
    n = r["trial_counts"]
    assert n["evaluated"] + n["rejected_over_target"] == 8 and n["interrupted"] == 1
    # a finished OUT is never overwritten
    assert main(_args(tiny_llava, synth_data, out, "--trials", "8")) == 2


@pytest.mark.parametrize("extra, message", [
    (["--target-flops", "0"], "--target-flops must lie in (0, 1]"),
    (["--target-flops", "1.5"], "--target-flops must lie in (0, 1]"),
    (["--target-flops", "0.0001"], "below what any plan can reach"),
    (["--storage", "sqlite:////nonexistent-dir/x/study.db"], "--storage"),
    (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "--storage"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(tiny_llava, synth_data, tmp_path,
                                                        capsys, extra, message):
    out = tmp_path / "out"
    assert main(_args(tiny_llava, synth_data, out) + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vlmopt: error:") and message in err[-1], err
    assert not out.exists()


def test_unlabelled_or_empty_calibration_is_rejected(tiny_llava, synth_data, tmp_path, capsys):
    lines = synth_data.read_text().splitlines()
    unlabelled = synth_data.parent / "unlabelled.jsonl"
    unlabelled.write_text("\n".join(json.dumps({k: v for k, v in json.loads(s).items()
                                                if k != "answer"}) for s in lines) + "\n")
    empty = synth_data.parent / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    assert main(_args(tiny_llava, unlabelled, out, "--objective", "accuracy")) == 2
    assert "accuracy objective needs an 'answer'" in capsys.readouterr().err
    assert main(["optimize", str(tiny_llava), "--target-flops", "0.4", "--calib", str(empty),
                 "--out", str(out), "--no-emit"]) == 2
    assert "dataset is empty" in capsys.readouterr().err
    assert not out.exists()


def test_target_size_adds_qk_rank_and_bits_to_the_joint_search(tiny_llava, synth_data,
                                                                 tmp_path):
    out = tmp_path / "out"
    assert main(_args(tiny_llava, synth_data, out, "--target-size", "0.95",
                      "--trials", "6")) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["target_size"] == 0.95
    assert r["chosen"]["size_ratio"] <= 0.95 and r["chosen"]["ratio_llm"] <= 0.4
    names = [n for n, _ in r["chosen"]["steps"]]
    assert "quantize" in names or "lowrank_qk" in names
    for t in r["trials"]:
        assert t["metrics"] is None or t["size_ratio"] <= 0.95 + 1e-12
    plan = json.loads((out / "plan.json").read_text())
    assert plan["target"]["size"] == 0.95
    # the report's per-layer table says what was compressed, and the bytes add up
    comp, fl = r["compression"], r["flops"]
    if "lowrank_qk" in names:
        assert all(c["q_rank"] and c["k_rank"] for c in comp.values())
    if "quantize" in names:
        assert all(c["bits"] for c in comp.values())
    per = fl["weight_bytes_per_node"]
    assert sum(v for k, v in per.items() if k != "total") == fl["weight_bytes"]
    md = (out / "report.md").read_text()
    assert "| Q/K rank | weight bits |" in md


def test_target_size_below_the_reachable_minimum_names_it(tiny_llava, synth_data, tmp_path,
                                                          capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_llava, synth_data, out, "--target-size", "0.01")) == 2
    assert "minimum is" in capsys.readouterr().err and not out.exists()
