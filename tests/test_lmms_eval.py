"""lmms-eval runs vlmopt models: `lmms-eval --model vlmopt` (the real CLI, a child process, the
plugin found through its entry point) on a local SynthVQA task reports the accuracy that
`vlmopt eval` reports on the same records, for an optimized artifact (ONNX Runtime), for the
original model and for the plan on the PyTorch graph. Offline: no hub, local JSONL dataset."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vlmopt.data import synthvqa
from vlmopt.errors import VlmoptError
from vlmopt.integrations.lmms_eval.task import doc_to_visual, first_word

N_RECORDS = 24
# FastV-style: 49 of the 196 visual tokens from layer 2 on; on these records it costs answers,
# so the artifact's accuracy is not the original's
PASSES = [{"name": "drop_tokens", "config": {"keep": {"layer_2": 49}}}]
TASK = "vlmopt_synthvqa"
BIN = Path(sys.executable).parent


def _env(root: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(root / "hf-datasets"), "HF_HOME": str(root / "hf-home"),
            "VLMOPT_CACHE": str(root / "vlmopt-cache"), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """SynthVQA records, the plan, its artifact (`vlmopt apply`, started in a child process
    that exports while the PyTorch runs go) and the lmms-eval task written over the records."""
    import vlmopt
    from vlmopt.integrations.lmms_eval.__main__ import main as task_main

    root = tmp_path_factory.mktemp("lmms")
    data = synthvqa.write_dataset(root / "data", N_RECORDS, seed=7)
    lm = vlmopt.load("builtin:synth-llava")
    plan = root / "plan.json"
    plan.write_text(json.dumps({"schema": "vlmopt.plan/1", "passes": PASSES,
                                "model": {"name": lm.name, "fingerprint": lm.fingerprint}}))
    art = root / "artifact"
    log = open(root / "apply.log", "w")  # noqa: SIM115 (closed when the child is waited for)
    apply = subprocess.Popen([str(BIN / "vlmopt"), "apply", str(plan), "builtin:synth-llava",
                              "--out", str(art), "--calib", str(data)],
                             env=_env(root), stdout=log, stderr=subprocess.STDOUT)
    tasks = root / "tasks"
    assert task_main(["task", str(data), "--out", str(tasks)]) == 0
    s = SimpleNamespace(root=root, data=data, plan=plan, art=art, tasks=tasks, lm=lm)

    def artifact() -> Path:
        if apply.poll() is None or not art.exists():
            rc = apply.wait(timeout=600)
            log.close()
            assert rc == 0, (root / "apply.log").read_text()[-2000:]
        return art

    s.artifact = artifact
    yield s
    if apply.poll() is None:
        apply.kill()
        apply.wait()
    log.close()


def lmms_eval(s, model_args: str, name: str) -> tuple[dict, list[dict]]:
    """One `lmms-eval --model vlmopt` run: (the task's results, the logged samples)."""
    out = s.root / f"results-{name}"
    cmd = [str(BIN / "lmms-eval"), "--model", "vlmopt", "--model_args", model_args,
           "--include_path", str(s.tasks), "--tasks", TASK, "--batch_size", "4",
           "--output_path", str(out), "--log_samples"]
    r = subprocess.run(cmd, env=_env(s.root), capture_output=True, text=True, timeout=600)
    tail = (r.stdout + r.stderr)[-3000:]
    # NOTE: lmms-eval exits 0 after a failed evaluation; the results file is the evidence
    results = sorted(out.rglob("*_results.json"))
    assert r.returncode == 0 and results, f"lmms-eval failed:\n{tail}"
    samples = sorted(out.rglob(f"*_samples_{TASK}.jsonl"))
    assert samples, tail
    rows = [json.loads(line) for line in samples[0].read_text().splitlines() if line.strip()]
    return json.loads(results[0].read_text())["results"][TASK], rows


def vlmopt_eval(capsys, model: str, data: Path, plan: Path | None = None) -> dict:
    from vlmopt.cli import main

    capsys.readouterr()
    argv = ["eval", model, "--data", str(data), "--json"] + (["--plan", str(plan)] if plan
                                                            else [])
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _per_type(docs: list[dict], doc_ids, hits) -> dict[str, float]:
    by_type = defaultdict(list)
    for i, h in zip(doc_ids, hits):
        by_type[docs[i]["type"]].append(h)
    return {t: sum(v) / len(v) for t, v in sorted(by_type.items())}


def check_cli_run(s, capsys, kind: str, model_args: str, ref: str) -> None:
    res, rows = lmms_eval(s, model_args, kind)
    ours = vlmopt_eval(capsys, ref, s.data)
    acc = res["accuracy,none"]
    print(f"{kind}: lmms-eval accuracy {acc!r}, vlmopt eval accuracy {ours['accuracy']!r} "
          f"on {ours['n']} records")
    assert len(rows) == ours["n"] == N_RECORDS
    assert acc == ours["accuracy"], (acc, ours["accuracy"])
    per_type = _per_type(_docs(s, None), [r["doc_id"] for r in rows],
                         [r["accuracy"] for r in rows])
    assert per_type == ours["per_type"], (per_type, ours["per_type"])


# NOTE: test order: the PyTorch runs first, while the artifact is exported
def test_lmms_eval_cli_on_the_original_model_scores_as_vlmopt_eval(setup, capsys):
    check_cli_run(setup, capsys, "original", "model=builtin:synth-llava", "builtin:synth-llava")


def test_plan_on_the_pytorch_graph_scores_as_vlmopt_eval_plan(setup, capsys):
    """model=...,plan=... through the model class and the task's scoring, in process (the CLI
    plumbing is the same as above): the accuracy of `vlmopt eval --plan` on the same records."""
    from vlmopt.integrations.lmms_eval.model import VlmoptLMM
    from vlmopt.integrations.lmms_eval.task import process_results

    s = setup
    docs = _docs(s, None)
    m = VlmoptLMM(model="builtin:synth-llava", plan=str(s.plan), batch_size=4)
    m.task_dict = {"t": {"test": docs}}
    gen = dict(yaml_generation_kwargs(s))
    texts = m.generate_until(_requests(docs, "generate_until", gen=gen))
    hits = [process_results(d, [t])["accuracy"] for d, t in zip(docs, texts)]
    ours = vlmopt_eval(capsys, "builtin:synth-llava", s.data, s.plan)
    acc = sum(hits) / len(hits)
    print(f"plan: lmms-eval model accuracy {acc!r}, vlmopt eval --plan {ours['accuracy']!r}")
    assert acc == ours["accuracy"]
    assert _per_type(docs, range(len(docs)), hits) == ours["per_type"]


def test_lmms_eval_cli_on_the_artifact_scores_as_vlmopt_eval(setup, capsys):
    art = setup.artifact()
    check_cli_run(setup, capsys, "artifact", f"artifact={art},threads=1", str(art))


def yaml_generation_kwargs(s) -> dict:
    """The generation settings of the written task YAML, as lmms-eval parses them."""
    import yaml

    from vlmopt.integrations.lmms_eval.task import TEMPLATE

    text = TEMPLATE.read_text().replace("@NAME@", TASK)
    keep = [ln for ln in text.splitlines() if "!function" not in ln]
    return yaml.safe_load("\n".join(keep))["generation_kwargs"]


def test_plugin_registers_through_the_entry_point():
    from lmms_eval.models import get_model

    from vlmopt.integrations.lmms_eval.model import VlmoptLMM

    assert get_model("vlmopt") is VlmoptLMM


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give exactly one of model_args artifact=OUT"),
    ({"artifact": "A", "model": "builtin:synth-llava"}, "give exactly one of"),
    ({"artifact": "/nonexistent/out"}, "artifact=/nonexistent/out: no such artifact directory"),
    ({"model": "builtin:synth-llava", "plan": "/nonexistent/p.json"},
     "plan=/nonexistent/p.json: no such file"),
    ({"model": "builtin:synth-llava", "threads": 2}, "provider= and threads= are ONNX Runtime"),
    ({"model": "builtin:synth-llava", "pretrained": "x"}, "unknown model_args pretrained"),
    ({"model": "builtin:synth-llava", "image_at": "middle"}, "image_at must be start or end"),
    ({"model": "builtin:synth-llava", "batch_size": "auto"}, "--batch_size auto"),
    ({"model": "builtin:nope"}, "unknown model 'builtin:nope'"),
])
def test_bad_model_args_are_one_error_line(kwargs, message):
    from vlmopt.integrations.lmms_eval.model import VlmoptLMM

    with pytest.raises(VlmoptError) as e:
        VlmoptLMM(**kwargs)
    text = str(e.value)
    assert text.startswith("vlmopt: ") and message in text and "\n" not in text, text


