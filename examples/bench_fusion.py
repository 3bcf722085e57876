"""Fusion benchmark: the exported graphs before and after vlmopt.emit_fuse, side by side.

    python examples/bench_fusion.py                       # llava-medium, original and 0.3 plan
    python examples/bench_fusion.py --model builtin:synth-llava --target-flops 0.5 --drop-layer 1

For each plan (the original model and `vlmopt bench`'s FastV drop at --target-flops), the model
is exported once unfused; a copy is fused and checked against PyTorch with emit's own parity
check (check_parity: logits within 1e-4, identical greedy tokens); then both packages are timed
on ONNX Runtime CPU in interleaved rounds (vlmopt.bench.measure: prefill, then decode per token,
every variant once per round, medians). Writes examples/results/fusion_<model>.json and .md:
op type counts of prefill/decode before and after, the fusion counts, parity and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_plan(lm, gm, work: Path, tag: str, args) -> dict:
    import torch

    from vlmopt import bench
    from vlmopt.emit import calib_batch, check_parity, emit, synthetic_batch, write_checksums
    from vlmopt.emit_fuse import fuse_artifact_graphs, op_counts
    from vlmopt.runtime import Artifact

    plain, fused = work / f"{tag}-unfused", work / f"{tag}-fused"
    plain.mkdir()
    t0 = time.perf_counter()
    emit(lm, gm, plain, [], parity_samples=2, fuse=False)
    t_export = time.perf_counter() - t0
    shutil.copytree(plain, fused)
    t0 = time.perf_counter()
    record = fuse_artifact_graphs(fused / "onnx")
    t_fuse = time.perf_counter() - t0
    m = json.loads((fused / "manifest.json").read_text())
    m["fusion"] = record
    write_checksums(fused, m)
    batch, names = calib_batch(lm, gm, [], 2)
    parity = check_parity(Artifact(fused, verify=False), gm, batch, names)
    ops = {g: {"before": op_counts(plain / f"onnx/{g}.onnx"),
               "after": op_counts(fused / f"onnx/{g}.onnx")} for g in ("prefill", "decode")}
    tb = synthetic_batch(gm, int(lm.config.text_config.vocab_size), n=1,
                         n_text=args.prompt_tokens, ragged=False)
    feeds = {"torch": tb, "numpy": {k: v.numpy() for k, v in tb.items()}}
    torch.set_num_threads(args.threads)
    variants = {f"{tag}/unfused": bench.OrtVariant(Artifact(plain, threads=args.threads,
                                                            spinning=False)),
                f"{tag}/fused": bench.OrtVariant(Artifact(fused, threads=args.threads,
                                                          spinning=False))}
    lat = bench.measure(variants, feeds, args.repeats, args.decode_tokens)
    u, f = lat[f"{tag}/unfused"], lat[f"{tag}/fused"]
    return {"export_s": round(t_export, 1), "fuse_s": round(t_fuse, 1), "ops": ops,
            "fusion": record, "parity": parity, "latency": lat,
            "fused_speedup": {"prefill": u["prefill_ms"] / f["prefill_ms"],
                              "decode": u["decode_ms_per_token"] / f["decode_ms_per_token"]}}


def paired(lat: dict, tag: str) -> dict:
    """Median over rounds of unfused/fused time within the same round (load shifts cancel)."""
    import statistics

    u, f = lat[f"{tag}/unfused"], lat[f"{tag}/fused"]
    return {k: statistics.median(a / b for a, b in zip(u[f"{k}_runs_ms"], f[f"{k}_runs_ms"]))
            for k in ("prefill", "decode")}


def markdown(res: dict) -> str:
    out = [f"# Fusion: {res['model']}", "",
           f"ONNX Runtime {res['onnxruntime']} CPU, {res['threads']} threads, "
           f"{res['prompt_tokens']} text tokens, batch 1, median of {res['repeats']} "
           f"interleaved rounds (decode: {res['decode_tokens']} tokens). Load: {res['load']}.",
           "", "`python examples/bench_fusion.py " + " ".join(res["argv"]) + "`", ""]
    for tag, r in res["plans"].items():
        sp, par = r["fused_speedup"], r["parity"]
        lat, pr = r["latency"], paired(r["latency"], tag)
        out += [f"## {tag}", "",
                f"parity after fusion: max abs logit diff {par['max_abs_logit_diff']:.3g} "
                f"(atol {par['atol']:g}), {par['samples']} samples x {par['tokens']} tokens",
                "", "| graph | unfused ms | fused ms | speed-up (medians) | speed-up (paired) |",
                "| --- | --- | --- | --- | --- |",
                f"| prefill | {lat[tag + '/unfused']['prefill_ms']:.1f} | "
                f"{lat[tag + '/fused']['prefill_ms']:.1f} | {sp['prefill']:.2f}x | "
                f"{pr['prefill']:.2f}x |",
                f"| decode / token | {lat[tag + '/unfused']['decode_ms_per_token']:.2f} | "
                f"{lat[tag + '/fused']['decode_ms_per_token']:.2f} | {sp['decode']:.2f}x | "
                f"{pr['decode']:.2f}x |", "",
                "speed-up (medians): ratio of the two medians; (paired): median over rounds of "
                "the ratio within a round.", ""]
        for g in ("prefill", "decode"):
            b, a = r["ops"][g]["before"], r["ops"][g]["after"]
            out += [f"{g}: {sum(b.values())} -> {sum(a.values())} nodes; fusions "
                    f"{r['fusion']['graphs'][g]['fusions']}", "",
                    "| op | before | after |", "| --- | --- | --- |"]
            out += [f"| {k} | {b.get(k, 0)} | {a.get(k, 0)} |"
                    for k in sorted(set(b) | set(a), key=lambda k: (-a.get(k, 0), k))]
            out.append("")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(HERE / "configs" / "llava-medium"))
    ap.add_argument("--target-flops", type=float, default=0.3)
    ap.add_argument("--drop-layer", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--markdown", help="only rewrite the .md of this results JSON")
    args = ap.parse_args()
    if args.markdown:
        res = json.loads(Path(args.markdown).read_text())
        Path(args.markdown).with_suffix(".md").write_text(markdown(res))
        return 0
    import onnxruntime

    from vlmopt.api import apply_plan
    from vlmopt.bench import drop_plan
    from vlmopt.frontend.load import load
    from vlmopt.ir.capture import capture

    lm = load(args.model)
    plan = drop_plan(lm, args.target_flops, args.drop_layer, args.prompt_tokens)
    load1 = os.getloadavg()[0]
    res = {"model": args.model if ":" in args.model else Path(args.model).name,
           "argv": [a for a in os.sys.argv[1:]], "onnxruntime": onnxruntime.__version__,
           "threads": args.threads, "prompt_tokens": args.prompt_tokens,
           "repeats": args.repeats, "decode_tokens": args.decode_tokens, "plan": plan,
           "plans": {}}
    with tempfile.TemporaryDirectory(prefix="vlmopt-fusion-") as tmp:
        for tag, gm in (("original", capture(lm)), ("pruned", apply_plan(lm, plan))):
            res["plans"][tag] = run_plan(lm, gm, Path(tmp), tag, args)
            r = res["plans"][tag]
            pr = paired(r["latency"], tag)
            print(f"{tag}: fused/unfused speed-up prefill {r['fused_speedup']['prefill']:.3f}x "
                  f"(paired {pr['prefill']:.3f}x), decode {r['fused_speedup']['decode']:.3f}x "
                  f"(paired {pr['decode']:.3f}x); parity "
                  f"{r['parity']['max_abs_logit_diff']:.3g}", flush=True)
            for g in ("prefill", "decode"):
                print(f"  {g}: {r['fusion']['fused_ops'][g]}", flush=True)
            shutil.rmtree(Path(tmp) / f"{tag}-unfused")
            shutil.rmtree(Path(tmp) / f"{tag}-fused")
    res["load"] = (f"1-min load average {load1:.1f} at start, {os.getloadavg()[0]:.1f} at end "
                   f"on {os.cpu_count()} CPUs (shared machine)")
    out = Path(args.out)
    name = res["model"].replace("builtin:", "")
    (out / f"fusion_{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"fusion_{name}.md").write_text(markdown(res))
    print(f"wrote {out / f'fusion_{name}.json'} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
