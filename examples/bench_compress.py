"""Weight compression on the built-in model: CASP low-rank Q/K, int8, int4, mixed precision.

    python examples/bench_compress.py [MODEL] [--limit N] [--json]

Rows: the original; W_q/W_k at 25% of their parameters (CASP's setting; whitened SVD with the
default modality-balanced statistics, the published all-token statistics, and the plain SVD for
comparison); int8 and int4 weights everywhere (decoder, projector, LM head); and a
CASP-style mixed allocation (Q/K at 25%, then bits per layer from each layer's measured int4
sensitivity under a byte budget, Q/K factors favoured). Each row: held-out accuracy, agreement
with the original, weight bytes and prefill FLOPs relative to the original, and (unless
--no-latency) ONNX Runtime prefill and decode latency: every row is exported with ``emit``
(quantized layers lowered to MatMulNBits, parity checked) and the artifacts are timed side by
side in interleaved rounds (``vlmopt.bench.measure``; medians of --repeats).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from vlmopt.passes import lowrank_qk, quantize

import vlmopt
from vlmopt import inputs
from vlmopt.analysis import quantization_sensitivity
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
    ap.add_argument("--no-latency", action="store_true", help="skip the ONNX Runtime timing")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=16, help="text tokens per prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", type=Path, help="also write the JSON results here")
    ap.add_argument("--markdown", type=Path, help="also write the table as a Markdown report")
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
    qk_token = ("lowrank_qk", lowrank_qk.casp(args.qk_ratio, weighting="token", **calib))
    qk_plain = ("lowrank_qk", lowrank_qk.casp(args.qk_ratio, whiten=False))
    configs = {
        "original": [],
        f"Q/K {args.qk_ratio:.0%} params (whitened SVD)": [qk],
        f"Q/K {args.qk_ratio:.0%} (whitened, all-token G)": [qk_token],
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
    configs[f"mixed: Q/K {args.qk_ratio:.0%}, int4/int8 allocation"] = [qk, ("quantize", mixed)]
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
    if not args.no_latency:
        lat = latency(lm, configs, args)
        for r in rows:
            r.update(lat[r["config"]])
    base = rows[0]["accuracy"]
    res = {"model": args.model, "data": args.data, "n": len(records), "sensitivity": sens,
           "mixed_bits": mixed.bits, "setup_seconds": round(setup_s, 1), "rows": rows}
    if not args.no_latency:
        res["latency"] = {"runtime": "onnxruntime CPU", "threads": args.threads,
                          "repeats": args.repeats, "decode_tokens": args.decode_tokens,
                          "prompt_tokens": args.prompt_tokens, "batch": 1,
                          "intra_op_spinning": False}
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(res, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(res, args))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{args.model} on {args.data} ({len(records)} questions); int4 sensitivity "
          + ", ".join(f"{k}={v:.2g}" for k, v in sens.items()))
    print(f"{'config':<40} {'acc':>6} {'delta':>6} {'agree':>6} {'KL':>8} {'weights':>10} "
          f"{'w ratio':>7} {'FLOPs':>6} {'prefill':>9} {'decode':>10}")
    for r in rows:
        acc = r["accuracy"] if r["accuracy"] is not None else float("nan")
        delta = 100 * (acc - base) if base is not None else float("nan")
        pre = f"{r['prefill_ms']:7.2f}ms" if "prefill_ms" in r else f"{'-':>9}"
        dec = f"{r['decode_ms_per_token']:6.3f}ms/t" if "prefill_ms" in r else f"{'-':>10}"
        print(f"{r['config']:<40} {100 * acc:6.1f} {delta:+6.1f} {100 * r['agreement']:6.1f} "
              f"{r['kl']:8.4f} {r['weight_bytes'] / 2**20:8.2f}Mi {r['weight_ratio']:7.3f} "
              f"{r['flops_ratio']:6.3f} {pre} {dec}")
    if not args.no_latency:
        print(f"latency: ONNX Runtime CPU, {args.threads} threads, batch 1, "
              f"{args.prompt_tokens} text tokens, median of {args.repeats} interleaved rounds")
    return 0


def markdown(res: dict, args) -> str:
    """The weight-compression report: one row per config, as printed."""
    base = res["rows"][0]["accuracy"]
    lines = [f"# Weight compression: {res['model']}", "",
             f"Held-out {res['data']} ({res['n']} questions); whitening statistics from "
             f"{args.calib_samples} samples of {args.calib}; group size {args.group_size}. "
             "Command: `python examples/bench_compress.py "
             + " ".join(__import__("shlex").quote(a) for a in sys.argv[1:]) + "`.", ""]
    lat = "latency" in res
    head = "| config | accuracy | delta (points) | agreement | KL | weight MiB | weight ratio |"
    lines += [head + (" prefill ms | decode ms/token |" if lat else ""),
              "|" + " --- |" * (7 + 2 * lat)]
    for r in res["rows"]:
        acc = r["accuracy"] if r["accuracy"] is not None else float("nan")
        row = (f"| {r['config']} | {100 * acc:.1f} | {100 * (acc - base):+.1f} | "
               f"{100 * r['agreement']:.1f} | {r['kl']:.4f} | {r['weight_bytes'] / 2**20:.2f} | "
               f"{r['weight_ratio']:.3f} |")
        if lat:
            row += f" {r['prefill_ms']:.2f} | {r['decode_ms_per_token']:.3f} |"
        lines.append(row)
    if lat:
        L = res["latency"]
        lines += ["", f"Latency: {L['runtime']}, {L['threads']} threads, batch {L['batch']}, "
                  f"{L['prompt_tokens']} text tokens, {L['decode_tokens']} decode tokens, median "
                  f"of {L['repeats']} interleaved rounds, intra-op spinning off (idle sessions "
                  "would otherwise busy-wait on the cores being timed); every config exported "
                  "with `emit` (quantized layers as MatMulNBits) and parity-checked first."]
    lines += ["", "Mixed bits per layer: " + ", ".join(f"{k}={v}" for k, v in
                                                    res["mixed_bits"].items())]
    return "\n".join(lines) + "\n"


def latency(lm, configs: dict, args) -> dict:
    """Export every config (emit: quantized layers become MatMulNBits, parity is checked) and
    time the artifacts side by side: {config: {prefill_ms, decode_ms_per_token, ...}}."""
    import torch

    from vlmopt.bench import OrtVariant, measure
    from vlmopt.emit import emit, synthetic_batch
    from vlmopt.runtime import Artifact

    torch.set_num_threads(args.threads)
    variants, emitted = {}, {}
    with tempfile.TemporaryDirectory(prefix="vlmopt-compress-") as tmp:
        for i, (name, steps) in enumerate(configs.items()):
            gm = vlmopt.apply_plan(lm, plan(lm, steps))
            if i == 0:
                tb = synthetic_batch(gm, int(lm.config.text_config.vocab_size), n=1,
                                     n_text=args.prompt_tokens, ragged=False)
                batch = {"torch": tb, "numpy": {k: v.numpy() for k, v in tb.items()}}
            d = Path(tmp) / f"v{i}"
            d.mkdir()
            t0 = time.perf_counter()
            manifest = emit(lm, gm, d, [], parity_samples=2)
            emitted[name] = {"parity_max_abs_logit_diff":
                             manifest["parity"]["max_abs_logit_diff"],
                             "emit_seconds": round(time.perf_counter() - t0, 1)}
            print(f"exported {name} ({emitted[name]['emit_seconds']} s)", file=sys.stderr)
            variants[name] = OrtVariant(Artifact(d, threads=args.threads, spinning=False))
        lat = measure(variants, batch, args.repeats, args.decode_tokens)
    return {k: {**emitted[k], **v} for k, v in lat.items()}


if __name__ == "__main__":
    sys.exit(main())
