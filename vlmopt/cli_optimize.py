"""``vlmopt optimize``: its flags, progress bar and summary (the job is vlmopt.optimize)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path

from vlmopt.cli_args import float_flag, positive
from vlmopt.errors import VlmoptError

log = logging.getLogger("vlmopt")


def _size_flag(flag: str):
    """--target-size: a ratio of the original weight bytes (0.5) or bytes with an optional unit
    (4MB, 2.5GiB); finite and positive. Whether it is reachable is checked once the model is
    loaded (vlmopt.optimize.size_ratio)."""
    units = ("", "B", "KB", "MB", "GB", "KIB", "MIB", "GIB")

    def parse(v: str) -> str:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", v)
        if not m or m.group(2).upper() not in units:
            raise argparse.ArgumentTypeError(f"{flag} must be a ratio like 0.5 or a size like "
                                             f"4MB, got {v!r}")
        if not 0 < float(m.group(1)) < math.inf:
            raise argparse.ArgumentTypeError(f"{flag} must be positive, got {v!r}")
        return v
    return parse


def check_flags(args) -> None:
    """Ranges of the float flags (argparse's types already refused NaN, inf and non-numbers).
    NOTE: a VlmoptError (exit 2, returned by main) rather than an argparse error, as before."""
    if not 0 < args.target_flops <= 1:
        raise VlmoptError(f"--target-flops must lie in (0, 1], got {args.target_flops:g}")
    if not 0 <= args.tolerance < 1:
        raise VlmoptError(f"--tolerance must lie in [0, 1), got {args.tolerance:g}")


def cmd_optimize(args) -> int:
    from vlmopt.optimize import Options, optimize

    check_flags(args)

    opts = Options(model=args.model, target=args.target_flops, out=Path(args.out),
                   calib=args.calib, eval=args.eval, strategy=args.strategy, trials=args.trials,
                   seed=args.seed, storage=args.storage, study=args.study, scope=args.flops_scope,
                   objective=args.objective, calib_limit=args.calib_limit,
                   search_samples=args.search_samples, finalists=args.finalists,
                   target_size=args.target_size,
                   eval_limit=args.eval_limit, tolerance=args.tolerance,
                   emit=not args.no_emit, fuse=not args.no_fuse)
    tty = sys.stderr.isatty()
    bar = None
    if tty:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[best]}"), transient=True)
        task = bar.add_task("search", total=args.trials if args.strategy != "gsearch" else None,
                            best="")

    def progress(rec, best):
        text = "" if best is None else (f"best fidelity {best.metrics.fidelity:.3f} at "
                                        f"{best.ratio_llm:.3f} LLM / {best.ratio_total:.3f} "
                                        "total FLOPs")
        if bar is not None:
            bar.update(task, advance=1, best=text)
        else:
            log.info("trial %d (%s): %s", rec.number, rec.source, text)

    def stage(msg):
        print(f"vlmopt: {msg}", file=sys.stderr, flush=True)

    if bar is not None:
        bar.start()
    try:
        res = optimize(opts, progress=progress, stage=stage)
    finally:
        if bar is not None:
            bar.stop()
    ours = next(m for m in res["methods"] if m["method"].startswith("vlmopt"))
    orig = res["methods"][0]
    if args.json:
        print(json.dumps({k: res[k] for k in ("model", "target", "scope", "strategy",
                                               "seconds", "stage_seconds", "latency_ratio",
                                               "methods")}, indent=2))
        return 0
    print(f"wrote {opts.out}: plan.json, report.html/.md/.json"
          + (", ONNX package" if isinstance(res.get("artifact"), dict) else ""))
    print(f"chosen plan: LLM FLOPs ratio {ours['ratio_llm']:.3f} (total "
          f"{ours['ratio_total']:.3f}); calibration fidelity {ours['calib']['fidelity']:.3f} "
          f"(original {orig['calib']['fidelity']:.3f}); prefill latency ratio "
          f"{res['latency_ratio']:.3f}"
          + (f" (ONNX Runtime {res['latency_ratio_ort']:.3f})"
             if res.get("latency_ratio_ort") is not None else "")
          + f"; {res['seconds']:.0f} s")
    print("  seconds per step: " + ", ".join(f"{k} {v:.0f}"
                                             for k, v in res["stage_seconds"].items()))
    for m in res["methods"]:
        if m.get("eval"):
            print(f"  held-out {m['method']:<22} accuracy {m['eval']['fidelity']:.3f}  "
                  f"LLM FLOPs {m['ratio_llm']:.3f}")
        elif m.get("unreachable"):
            print(f"  held-out {m['method']:<22} cannot reach the target")
    return 0


def add_parser(sub) -> None:
    o = sub.add_parser("optimize", help="search the best plan under a FLOPs target; write "
                       "plan, report (and the ONNX package)")
    o.add_argument("model")
    o.add_argument("--target-flops", type=float_flag("--target-flops"), required=True,
                   help="prefill FLOPs of the result <= this fraction of the original's")
    o.add_argument("--target-size", type=_size_flag("--target-size"),
                   help="also keep weight bytes <= this: a ratio of the original's (0.5) or "
                   "a size (4MB); the joint search then chooses Q/K rank (CASP) and weight "
                   "bits too")
    o.add_argument("--flops-scope", choices=("llm", "total"), default="llm",
                   help="llm (default): decoder prefill, the papers' convention; total: with "
                   "the vision tower and projector, which token passes cannot reduce")
    o.add_argument("--calib", help="calibration JSONL (default for builtin:synth-llava: "
                   "builtin:synthvqa-calib)")
    o.add_argument("--eval", help="held-out JSONL for the report (default for "
                   "builtin:synth-llava: builtin:synthvqa-test)")
    o.add_argument("--out", required=True)
    o.add_argument("--strategy", choices=("joint", "gsearch", "psigmoid"), default="joint")
    o.add_argument("--trials", type=positive("--trials"), default=40,
                   help="optuna trials (joint, psigmoid); a resumed run counts earlier ones")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--storage", help="optuna storage URL (default: sqlite in OUT); e.g. "
                   "postgresql://user@host/db to share one study between workers")
    o.add_argument("--study", help="study name (default: derived from the settings)")
    o.add_argument("--objective", choices=("auto", "accuracy", "agreement"), default="auto",
                   help="auto: accuracy when every calibration record has an answer")
    o.add_argument("--tolerance", type=float_flag("--tolerance"),
                   default=0.01,
                   help="gsearch: fidelity drop allowed at each layer (default 0.01)")
    o.add_argument("--calib-limit", type=positive("--calib-limit"))
    o.add_argument("--search-samples", type=positive("--search-samples"), default=256,
                   help="measure each trial on the first N calibration samples (default 256) "
                        "and re-rank the --finalists best on all of them")
    o.add_argument("--finalists", type=positive("--finalists"), default=8,
                   help="plans re-measured on the whole calibration set (default 8)")
    o.add_argument("--eval-limit", type=positive("--eval-limit"))
    o.add_argument("--no-emit", action="store_true", help="skip the ONNX package")
    o.add_argument("--no-fuse", action="store_true", help="keep the exported graphs unfused "
                   "(default: fused ONNX Runtime contrib ops, vlmopt.emit_fuse)")
    o.add_argument("--json", action="store_true")
    o.set_defaults(fn=cmd_optimize)