def test_artifact_with_plan_is_refused(setup):
    from vlmopt.integrations.lmms_eval.model import VlmoptLMM

    with pytest.raises(VlmoptError, match="plan= goes with model="):
        VlmoptLMM(artifact=str(setup.artifact()), plan=str(setup.plan))


def _docs(s, n: int | None = 4) -> list[dict]:
    """The task's docs (the first ``n``), as lmms-eval reads them."""
    lines = (s.tasks / f"{TASK}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def _requests(docs, kind: str, target=None, gen: dict | None = None) -> list:
    from lmms_eval.api.instance import Instance

    from vlmopt.integrations.lmms_eval.task import doc_to_text

    out = []
    for i, d in enumerate(docs):
        second = dict(gen or {"max_new_tokens": 4}) if kind == "generate_until" else \
            (target(d) if target else " " + d["answer"])
        out.append(Instance(request_type=kind, idx=0, arguments=(
            doc_to_text(d), second, doc_to_visual, i, "t", "test"),
            metadata={"task": "t", "doc_id": i, "repeats": 1}))
    return out


def test_loglikelihood_is_the_graphs_first_token_probability(setup):
    """loglikelihood of `" " + answer` (lmms-eval's convention: the mean NLL per token, and
    whether greedy decoding gives it) on ONNX Runtime and on the PyTorch graph, against the
    block graph's own last-position logits (vlmopt eval's runner) and its generation."""
    from vlmopt.api import apply_plan
    from vlmopt.evaluation import answer_token
    from vlmopt.inputs import encode
    from vlmopt.integrations.lmms_eval.model import VlmoptLMM
    from vlmopt.ir.capture import graph_runner

    s = setup
    docs = _docs(s)
    models = [VlmoptLMM(artifact=str(s.artifact()), threads=1),
              VlmoptLMM(model="builtin:synth-llava", plan=str(s.plan))]
    for m in models:
        m.task_dict = {"t": {"test": docs}}
    ll = [m.loglikelihood(_requests(docs, "loglikelihood")) for m in models]
    gen = models[0].generate_until(_requests(docs, "generate_until"))
    run = graph_runner(apply_plan(s.lm, s.plan))
    tok = s.lm.processor.tokenizer
    for i, d in enumerate(docs):
        logits = run(encode(s.lm.processor, [d["prompt"]], doc_to_visual(d)))  # [1, V]
        want = -float(F.log_softmax(logits, -1)[0, answer_token(tok, d["answer"])])
        (nll_ort, greedy_ort), (nll_pt, greedy_pt) = ll[0][i], ll[1][i]
        print(f"doc {i}: NLL ORT {nll_ort:.6f}, PyTorch {nll_pt:.6f}, graph {want:.6f}")
        assert math.isclose(nll_ort, want, abs_tol=1e-4) and math.isclose(nll_pt, want,
                                                                          abs_tol=1e-4)
        hit = first_word(gen[i]) == first_word(d["answer"])
        assert greedy_ort == greedy_pt == hit, (gen[i], d["answer"], greedy_ort, greedy_pt)


def test_loglikelihood_feeds_the_continuation_back(setup):
    """A two-token continuation: its mean NLL is the mean of the answer token's and of the next
    token's given the answer, the latter from the block graph run on the longer prompt. On the
    original model: a drop would score its tokens from the longer prompt's last query and keep
    others than the prefill kept."""
    from vlmopt.api import capture
    from vlmopt.inputs import encode
    from vlmopt.integrations.lmms_eval.model import VlmoptLMM
    from vlmopt.ir.capture import graph_runner

    s = setup
    d = _docs(s)[0]
    second = "red" if first_word(d["answer"]) != "red" else "blue"
    m = VlmoptLMM(model="builtin:synth-llava")
    m.task_dict = {"t": {"test": [d]}}
    cont = f" {d['answer']} {second}"
    (nll, greedy), = m.loglikelihood(_requests([d], "loglikelihood", lambda _: cont))
    tok = s.lm.processor.tokenizer
    ids = tok(cont, add_special_tokens=False)["input_ids"]
    assert len(ids) == 2
    run = graph_runner(capture(s.lm))
    batch = encode(s.lm.processor, [d["prompt"]], doc_to_visual(d))
    batch.pop("position_ids")  # rebuilt from the mask (complete_inputs)
    lp = []
    for k in range(2):  # the prompt, then the prompt + the answer token
        logits = run(batch)
        lp.append(float(F.log_softmax(logits, -1)[0, ids[k]]))
        batch = {**batch,
                 "input_ids": torch.cat([batch["input_ids"], torch.tensor([[ids[k]]])], 1),
                 "attention_mask": torch.cat([batch["attention_mask"],
                                              torch.ones(1, 1, dtype=torch.long)], 1)}
    want = -(lp[0] + lp[1]) / 2
    print(f"two-token NLL: class {nll:.6f}, graph {want:.6f}")
    assert math.isclose(nll, want, abs_tol=1e-4)
    assert greedy is False  # a second answer word is never the greedy continuation


def test_prompt_without_image_token_gets_one(setup):
    from vlmopt.integrations.lmms_eval.model import VlmoptLMM

    m = VlmoptLMM(artifact=str(setup.artifact()), threads=1)
    assert m._prompt("Is it red?", "w") == "<image>\nIs it red?"
    m.image_at = "end"
    assert m._prompt("Is it red?", "w") == "Is it red?\n<image>"
    assert m._prompt("Q?\n<image>", "w") == "Q?\n<image>"
    with pytest.raises(VlmoptError, match="holds <image> 2 times"):
        m._prompt("<image><image>", "w")
    with pytest.raises(VlmoptError, match="greedily only"):
        m._settings({"do_sample": True, "temperature": 0.7}, "t")


def test_task_writer_keeps_labelled_records_and_refuses_bad_input(tmp_path, capsys):
    from vlmopt.integrations.lmms_eval.__main__ import main
    from vlmopt.integrations.lmms_eval.task import write_task

    data = synthvqa.write_dataset(tmp_path / "d", 3, seed=1)
    lines = data.read_text().splitlines()
    unlabelled = json.loads(lines[1])
    unlabelled.pop("answer")
    lines[1] = json.dumps(unlabelled)
    data.write_text("\n".join(lines) + "\n")
    y = write_task(data, tmp_path / "t", "my_task")
    docs = [json.loads(x) for x in (tmp_path / "t" / "my_task.jsonl").read_text().splitlines()]
    assert [d["where"] for d in docs] == [f"{data}:1", f"{data}:3"]
    assert all(Path(d["image"]).is_absolute() and Path(d["image"]).is_file() for d in docs)
    assert "task: my_task" in y.read_text() and "test: my_task.jsonl" in y.read_text()
    for argv, message in [
        (["task", str(data), "--out", str(tmp_path / "no" / "t")], "parent directory"),
        (["task", str(data), "--out", str(tmp_path / "t2"), "--name", "1bad"], "--name '1bad'"),
        (["task", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "t3")],
         "dataset file not found"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("vlmopt: error: ") and message in err and err.count("\n") == 1, err
