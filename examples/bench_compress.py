"""Weight compression on the built-in model: CASP low-rank Q/K, int8, int4, mixed precision.

    python examples/bench_compress.py [MODEL] [--limit N] [--json]

Rows: the original; W_q/W_k at 25% of their parameters (CASP's setting; whitened SVD, and the
plain SVD for comparison); int8 and int4 weights everywhere (decoder, projector, LM head); and a
CASP-style mixed allocation (Q/K at 25%, then bits per layer from each layer's measured int4
sensitivity under a byte budget, Q/K factors favoured). Each row: held-out accuracy, agreement
with the original, weight bytes and prefill FLOPs relative to the original.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from vlmopt.passes import lowrank_qk, quantize

import vlmopt
from vlmopt import inputs
from vlmopt.calib_stats import quantization_sensitivity
from vlmopt.data.dataset import load_records
from vlmopt.errors import VlmoptError


def plan(lm, steps) -> dict:
    import dataclasses

    return {"schema": "vlmopt.plan/1", "model": {"name": lm.name, "fingerprint": lm.fingerprint},
            "passes": [{"name": n, "config": dataclasses.asdict(c)} for n, c in steps]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="builtin:synth-llava")
    ap.add_argument("--data", default="builtin:synthvqa-test")
    ap.add_argument("--calib", default="builtin:synthvqa-calib")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="first N test questions")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--qk-ratio", type=float, default=0.25)
    ap.add_argument("--mixed-frac", type=float, default=0.25,
                    help="mixed budget: int4 bytes + this fraction of (int8 - int4) bytes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        lm = vlmopt.load(args.model)
        records = load_records(args.data, limit=args.limit)
    except VlmoptError as e:
        print(f"bench_compress: {e}", file=sys.stderr)
        return 2
    g = args.group_size
    calib = {"calib": args.calib, "calib_samples": args.calib_samples}
    qk = ("lowrank_qk", lowrank_qk.casp(args.qk_ratio, **calib))
    qk_plain = ("lowrank_qk", lowrank_qk.casp(args.qk_ratio, whiten=False))
    configs = {
        "original": [],
        f"Q/K {args.qk_ratio:.0%} params (whitened SVD)": [qk],
        f"Q/K {args.qk_ratio:.0%} params (plain SVD)": [qk_plain],
        f"int8 everywhere (g={g})": [("quantize", quantize.uniform(8, g, True, True))],
        f"int4 everywhere (g={g})": [("quantize", quantize.uniform(4, g, True, True))],
    }
    # mixed (CASP-style): Q/K low rank, then bits from measured sensitivity under a budget
    t0 = time.perf_counter()
    lowrank = vlmopt.apply_plan(lm, plan(lm, [qk]))
    few = load_records(args.calib, limit=16)
    batch = inputs.encode(lm.processor, [r.prompt for r in few], [r.load_image() for r in few])
    sens = quantization_sensitivity(lowrank, batch, bits=4, group_size=g)
    lo = quantize.config_bytes(lowrank, quantize.uniform(4, g))
    hi = quantize.config_bytes(lowrank, quantize.uniform(8, g))
    mixed = quantize.allocate_bits(lowrank, sens, int(lo + args.mixed_frac * (hi - lo)),
                                   group_size=g)
    mixed = quantize.Config(bits={**mixed.bits, "head": 8, "project": 8}, group_size=g)
    configs[f"mixed: Q/K {args.qk_ratio:.0%} + int4/int8 allocation"] = [qk, ("quantize", mixed)]
    setup_s = time.perf_counter() - t0

    rows = []
    for name, steps in configs.items():
        t0 = time.perf_counter()
        gm = vlmopt.apply_plan(lm, plan(lm, steps))
        res = vlmopt.evaluate(lm, records, graph=gm, batch_size=args.batch_size)
        f = vlmopt.flops(lm, gm)
        rows.append({"config": name, "accuracy": res.accuracy, "agreement": res.agreement,
                     "kl": res.kl, "weight_bytes": f["weight_bytes_total"],
                     "weight_ratio": f["weight_bytes_total"] / f["original_weight_bytes_total"],
                     "flops_ratio": f["ratio"], "seconds": round(time.perf_counter() - t0, 1),
                     "plan": plan(lm, steps)})
    base = rows[0]["accuracy"]
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data, "n": len(records),
                          "sensitivity": sens, "mixed_bits": mixed.bits,
                          "setup_seconds": round(setup_s, 1), "rows": rows}, indent=2))
        return 0
    print(f"{args.model} on {args.data} ({len(records)} questions); int4 sensitivity "
          + ", ".join(f"{k}={v:.2g}" for k, v in sens.items()))
    print(f"{'config':<40} {'acc':>6} {'delta':>6} {'agree':>6} {'KL':>8} {'weights':>10} "
          f"{'w ratio':>7} {'FLOPs':>6}")
    for r in rows:
        acc = r["accuracy"] if r["accuracy"] is not None else float("nan")
        delta = 100 * (acc - base) if base is not None else float("nan")
        print(f"{r['config']:<40} {100 * acc:6.1f} {delta:+6.1f} {100 * r['agreement']:6.1f} "
              f"{r['kl']:8.4f} {r['weight_bytes'] / 2**20:8.2f}Mi {r['weight_ratio']:7.3f} "
              f"{r['flops_ratio']:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
