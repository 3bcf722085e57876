"""The fault suite: bad input to every verb is one ``vlmopt: error:`` line on stderr that names
the file, line, field or flag at fault, exit code 2, no traceback, and nothing created, left
half-written or overwritten (README, "Bad input").

Each case builds its bad input in its own directory and returns the command line and what the
error line must name. Cases run ``vlmopt.cli.main`` in-process (as the console script does:
argparse's exit is the exit code, warnings and WARNING logs reach stderr); the ``sub`` ones run
``python -m vlmopt.cli`` for real. Almost all fail before a model loads; those that need one use
builtin:synth-llava, and the ``run`` cases share one artifact built per session.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from faultkit import SYNTH, Env, bomb_png, plan_obj, png_bytes, run_in_process, run_subprocess
from faultkit import snapshot as tree

from vlmopt.data import synthvqa


@dataclass
class Expect:
    argv: list[str]
    says: list[str]  # substrings the error line must contain
    out: Path | None = None  # must not exist afterwards (unless it existed before: untouched)


@dataclass
class Case:
    verb: str
    name: str
    build: Callable[[Env], Expect]
    sub: bool = False  # run as a real subprocess
    xfail: str | None = None
    marks: list = field(default_factory=list)


CASES: list[Case] = []


def case(verb: str, name: str, *, sub: bool = False, xfail: str | None = None):
    def deco(fn):
        CASES.append(Case(verb, name, fn, sub, xfail))
        return fn
    return deco


def flags(verb: str, rows: list[tuple[str, list[str], list[str]]], base: Callable[[Env], list]):
    """One case per (name, extra argv, says) on top of ``base(env)``."""
    for name, extra, says in rows:
        def build(env, extra=extra, says=says):
            return Expect([*base(env), *extra], says, env.tmp / "out")
        CASES.append(Case(verb, name, build))


def lines(env: Env, rows: list, name: str = "d") -> Path:
    """A copy of the good dataset whose data.jsonl is ``rows`` (dicts, str or bytes lines)."""
    path = env.data_copy(name)
    good = path.read_text().splitlines()
    out = []
    for r in rows:
        if isinstance(r, int):  # the r-th good record
            r = good[r]
        if isinstance(r, dict):
            r = json.dumps(r)
        out.append(r if isinstance(r, bytes) else r.encode())
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


def rec(env: Env, i: int = 0, **change) -> dict:
    r = json.loads(env.data.read_text().splitlines()[i])
    r.update(change)
    return r


def drop(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


# ============================================================================ datasets


def _eval(env, data):
    return ["eval", SYNTH, "--data", str(data)]


@case("eval", "data-missing")
def _(env):
    return Expect(_eval(env, env.tmp / "nope.jsonl"), ["nope.jsonl", "not found"])


@case("eval", "data-is-a-directory")
def _(env):
    (env.tmp / "adir").mkdir()
    return Expect(_eval(env, env.tmp / "adir"), ["adir", "directory"])


@case("eval", "data-empty-file")
def _(env):
    return Expect(_eval(env, env.file("e.jsonl", "")), ["e.jsonl", "empty"])


@case("eval", "data-blank-lines-only")
def _(env):
    return Expect(_eval(env, env.file("e.jsonl", "\n  \n\n")), ["e.jsonl", "empty"])


@case("eval", "data-malformed-json-at-line-3")
def _(env):
    p = lines(env, [0, 1, '{"image": "images/00002.png", "prompt": "<image>'])
    return Expect(_eval(env, p), [f"{p}:3", "not valid JSON"])


@case("eval", "data-line-not-an-object")
def _(env):
    p = lines(env, [0, "[1, 2]"])
    return Expect(_eval(env, p), [f"{p}:2", "JSON object", "list"])


@case("eval", "data-record-missing-prompt")
def _(env):
    p = lines(env, [0, drop(rec(env, 1), "prompt")])
    return Expect(_eval(env, p), [f"{p}:2", "'prompt'"])


@case("compare", "data-record-missing-image")
def _(env):
    p = lines(env, [drop(rec(env, 0), "image")])
    return Expect(["compare", SYNTH, "--data", str(p), "--calib", str(env.data)],
                  [f"{p}:1", "'image'"])


@case("eval", "data-image-field-not-a-string")
def _(env):
    p = lines(env, [rec(env, 0, image=7)])
    return Expect(_eval(env, p), [f"{p}:1", "'image'"])


@case("eval", "data-answer-not-a-string")
def _(env):
    p = lines(env, [0, 1, rec(env, 2, answer=3)])
    return Expect(_eval(env, p), [f"{p}:3", "'answer'"])


@case("eval", "data-prompt-without-image-token")
def _(env):
    p = lines(env, [rec(env, 0, prompt="What colour is the circle?")])
    return Expect(_eval(env, p), [f"{p}:1", "<image>", "found 0"])


@case("analyze", "data-prompt-with-two-image-tokens")
def _(env):
    p = lines(env, [0, rec(env, 1, prompt="<image> and <image>: same?")])
    return Expect(["analyze", SYNTH, "--calib", str(p)], [f"{p}:2", "<image>", "found 2"])


@case("eval", "data-non-utf8-bytes-at-line-2")
def _(env):
    p = lines(env, [0, json.dumps(rec(env, 1)).encode().replace(b"<image>", b"<image>\xff\xfe")])
    return Expect(_eval(env, p), [f"{p}:2", "not UTF-8", "0xff"])


@case("analyze", "data-non-utf8-calib")
def _(env):
    p = lines(env, [b"\x80\x81 latin-1 garbage"])
    return Expect(["analyze", SYNTH, "--calib", str(p)], [f"{p}:1", "UTF-8"])


@case("eval", "data-image-file-missing")
def _(env):
    p = lines(env, [0, 1, 2])
    (p.parent / "images" / "00002.png").unlink()
    return Expect(_eval(env, p), [f"{p}:3", "00002.png", "not found"])


@case("eval", "data-image-is-a-directory")
def _(env):
    p = lines(env, [rec(env, 0, image="images")])
    return Expect(_eval(env, p), [f"{p}:1", "directory"])


@case("eval", "data-bad-line-beyond-limit")
def _(env):
    p = lines(env, [0, 1, 2, 0, "{oops"])
    return Expect([*_eval(env, p), "--limit", "1"], [f"{p}:5", "not valid JSON"])


@case("apply", "calib-bad-line-beyond-the-8-parity-records")
def _(env):
    p = lines(env, [0, 1, 2] * 3 + [drop(rec(env, 0), "prompt")])  # line 10
    return Expect(["apply", str(env.plan), SYNTH, "--out", str(env.tmp / "out"),
                   "--calib", str(p)], [f"{p}:10", "'prompt'"], env.tmp / "out")


@case("optimize", "calib-bad-line-beyond-calib-limit")
def _(env):
    p = lines(env, [0, 1, 2, "{oops"])
    return Expect(["optimize", SYNTH, "--target-flops", "0.3", "--out", str(env.tmp / "out"),
                   "--calib", str(p), "--eval", str(env.data), "--calib-limit", "2"],
                  [f"{p}:4", "not valid JSON"], env.tmp / "out")


@case("optimize", "eval-data-missing")
def _(env):
    return Expect(["optimize", SYNTH, "--target-flops", "0.3", "--out", str(env.tmp / "out"),
                   "--calib", str(env.data), "--eval", str(env.tmp / "held.jsonl")],
                  ["held.jsonl", "not found"], env.tmp / "out")


@case("compare", "calib-missing")
def _(env):
    return Expect(["compare", SYNTH, "--data", str(env.data), "--calib",
                   str(env.tmp / "nocalib.jsonl")], ["nocalib.jsonl", "not found"])


@case("bench", "data-malformed")
def _(env):
    p = lines(env, [0, "{oops"])
    return Expect(["bench", SYNTH, "--data", str(p)], [f"{p}:2", "not valid JSON"])


# --- images: decoded when used (the model is loaded by then)


def _spoil_image(env, how: str) -> tuple[Path, Path]:
    p = lines(env, [0, 1, 2])
    img = p.parent / "images" / "00001.png"
    if how == "text":
        img.write_text("this is a text file, not a PNG\n")
    elif how == "truncated":
        img.write_bytes(img.read_bytes()[:200])
    elif how == "bomb":
        img.write_bytes(bomb_png())
    return p, img


@case("eval", "image-that-is-text")
def _(env):
    p, img = _spoil_image(env, "text")
    return Expect(_eval(env, p), [f"{p}:2", str(img), "cannot decode"])


@case("eval", "image-truncated-png")
def _(env):
    p, img = _spoil_image(env, "truncated")
    return Expect(_eval(env, p), [f"{p}:2", str(img), "cannot decode"])


@case("eval", "image-decompression-bomb")
def _(env):
    p, img = _spoil_image(env, "bomb")
    return Expect(_eval(env, p), [f"{p}:2", str(img), "decompression bomb"])


@case("compare", "calib-image-decompression-bomb")
def _(env):
    p, img = _spoil_image(env, "bomb")
    return Expect(["compare", SYNTH, "--data", str(env.data), "--calib", str(p)],
                  [f"{p}:2", str(img), "decompression bomb"])


# ============================================================================ flags


def _opt(env):
    return ["optimize", SYNTH, "--out", str(env.tmp / "out"), "--calib", str(env.data),
            "--eval", str(env.data)]


flags("optimize", [
    ("target-flops-nan", ["--target-flops", "nan"], ["--target-flops", "finite", "nan"]),
    ("target-flops-inf", ["--target-flops", "inf"], ["--target-flops", "finite"]),
    ("target-flops-negative", ["--target-flops", "-0.2"], ["--target-flops", "(0, 1]"]),
    ("target-flops-zero", ["--target-flops", "0"], ["--target-flops", "(0, 1]"]),
    ("target-flops-over-1", ["--target-flops", "1.5"], ["--target-flops", "(0, 1]"]),
    ("target-flops-abc", ["--target-flops", "abc"], ["--target-flops", "'abc'"]),
    ("target-flops-missing", [], ["--target-flops", "required"]),
    ("tolerance-nan", ["--target-flops", "0.3", "--tolerance", "nan"], ["--tolerance", "nan"]),
    ("tolerance-negative", ["--target-flops", "0.3", "--tolerance", "-0.1"], ["--tolerance"]),
    ("target-size-nan", ["--target-flops", "0.3", "--target-size", "nan"], ["--target-size"]),
    ("target-size-zero", ["--target-flops", "0.3", "--target-size", "0"], ["--target-size"]),
    ("target-size-bad-unit", ["--target-flops", "0.3", "--target-size", "4XB"],
     ["--target-size", "4XB"]),
    ("trials-zero", ["--target-flops", "0.3", "--trials", "0"], ["--trials", ">= 1"]),
    ("calib-limit-negative", ["--target-flops", "0.3", "--calib-limit", "-5"],
     ["--calib-limit"]),
    ("strategy-bad-choice", ["--target-flops", "0.3", "--strategy", "annealing"],
     ["--strategy", "annealing"]),
], _opt)


def _bench(env):
    return ["bench", SYNTH, "--data", str(env.data)]


flags("bench", [
    ("target-flops-nan", ["--target-flops", "nan"], ["--target-flops", "nan"]),
    ("target-flops-over-1", ["--target-flops", "1.5"], ["--target-flops", "(0, 1]"]),
    ("target-flops-negative", ["--target-flops", "-1"], ["--target-flops"]),
    ("repeats-zero", ["--repeats", "0"], ["--repeats", ">= 1"]),
    ("batch-size-zero", ["--batch-size", "0"], ["--batch-size", ">= 1"]),
    ("threads-zero", ["--threads", "0"], ["--threads", ">= 1"]),
    ("prompt-tokens-negative", ["--prompt-tokens", "-4"], ["--prompt-tokens"]),
    ("decode-tokens-negative", ["--decode-tokens", "-1"], ["--decode-tokens"]),
    ("eval-limit-zero", ["--eval-limit", "0"], ["--eval-limit"]),
    ("drop-layer-negative", ["--drop-layer", "-1"], ["--drop-layer"]),
    ("quantize-unknown-mode", ["--quantize", "int8,int3"], ["--quantize", "int3"]),
], _bench)


@case("bench", "drop-layer-past-the-last-layer")
def _(env):
    return Expect([*_bench(env), "--drop-layer", "8"], ["--drop-layer 8", "8 decoder layers"])


@case("bench", "save-is-a-directory")
def _(env):
    (env.tmp / "results").mkdir()
    return Expect([*_bench(env), "--save", str(env.tmp / "results")], ["--save", "directory"])


@case("bench", "save-parent-missing")
def _(env):
    return Expect([*_bench(env), "--save", str(env.tmp / "no" / "r.json")],
                  ["--save", "does not exist"], env.tmp / "no")


@case("bench", "work-dir-is-a-file")
def _(env):
    f = env.file("work", "user file\n")
    return Expect([*_bench(env), "--work-dir", str(f)], ["--work-dir", "not a directory"], f)


flags("eval", [
    ("limit-zero", ["--limit", "0"], ["--limit", ">= 1"]),
    ("batch-size-abc", ["--batch-size", "abc"], ["--batch-size", "'abc'"]),
], lambda env: _eval(env, env.data))

flags("analyze", [
    ("limit-negative", ["--limit", "-1"], ["--limit"]),
], lambda env: ["analyze", SYNTH, "--calib", str(env.data)])

flags("flops", [
    ("image-size-abc", ["--image-size", "abc"], ["--image-size", "'abc'"]),
    ("image-size-zero", ["--image-size", "0x448"], ["--image-size"]),
    ("prompt-tokens-negative", ["--prompt-tokens", "-1"], ["--prompt-tokens", ">= 0"]),
], lambda env: ["flops", SYNTH])

flags("data synth", [
    ("n-zero", ["--n", "0"], ["--n", ">= 1"]),
    ("n-abc", ["--n", "abc"], ["--n", "'abc'"]),
    ("seed-not-an-int", ["--n", "2", "--seed", "1.5"], ["--seed", "'1.5'"]),
], lambda env: ["data", "synth", "--out", str(env.tmp / "out")])

flags("apply", [
    ("quantize-bad-choice", ["--quantize", "int3"], ["--quantize", "int3"]),
    ("out-missing", [], ["--out", "required"]),
], lambda env: ["apply", str(env.plan), SYNTH])

# argparse itself, for real: one line, no usage block
for _name, _argv, _says in [
    ("no-command", [], ["COMMAND", "required"]),
    ("unknown-command", ["frobnicate"], ["frobnicate", "invalid choice"]),
    ("unknown-flag", ["eval", SYNTH, "--bogus", "1"], ["eval", "--bogus"]),
    ("missing-positional", ["flops"], ["flops", "model"]),
    ("run-missing-image-flag", ["run", "somewhere", "--prompt", "<image>"], ["--image"]),
    ("bad-choice", ["run", "somewhere", "--image", "x", "--prompt", "<image>", "--provider",
                    "tpu"], ["--provider", "tpu"]),
    ("data-without-subcommand", ["data"], ["data", "{synth}"]),
]:
    CASES.append(Case("argparse", _name, lambda env, a=_argv, s=_says: Expect(a, s), sub=True))


# ============================================================================ plans


def _flops_plan(env, obj=None, raw: bytes | None = None):
    p = env.tmp / "plan.json"
    p.write_bytes(raw if raw is not None else json.dumps(obj).encode())
    return ["flops", SYNTH, "--plan", str(p)], p


@case("flops", "plan-missing")
def _(env):
    return Expect(["flops", SYNTH, "--plan", str(env.tmp / "nope.json")],
                  ["nope.json", "not found"])


@case("flops", "plan-is-a-directory")
def _(env):
    (env.tmp / "p").mkdir()
    return Expect(["flops", SYNTH, "--plan", str(env.tmp / "p")], ["p", "directory"])


@case("flops", "plan-empty-file")
def _(env):
    argv, p = _flops_plan(env, raw=b"")
    return Expect(argv, [str(p), "empty"])


@case("flops", "plan-not-json")
def _(env):
    argv, p = _flops_plan(env, raw=b'{"schema": "vlmopt.plan/1",\n "passes": [,]}')
    return Expect(argv, [f"{p}:2", "not valid JSON"])


@case("flops", "plan-non-utf8")
def _(env):
    argv, p = _flops_plan(env, raw=b'{"schema": "vlmopt.plan/1",\n "model": "\xe9t\xe9"}')
    return Expect(argv, [f"{p}:2", "UTF-8"])


@case("flops", "plan-is-a-list")
def _(env):
    argv, p = _flops_plan(env, [{"name": "drop_tokens"}])
    return Expect(argv, [str(p), "JSON object"])


@case("flops", "plan-wrong-schema")
def _(env):
    argv, p = _flops_plan(env, {**plan_obj(SYNTH, env.fingerprint), "schema": "vlmopt.plan/9"})
    return Expect(argv, [str(p), "'schema'", "vlmopt.plan/9"])


@case("flops", "plan-missing-passes")
def _(env):
    argv, p = _flops_plan(env, drop(plan_obj(SYNTH, env.fingerprint), "passes"))
    return Expect(argv, [str(p), "'passes'"])


@case("flops", "plan-unknown-pass")
def _(env):
    argv, p = _flops_plan(env, plan_obj(SYNTH, env.fingerprint,
                                        [{"name": "squash", "config": {}}]))
    return Expect(argv, [str(p), "passes[0]", "unknown pass", "'squash'"])


@case("flops", "plan-unknown-field")
def _(env):
    argv, p = _flops_plan(env, plan_obj(SYNTH, env.fingerprint, [
        {"name": "drop_tokens", "config": {"keep": {"layer_2": 98}, "speed": 11}}]))
    return Expect(argv, [str(p), "drop_tokens", "'speed'"])


@case("flops", "plan-passes-out-of-order")
def _(env):
    argv, p = _flops_plan(env, plan_obj(SYNTH, env.fingerprint, [
        {"name": "freeze_visual", "config": {"layers": ["layer_6"]}},
        {"name": "drop_tokens", "config": {"keep": {"layer_2": 98}}}]))
    return Expect(argv, [str(p), "drop_tokens", "freeze_visual"])


@case("flops", "plan-for-another-model")
def _(env):
    argv, p = _flops_plan(env, plan_obj("other-model", "sha256:0123456789abcdef"))
    return Expect(argv, [str(p), "other-model", "sha256:0123456789abcdef", env.fingerprint])


@case("apply", "plan-keeps-more-tokens-than-reach-the-layer")
def _(env):
    argv, p = _flops_plan(env, plan_obj(SYNTH, env.fingerprint, [
        {"name": "drop_tokens", "config": {"keep": {"layer_2": 500}}}]))
    out = env.tmp / "out"
    return Expect(["apply", str(p), SYNTH, "--out", str(out), "--no-onnx"],
                  ["drop_tokens", "layer_2", "500", "196"], out)


@case("eval", "plan-unknown-pass")
def _(env):
    argv, p = _flops_plan(env, plan_obj(SYNTH, env.fingerprint, [{"name": "x", "config": {}}]))
    return Expect([*_eval(env, env.data), "--plan", str(p)], [str(p), "unknown pass"])


@case("bench", "plan-non-utf8")
def _(env):
    argv, p = _flops_plan(env, raw=b"\xff\xfe{}")
    return Expect([*_bench(env), "--plan", str(p)], [f"{p}:1", "UTF-8"])


# ============================================================================ models


def _model_dir(env, config=None, raw: bytes | None = None, files: dict | None = None) -> Path:
    d = env.tmp / "model"
    d.mkdir()
    if config is not None or raw is not None:
        (d / "config.json").write_bytes(raw if raw is not None else json.dumps(config).encode())
    for name, content in (files or {}).items():
        (d / name).write_bytes(content)
    return d


def _synth_config() -> dict:
    from faultkit import REPO

    return json.loads((REPO / "vlmopt/builtin/synth-llava/config.json").read_text())


@case("flops", "model-missing")
def _(env):
    return Expect(["flops", str(env.tmp / "no-model")], ["no-model", "no such model"])


@case("flops", "model-is-a-file")
def _(env):
    f = env.file("model.safetensors", b"\0" * 16)
    return Expect(["flops", str(f)], [str(f), "directory"])


@case("flops", "model-without-config")
def _(env):
    d = _model_dir(env)
    return Expect(["flops", str(d)], [str(d), "config.json"])


@case("flops", "model-pickle-weights-only")
def _(env):
    d = _model_dir(env, _synth_config(), files={"pytorch_model.bin": b"PK\x03\x04pickle"})
    return Expect(["flops", str(d)], [str(d), "pytorch_model.bin", "safetensors"])


@case("eval", "model-pickle-weights-only")
def _(env):
    d = _model_dir(env, _synth_config(), files={"pytorch_model.bin": b"PK\x03\x04pickle"})
    return Expect(["eval", str(d), "--data", str(env.data)], ["pytorch_model.bin", "pickle"])


@case("flops", "model-auto-map-remote-code")
def _(env):
    d = _model_dir(env, {**_synth_config(), "auto_map": {"AutoModel": "modeling_x.Model"}})
    return Expect(["flops", str(d)], [f"{d}/config.json", "auto_map"])


@case("apply", "model-auto-map-remote-code")
def _(env):
    d = _model_dir(env, {**_synth_config(), "auto_map": {"AutoConfig": "x.Config"}})
    return Expect(["apply", str(env.plan), str(d), "--out", str(env.tmp / "out"), "--no-onnx"],
                  ["auto_map"], env.tmp / "out")


@case("flops", "model-config-not-json")
def _(env):
    d = _model_dir(env, raw=b'{"model_type": "llava",')
    return Expect(["flops", str(d)], [f"{d}/config.json", "not valid JSON"])


@case("flops", "model-config-non-utf8")
def _(env):
    d = _model_dir(env, raw=b'{"model_type": "llava\xff"}')
    return Expect(["flops", str(d)], [f"{d}/config.json", "UTF-8"])


@case("flops", "model-config-is-a-list")
def _(env):
    d = _model_dir(env, [_synth_config()])
    return Expect(["flops", str(d)], [f"{d}/config.json", "object"])


@case("flops", "model-config-is-a-string")
def _(env):
    d = _model_dir(env, "llava")
    return Expect(["flops", str(d)], [f"{d}/config.json", "object"])


@case("flops", "model-config-model-type-not-a-string")
def _(env):
    d = _model_dir(env, {"model_type": 3})
    return Expect(["flops", str(d)], [f"{d}/config.json", "model_type"])


@case("flops", "model-config-without-model-type")
def _(env):
    d = _model_dir(env, drop(_synth_config(), "model_type"))
    return Expect(["flops", str(d)], [f"{d}/config.json", "model_type"])


@case("flops", "model-config-text-config-wrong-type")
def _(env):
    d = _model_dir(env, {**_synth_config(), "text_config": 5})
    return Expect(["flops", str(d)], [f"{d}/config.json", "text_config"])


@case("flops", "model-unsupported-family")
def _(env):
    d = _model_dir(env, {"model_type": "bert", "architectures": ["BertModel"]})
    return Expect(["flops", str(d)], ["unsupported model family", "'bert'"])


@case("flops", "model-safetensors-garbage")
def _(env):
    d = _model_dir(env, _synth_config(), files={"model.safetensors": b"not safetensors" * 4})
    return Expect(["flops", str(d)], [str(d), "cannot load weights"])


# ============================================================================ artifacts (run)


def _run(art, image=None, prompt="What colour is the circle?\n<image>", *extra):
    return ["run", str(art), "--image", str(image), "--prompt", prompt, *extra]


def _image(env) -> Path:
    return env.data.parent / "images" / "00000.png"


def _flip(path: Path, at: int) -> None:
    b = bytearray(path.read_bytes())
    b[at] ^= 0x01
    path.write_bytes(bytes(b))


def _rewrite_manifest(art: Path, edit: Callable[[dict], None], reseal: bool) -> None:
    from vlmopt.runtime import manifest_digest

    mf = art / "manifest.json"
    m = json.loads(mf.read_text())
    edit(m)
    if reseal:  # a consistent edit: whoever edited it also re-computed the checksum
        m["manifest_sha256"] = manifest_digest(m)
    mf.write_text(json.dumps(m, indent=2))


@case("run", "directory-that-is-no-artifact")
def _(env):
    (env.tmp / "plain").mkdir()
    return Expect(_run(env.tmp / "plain", _image(env)), ["plain", "manifest.json"])


@case("run", "artifact-missing")
def _(env):
    return Expect(_run(env.tmp / "gone", _image(env)), ["gone", "no such artifact"])


@case("run", "one-flipped-byte-in-an-onnx-graph")
def _(env):
    art = env.artifact_copy()
    g = art / "onnx" / "decode.onnx"
    _flip(g, g.stat().st_size // 2)
    m = json.loads((art / "manifest.json").read_text())
    from vlmopt.runtime import sha256

    return Expect(_run(art, _image(env)), ["checksum mismatch", "onnx/decode.onnx",
                                           m["files"]["onnx/decode.onnx"]["sha256"],
                                           sha256(g)])


@case("run", "one-flipped-byte-in-manifest-json")
def _(env):
    art = env.artifact_copy()
    mf = art / "manifest.json"
    text = mf.read_bytes()
    _flip(mf, text.index(b'"fingerprint": "sha256:') + 30)  # still valid JSON
    return Expect(_run(art, _image(env)), [str(mf), "checksum mismatch", "edited or damaged"])


@case("run", "manifest-missing-kv")
def _(env):
    art = env.artifact_copy()
    _rewrite_manifest(art, lambda m: m.pop("kv"), reseal=True)
    return Expect(_run(art, _image(env)), ["manifest.json", "'kv.n_layers'", "missing"])


@case("run", "manifest-graph-file-not-a-string")
def _(env):
    art = env.artifact_copy()
    _rewrite_manifest(art, lambda m: m["graphs"]["prefill"].update(file=3), reseal=True)
    return Expect(_run(art, _image(env)), ["manifest.json", "'graphs.prefill.file'"])


@case("run", "manifest-without-its-checksum")
def _(env):
    art = env.artifact_copy()
    _rewrite_manifest(art, lambda m: m.pop("manifest_sha256"), reseal=False)
    return Expect(_run(art, _image(env)), ["manifest.json", "'manifest_sha256'"])


@case("run", "manifest-non-utf8")
def _(env):
    art = env.artifact_copy()
    mf = art / "manifest.json"
    mf.write_bytes(mf.read_bytes().replace(b'"schema"', b'"sch\xe9ma"', 1))
    return Expect(_run(art, _image(env)), [f"{mf}:", "UTF-8"])


@case("run", "manifest-is-a-list")
def _(env):
    art = env.artifact_copy()
    (art / "manifest.json").write_text("[]")
    return Expect(_run(art, _image(env)), ["manifest.json", "not a vlmopt.artifact/1"])


@case("run", "onnx-graph-not-listed-in-files")
def _(env):
    art = env.artifact_copy()
    shutil.copy(art / "onnx" / "prefill.onnx", art / "onnx" / "prefill-v2.onnx")
    return Expect(_run(art, _image(env)), ["onnx/prefill-v2.onnx", "not listed"])


@case("run", "graph-in-use-dropped-from-files")
def _(env):
    art = env.artifact_copy()
    _rewrite_manifest(art, lambda m: m["files"].pop("onnx/prefill.onnx"), reseal=True)
    return Expect(_run(art, _image(env)), ["onnx/prefill.onnx", "not listed"])


@case("run", "graph-path-outside-the-artifact")
def _(env):
    art = env.artifact_copy()
    _rewrite_manifest(art, lambda m: m["graphs"]["decode"].update(file="../decode.onnx"),
                      reseal=True)
    return Expect(_run(art, _image(env)), ["manifest.json", "../decode.onnx", "outside"])


def _art(env):
    return env.fixture("fault_artifact")


flags("run", [
    ("max-new-tokens-zero", ["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    ("max-new-tokens-negative", ["--max-new-tokens", "-1"], ["--max-new-tokens", ">= 1"]),
    ("max-new-tokens-abc", ["--max-new-tokens", "abc"], ["--max-new-tokens", "'abc'"]),
    ("max-new-tokens-huge", ["--max-new-tokens", "1000000000"],
     ["--max-new-tokens 1000000000", "512 positions"]),
], lambda env: _run(_art(env), _image(env)))


@case("run", "image-missing")
def _(env):
    return Expect(_run(_art(env), env.tmp / "nope.png"), ["--image", "nope.png", "no such file"])


@case("run", "image-that-is-text")
def _(env):
    f = env.file("note.png", "not an image\n")
    return Expect(_run(_art(env), f), ["--image", str(f), "not an image"])


@case("run", "image-truncated-png")
def _(env):
    f = env.file("cut.png", _image(env).read_bytes()[:300])
    return Expect(_run(_art(env), f), ["--image", str(f), "not an image"])


@case("run", "image-decompression-bomb")
def _(env):
    f = env.file("bomb.png", bomb_png())
    return Expect(_run(_art(env), f), ["--image", str(f), "decompression bomb"])


@case("run", "prompt-without-image-token")
def _(env):
    return Expect(_run(_art(env), _image(env), "What colour is it?"),
                  ["--prompt", "<image>", "found 0"])


@case("run", "prompt-with-two-image-tokens")
def _(env):
    return Expect(_run(_art(env), _image(env), "<image> or <image>?"),
                  ["--prompt", "<image>", "found 2"])


@case("run", "onnx-flip-via-subprocess", sub=True)
def _(env):
    art = env.artifact_copy()
    _flip(art / "onnx" / "prefill.onnx", 100)
    return Expect(_run(art, _image(env)), ["checksum mismatch", "onnx/prefill.onnx"])


# ============================================================================ writes


def _apply(env, out=None):
    out = out or env.tmp / "out"
    return ["apply", str(env.plan), SYNTH, "--out", str(out), "--no-onnx"], out


def _fail_write(env, name: str, err: int) -> None:
    """Path.write_text raises ``err`` for a file called ``name`` (a full or read-only disk)."""
    real = Path.write_text

    def write_text(self, *a, **k):
        if self.name == name:
            raise OSError(err, os.strerror(err), str(self))
        return real(self, *a, **k)

    env.monkeypatch.setattr(Path, "write_text", write_text)


@case("apply", "out-is-an-existing-file")
def _(env):
    f = env.file("out", "the user's notes\n")
    argv, out = _apply(env, f)
    return Expect(argv, ["--out", str(f), "not a directory"], f)


@case("apply", "out-is-a-non-empty-directory")
def _(env):
    env.file("out/keep.txt", "precious\n")
    argv, out = _apply(env)
    return Expect(argv, ["--out", str(out), "not empty"], out)


@case("apply", "out-parent-missing")
def _(env):
    argv, out = _apply(env, env.tmp / "missing" / "out")
    return Expect(argv, ["--out", "parent directory", "does not exist"], env.tmp / "missing")


@case("apply", "out-parent-is-a-file")
def _(env):
    f = env.file("notes.txt", "user file\n")
    argv, out = _apply(env, f / "out")
    return Expect(argv, ["--out", str(f), "not a directory"], f)


@case("apply", "out-parent-read-only")
def _(env):
    import tempfile

    def mkdtemp(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), k.get("dir"))

    env.monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)  # root ignores chmod
    argv, out = _apply(env)
    return Expect(argv, ["--out", str(out), "Permission denied"], out)


@case("apply", "disk-full-while-writing")
def _(env):
    _fail_write(env, "graph.txt", errno.ENOSPC)
    argv, out = _apply(env)
    return Expect(argv, ["--out", str(out), "graph.txt", "No space left on device"], out)


@case("apply", "read-only-file-system")
def _(env):
    _fail_write(env, "passes.json", errno.EROFS)
    argv, out = _apply(env)
    return Expect(argv, ["--out", str(out), "Read-only file system"], out)


@case("apply", "dump-dir-is-a-file")
def _(env):
    f = env.file("dump", "user file\n")
    argv, out = _apply(env)
    return Expect([*argv, "--dump-dir", str(f)], ["--dump-dir", str(f), "not a directory"], out)


@case("apply", "dump-dir-parent-is-a-file")
def _(env):
    f = env.file("notes.txt", "user file\n")
    argv, out = _apply(env)
    return Expect([*argv, "--dump-dir", str(f / "dump")], ["--dump-dir", str(f / "dump")], out)


@case("apply", "disk-full-writing-the-plan")
def _(env):
    _fail_write(env, "plan.json.tmp", errno.ENOSPC)
    argv, out = _apply(env)
    return Expect(argv, ["--out", str(out), "No space left on device"], out)


def _synth(env, out):
    return ["data", "synth", "--n", "4", "--out", str(out)]


@case("data synth", "out-is-a-non-empty-directory")
def _(env):
    env.file("out/data.jsonl", "precious\n")
    return Expect(_synth(env, env.tmp / "out"), ["--out", "not empty"], env.tmp / "out")


@case("data synth", "out-is-an-existing-file")
def _(env):
    f = env.file("out", "precious\n")
    return Expect(_synth(env, f), ["--out", "not a directory"], f)


@case("data synth", "out-parent-missing")
def _(env):
    return Expect(_synth(env, env.tmp / "a" / "b"), ["--out", "does not exist"], env.tmp / "a")


@case("data synth", "disk-full-after-two-images")
def _(env):
    from PIL import Image

    real, calls = Image.Image.save, []

    def save(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))
        return real(self, fp, *a, **k)

    env.monkeypatch.setattr(Image.Image, "save", save)
    out = env.tmp / "out"
    return Expect(_synth(env, out), ["--out", str(out), "No space left on device"], out)


@case("data synth", "read-only-file-system-at-the-jsonl")
def _(env):
    _fail_write(env, "data.jsonl.tmp", errno.EROFS)
    out = env.tmp / "out"
    return Expect(_synth(env, out), ["--out", str(out), "Read-only file system"], out)


@case("data synth", "out-parent-read-only")
def _(env):
    import tempfile

    def mkdtemp(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), k.get("dir"))

    env.monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    out = env.tmp / "out"
    return Expect(_synth(env, out), ["--out", str(out), "Permission denied"], out)


# --- optimize's OUT: vlmopt/optimize.py (not fixed here when they fail)


@case("optimize", "out-is-an-existing-file")
def _(env):
    f = env.file("out", "precious\n")
    return Expect(["optimize", SYNTH, "--target-flops", "0.3", "--out", str(f), "--calib",
                   str(env.data), "--eval", str(env.data)], ["--out", str(f)], f)


@case("optimize", "out-parent-missing")
def _(env):
    out = env.tmp / "missing" / "out"
    return Expect(["optimize", SYNTH, "--target-flops", "0.3", "--out", str(out), "--calib",
                   str(env.data), "--eval", str(env.data)], ["--out", "does not exist"],
                  env.tmp / "missing")


@case("optimize", "out-is-a-foreign-non-empty-directory")
def _(env):
    env.file("out/thesis.tex", "precious\n")
    return Expect(["optimize", SYNTH, "--target-flops", "0.3", "--out", str(env.tmp / "out"),
                   "--calib", str(env.data), "--eval", str(env.data)], ["--out"],
                  env.tmp / "out")


# ============================================================================ the test

N = len(CASES)


def _id(i: int, c: Case) -> str:
    return f"{c.verb.replace(' ', '-')}-{c.name}[{i + 1}of{N}]"


def _params():
    for i, c in enumerate(CASES):
        marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
        yield pytest.param(c, id=_id(i, c), marks=marks)


def test_fault_suite_size(capsys):
    with capsys.disabled():
        print(f"\nfault suite: {N} cases")
    assert N >= 45
    assert {c.verb for c in CASES} >= {"optimize", "apply", "eval", "run", "flops", "analyze",
                                       "compare", "bench", "data synth"}


@pytest.fixture
def env(tmp_path, request, monkeypatch) -> Env:
    d = tmp_path / "case"
    d.mkdir()
    return Env(d, request, monkeypatch)


@pytest.mark.parametrize("c", list(_params()))
def test_bad_input_is_one_error_line(c: Case, env: Env, capsys, fault_root):
    exp = c.build(env)
    watched = [env.tmp, fault_root]
    before = [tree(w) for w in watched]
    out_existed = exp.out is not None and exp.out.exists()
    rc, stdout, stderr = run_subprocess(exp.argv) if c.sub else run_in_process(exp.argv, capsys)
    err = stderr.rstrip("\n").split("\n")
    assert rc == 2, f"exit {rc}\nstdout: {stdout}\nstderr: {stderr}"
    assert "Traceback" not in stderr + stdout, stderr
    assert len(err) == 1 and err[0].startswith("vlmopt: error: "), stderr
    assert "PosixPath(" not in err[0] and " object at 0x" not in err[0], err[0]  # paths, not reprs
    missing = [s for s in exp.says if s not in err[0]]
    assert not missing, f"{err[0]!r} does not name {missing}"
    if exp.out is not None and not out_existed:
        assert not exp.out.exists(), f"{exp.out} was created"
    after = [tree(w) for w in watched]
    for w, b, a in zip(watched, before, after):
        assert a == b, (f"{w} changed: added {sorted(set(a) - set(b))}, removed "
                        f"{sorted(set(b) - set(a))}, modified "
                        f"{sorted(k for k in a if k in b and a[k] != b[k])}")


# ============================================================================ not faults


def test_help_still_prints_usage(capsys):
    rc, out, err = run_in_process(["optimize", "--help"], capsys)
    assert rc == 0 and "usage: vlmopt optimize" in out and "--target-flops" in out, err


def test_a_huge_image_is_resized_by_the_processor_not_refused(fault_artifact, tmp_path):
    """10000x10000 (100 Mpixels, over Pillow's warning threshold): `vlmopt run` answers, with
    no warning on stderr and without decoding it into gigabytes."""
    import resource

    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(10000, 10000))
    rc, out, err = run_subprocess(["run", str(fault_artifact), "--image", str(big), "--prompt",
                                   "What colour is the circle?\n<image>", "--max-new-tokens",
                                   "2"])
    assert rc == 0 and out.strip() and err == "", err
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    assert peak < 1.5, f"peak RSS {peak:.2f} GiB"


def test_data_synth_publishes_whole(tmp_path, capsys):
    out = tmp_path / "new"
    rc, stdout, err = run_in_process(["data", "synth", "--n", "2", "--out", str(out)], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]  # no temp left beside it
    assert sorted(p.name for p in out.iterdir()) == ["data.jsonl", "images"]
    recs = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in recs] == [synthvqa.sample(0, i).prompt for i in range(2)]
