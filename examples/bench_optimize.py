"""Quality and time of ``vlmopt optimize`` on the built-in model (issue targets: at 0.3 of the
FLOPs, held-out accuracy >= 98% of the original's; at 0.15, >= 92%; above every baseline at the
same FLOPs; the default run <= 3 minutes on 2 CPU cores).

    python examples/bench_optimize.py [--targets 0.3 0.15] [--scope llm] [--trials 40]
                                      [--strategy joint] [--json] [--save FILE]

Each target is one full ``vlmopt optimize`` run (search, baselines, held-out evaluation on
``builtin:synthvqa-test``, ONNX export with its parity check, report) in a fresh temporary
directory, exactly what the default command does; its wall time is measured around the whole
run (--no-emit leaves the export out). Prints one table per target and the pass/fail of each target.

Memory: each run is a fresh child process (``python bench_optimize.py --child ...``: the same
interpreter, imports and optimize call as ``vlmopt optimize``), and its peak resident set size is
that child's own ``ru_maxrss`` as ``os.wait4`` reports it when it exits - one figure per run,
never the maximum over earlier runs - against the goal of a peak under 4 GB (4e9 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOALS = {0.3: 0.98, 0.15: 0.92}
RSS_GOAL_BYTES = 4 * 10**9  # peak resident memory of one optimize run
RSS_SOURCE = "child process ru_maxrss (os.wait4)"


def _child(spec: dict, out: Path) -> int:
    """One optimize run (in this fresh process); writes what the table needs to ``out``."""
    from vlmopt.errors import VlmoptError
    from vlmopt.optimize import Options, optimize

    target = spec["target"]
    with tempfile.TemporaryDirectory() as d:
        opts = Options(model=spec["model"], target=target, out=Path(d) / "out",
                       scope=spec["scope"], strategy=spec["strategy"], trials=spec["trials"],
                       eval_limit=spec["eval_limit"], emit=spec["emit"])
        t0 = time.perf_counter()
        try:
            r = optimize(opts, stage=lambda m: print(f"  [{target}] {m}", file=sys.stderr))
        except VlmoptError as e:
            print(f"vlmopt: error: {e}", file=sys.stderr)
            return 2
        wall = time.perf_counter() - t0
        parity = json.loads((opts.out / "manifest.json").read_text())["parity"] \
            if spec["emit"] else None
    keep = ("methods", "n_eval", "n_calib", "n_search", "latency_ratio", "plan",
            "stage_seconds")
    out.write_text(json.dumps({"r": {k: r.get(k) for k in keep}, "wall": wall,
                               "parity": parity}, default=str))
    return 0


def run_child(spec: dict) -> tuple[int, dict | None, int]:
    """(exit code, the child's results, its peak RSS in bytes)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child",
                                 json.dumps(spec), str(out)],
                                stdout=sys.stderr)  # the exporter's chatter: not --json's stdout
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        # ru_maxrss: KiB on Linux, bytes on macOS
        peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        data = json.loads(out.read_text()) if proc.returncode == 0 and out.exists() else None
        return proc.returncode, data, peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:synth-llava")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.15])
    ap.add_argument("--scope", choices=("llm", "total"), default="llm")
    ap.add_argument("--strategy", default="joint")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--eval-limit", type=int)
    ap.add_argument("--no-emit", action="store_true", help="skip the ONNX export")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", type=Path, help="also write the results as JSON here")
    ap.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(json.loads(args.child[0]), Path(args.child[1]))

    results, failed = [], 0
    for target in args.targets:
        spec = {"model": args.model, "target": target, "scope": args.scope,
                "strategy": args.strategy, "trials": args.trials,
                "eval_limit": args.eval_limit, "emit": not args.no_emit}
        rc, data, peak = run_child(spec)
        if data is None:  # recorded, and the other targets still run (exit code: non-zero)
            failed = rc or 1
            results.append({"target": target, "scope": args.scope, "failed": True,
                            "exit_code": failed})
            print(f"\ntarget {target}: optimize failed (exit {failed}; its error is above)")
            continue
        r, wall, parity = data["r"], data["wall"], data["parity"]
        rows = [m for m in r["methods"] if m.get("eval")]
        orig = next(m for m in rows if m["method"] == "original")["eval"]["accuracy"]
        ours = next(m for m in rows if m["method"].startswith("vlmopt"))
        base = [m for m in rows if m["method"] not in ("original", ours["method"])]
        best_base = max((m["eval"]["accuracy"] for m in base), default=float("nan"))
        res = {"target": target, "scope": args.scope, "wall_seconds": wall,
               "original_accuracy": orig, "accuracy": ours["eval"]["accuracy"],
               "relative": ours["eval"]["accuracy"] / orig if orig else float("nan"),
               "ratio_llm": ours["ratio_llm"], "ratio_total": ours["ratio_total"],
               "latency_ratio": r["latency_ratio"], "best_baseline_accuracy": best_base,
               "beats_every_baseline": all(ours["eval"]["accuracy"] > m["eval"]["accuracy"]
                                           for m in base),
               "margin_answers": round((ours["eval"]["accuracy"] - best_base) * r["n_eval"]),
               "n_eval": r["n_eval"], "n_calib": r["n_calib"], "n_search": r.get("n_search"),
               "methods": [{"method": m["method"], "accuracy": m["eval"]["accuracy"],
                            "correct": round(m["eval"]["accuracy"] * r["n_eval"]),
                            "agreement": m["eval"]["agreement"], "kl": m["eval"]["kl"],
                            "calib_fidelity": m["calib"]["fidelity"], "calib_kl": m["calib"]["kl"],
                            "ratio_llm": m["ratio_llm"], "ratio_total": m["ratio_total"]}
                           for m in rows],
               "unreachable": [m["method"] for m in r["methods"] if m.get("unreachable")],
               "plan": r["plan"]["passes"], "emitted": not args.no_emit,
               "parity": parity,
               "peak_rss_bytes": peak, "peak_rss_gb": round(peak / 1e9, 3),
               "peak_rss_source": RSS_SOURCE, "rss_goal_bytes": RSS_GOAL_BYTES,
               "rss_goal_met": peak < RSS_GOAL_BYTES,
               "stage_seconds": r.get("stage_seconds") or {}}
        results.append(res)
        if not args.json:
            print(f"\ntarget {target} ({args.scope} FLOPs), {r['n_eval']} held-out questions, "
                  f"optimize wall time {wall:.0f} s, peak RSS {peak / 1e9:.2f} GB "
                  f"({RSS_SOURCE})")
            w = max([34, *(len(m["method"]) for m in res["methods"])])
            print(f"  {'method':<{w}} {'accuracy':>9} {'correct':>8} {'agree':>6} {'KL':>7} "
                  f"{'LLM FLOPs':>10} {'total FLOPs':>12}")
            for m in res["methods"]:
                print(f"  {m['method']:<{w}} {m['accuracy']:>9.4f} {m['correct']:>8d} "
                      f"{m['agreement']:>6.3f} {m['kl']:>7.4f} {m['ratio_llm']:>10.3f} "
                      f"{m['ratio_total']:>12.3f}")
            for name in res["unreachable"]:
                print(f"  {name:<{w}} cannot reach this target")
            print("  seconds per step: " + ", ".join(
                f"{k} {v:.1f}" for k, v in res["stage_seconds"].items()))
            goal = GOALS.get(target)
            print(f"  accuracy / original = {res['relative']:.3f}"
                  + (f" (goal >= {goal}: {'met' if res['relative'] >= goal else 'NOT met'})"
                     if goal else "")
                  + f"; beats every baseline: {res['beats_every_baseline']} (by "
                  f"{res['margin_answers']:+d} of {res['n_eval']} answers)"
                  + f"; measured prefill latency ratio {res['latency_ratio']:.3f}")
            print(f"  peak RSS {peak / 1e9:.2f} GB (goal < {RSS_GOAL_BYTES / 1e9:.0f} GB: "
                  f"{'met' if res['rss_goal_met'] else 'NOT met'})")
    if args.json:
        print(json.dumps(results, indent=2))
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(results, indent=2) + "\n")
    return failed


if __name__ == "__main__":
    sys.exit(main())
