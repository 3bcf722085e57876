"""``vlmopt compare``: the method table on one model and one dataset.

    vlmopt compare MODEL [--data D] [--calib C] [--limit N]          # each method's own budgets
    vlmopt compare MODEL --targets 0.3 0.15 0.1 [--scope llm] [--ort-latency]

With ``--targets`` every method is fitted to each FLOPs target (vlmopt.compare_targets): one
table per target, a row per method with its budgets, accuracy, agreement, KL, FLOPs, PyTorch
(and with ``--ort-latency`` ONNX Runtime) prefill latency ratio and the published figure; a
method that cannot reach the target says so.
"""

from __future__ import annotations

import json

from vlmopt.cli_args import positive, progress
from vlmopt.data.defaults import builtin_default, default_data
from vlmopt.errors import VlmoptError


def _target(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        raise VlmoptError(f"--targets: {text!r} is not a number") from None
    if not 0 < t <= 1:
        raise VlmoptError(f"--targets: each target must lie in (0, 1], got {text}")
    return t


def add_parser(sub) -> None:
    c = sub.add_parser("compare", help="method table: accuracy, agreement, FLOPs and latency")
    c.add_argument("model")
    c.add_argument("--data", help="evaluation JSONL (default for builtin:synth-llava: "
                   "builtin:synthvqa-test)")
    c.add_argument("--calib", help="calibration JSONL for ShortV's Layer Contribution")
    c.add_argument("--limit", type=positive("--limit"))
    c.add_argument("--batch-size", type=positive("--batch-size"), default=16)
    c.add_argument("--targets", nargs="+", metavar="RATIO",
                   help="fit every method to these FLOPs ratios (e.g. 0.3 0.15 0.1): one "
                   "table per target")
    c.add_argument("--scope", choices=("llm", "total"), default="llm",
                   help="what --targets is a ratio of (default: the LLM prefill)")
    c.add_argument("--ort-latency", action="store_true",
                   help="with --targets: also time each plan's exported prefill graph on "
                   "ONNX Runtime (exports every plan: slow)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_compare)


def cmd_compare(args) -> int:
    from vlmopt.analysis import layer_contribution, rank_layers
    from vlmopt.compare import compare, default_methods
    from vlmopt.data.dataset import load_records
    from vlmopt.frontend.load import load, resolve_model

    targets = sorted({_target(t) for t in args.targets}, reverse=True) if args.targets else None
    if args.ort_latency and not targets:
        raise VlmoptError("--ort-latency: give --targets too (the plain table times PyTorch)")
    resolve_model(args.model)
    data = default_data(args.model, args.data)
    records = load_records(data, limit=args.limit)
    calib = builtin_default(args.model, args.calib, "calib")
    calib_records = load_records(calib, limit=64) if calib else None
    lm = load(args.model)
    info = lm.config
    order = None
    if calib_records:
        order = rank_layers(layer_contribution(lm, calib_records))
    methods = default_methods(lm.adapter.fixed_n_visual(), info.text_config.num_hidden_layers,
                              order, has_cls=lm.adapter.has_cls,
                              refused=lm.adapter.refused_select,
                              vit_layers=getattr(getattr(info, "vision_config", None),
                                                 "num_hidden_layers", None))
    if targets:
        return _targets(args, lm, records, methods, targets, data)
    advance, close = progress(len(records), "comparing")
    try:
        rows = compare(lm, records, methods, batch_size=args.batch_size, progress=advance)
    finally:
        close()
    if args.json:
        print(json.dumps({"model": args.model, "data": data, "n": len(records),
                          "methods": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.model} on {data} ({len(records)} questions)")
    for c in ("method", "accuracy", "agreement", "KL", "LLM FLOPs", "total FLOPs",
              "latency ratio"):
        t.add_column(c, justify="left" if c == "method" else "right")
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        t.add_row(r["method"], acc, f"{r['agreement']:.3f}", f"{r['kl']:.4f}",
                  f"{r['ratio_llm']:.3f}", f"{r['ratio_total']:.3f}", f"{r['latency_ratio']:.3f}")
    Console().print(t)
    print(f"FLOPs: prefill ratios to the original (LLM: all but the vision tower and projector) at "
          f"{rows[0]['prompt_tokens']} text tokens, the prompts' mean")
    return 0


def _targets(args, lm, records, methods, targets, data) -> int:
    from vlmopt import compare_targets

    advance, close = progress(len(records) * len(targets), "comparing at each target")
    try:
        tables = compare_targets.run(lm, records, methods, targets, scope=args.scope,
                                     batch_size=args.batch_size, ort=args.ort_latency,
                                     progress=advance)
    finally:
        close()
    if args.json:
        print(json.dumps({"model": args.model, "data": data, "n": len(records),
                          "scope": args.scope,
                          "targets": [{"target": t, "methods": rows}
                                      for t, rows in tables.items()]}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    for target, rows in tables.items():
        t = Table(title=f"{args.model} at {target} x the original's {args.scope} prefill FLOPs, "
                  f"on {data} ({len(records)} questions)")
        cols = ["method", "budgets", "accuracy", "agreement", "KL", "LLM FLOPs",
                "total FLOPs", "latency (torch)"] + (["latency (ORT)"] if args.ort_latency
                                                      else []) + ["published"]
        for c in cols:
            t.add_column(c, justify="left" if c in ("method", "budgets") else "right")
        notes: dict[str, int] = {}
        for r in rows:
            note = ""
            if r.get("published"):
                note = f"[{notes.setdefault(r['published'], len(notes) + 1)}]"
            if r.get("unreachable"):
                low = r[f"lowest_ratio_{args.scope}"]
                why = "cannot be built" if low == float("inf") else f"lowest {low:.3f}"
                t.add_row(r["method"], f"cannot reach it ({why})", *["-"] * (len(cols) - 3),
                          note)
                continue
            acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
            ort = ([f"{r['ort_latency_ratio']:.3f}" if "ort_latency_ratio" in r else "-"]
                   if args.ort_latency else [])
            t.add_row(r["method"], r.get("budgets", "-"), acc, f"{r['agreement']:.3f}",
                      f"{r['kl']:.4f}", f"{r['ratio_llm']:.3f}", f"{r['ratio_total']:.3f}",
                      f"{r['latency_ratio']:.3f}", *ort, note)
        con.print(t)
        for text, i in notes.items():
            print(f"  [{i}] {text}")
    print("latency: prefill ratio to the original, median of interleaved rounds; published: the "
          "paper's own model and figure (vlmopt/published.py), not measured here")
    return 0
