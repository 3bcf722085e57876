"""vlmopt bench: measured latency of the original vs the optimized model, side by side.

Prefill (time to first token, KV cache included) and decode (per token, greedy) on PyTorch eager
(the export forms of the block graphs: the same computation the ONNX graphs hold) and on ONNX
Runtime (the emitted packages, optionally with an int8/int4 decode graph). Every variant runs once
per round, rounds are repeated and each figure is the median, so background load hits all
variants alike. The analytic FLOPs ratio is printed beside the measured ratio.

NOTE: this module's top level imports no torch: `vlmopt run` builds the same argument parser.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from vlmopt.data.defaults import builtin_default
from vlmopt.errors import VlmoptError

log = logging.getLogger(__name__)


def _quantize_list(v: str) -> list[str]:
    modes = [q.strip() for q in v.split(",") if q.strip()]
    bad = [q for q in modes if q not in ("int8", "int4")]
    if bad:
        raise argparse.ArgumentTypeError(f"--quantize has an unknown mode {bad[0]!r}; give a "
                                         "comma list of int8, int4 ('' for none)")
    return modes


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from vlmopt.cli_args import nonneg, positive, ratio

    p.add_argument("model", help="checkpoint, config-only directory (random weights) or "
                   "builtin:synth-llava")
    p.add_argument("--plan", help="plan.json of the optimized model (default: a drop_tokens "
                   "plan at --target-flops)")
    p.add_argument("--target-flops", type=ratio("--target-flops"), default=0.3,
                   help="prefill FLOPs ratio of the default plan (default 0.3)")
    p.add_argument("--drop-layer", type=nonneg("--drop-layer"), default=2,
                   help="layer of the default plan's drop (FastV K, default 2)")
    p.add_argument("--prompt-tokens", type=positive("--prompt-tokens"), default=32,
                   help="text tokens per prompt")
    p.add_argument("--batch-size", type=positive("--batch-size"), default=1)
    p.add_argument("--decode-tokens", type=positive("--decode-tokens"), default=8,
                   help="decode steps timed per run")
    p.add_argument("--repeats", type=positive("--repeats"), default=5,
                   help="timed rounds (median reported)")
    p.add_argument("--threads", type=positive("--threads"), default=os.cpu_count() or 1,
                   help="threads for PyTorch and ONNX Runtime alike")
    p.add_argument("--quantize", type=_quantize_list, default="int8,int4",
                   help="decode-graph variants to add: comma list of int8,int4 ('' for none)")
    p.add_argument("--data", help="dataset for accuracy and quantized-decode agreement "
                   "(default for builtin:synth-llava: builtin:synthvqa-test)")
    p.add_argument("--eval-limit", type=positive("--eval-limit"), default=100)
    p.add_argument("--no-torch", action="store_true", help="ONNX Runtime variants only (the "
                   "PyTorch weights are freed before timing)")
    p.add_argument("--no-builder", action="store_true", help="no ORT-GenAI model builder row "
                   "(default: added when onnxruntime-genai is installed; vlmopt.bench_builder)")
    p.add_argument("--work-dir", help="keep the exported packages here and reuse those that "
                   "match the model and plan (default: a temporary directory)")
    p.add_argument("--save", help="write the results JSON here")
    p.add_argument("--json", action="store_true")
    return p


def check_paths(args) -> None:
    """--save and --work-dir, before anything is measured (a benchmark takes minutes)."""
    if args.save:
        save = Path(args.save)
        if save.is_dir():
            raise VlmoptError(f"--save {save}: is a directory; give a file name")
        if not save.parent.is_dir():
            raise VlmoptError(f"--save {save}: parent directory {save.parent} does not exist")
    if args.work_dir and Path(args.work_dir).exists() and not Path(args.work_dir).is_dir():
        raise VlmoptError(f"--work-dir {args.work_dir}: exists and is not a directory")


def save_results(path: Path, res: dict) -> None:
    """Write the results JSON whole or not at all (temp file beside it, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise VlmoptError(f"--save {path}: cannot write ({e.strerror or e})") from None


# ----------------------------------------------------------------------------- plan


def drop_plan(lm, target: float, layer: int, n_text: int) -> dict:
    """The drop_tokens plan (FastV at ``layer``) keeping the most visual tokens whose prefill
    FLOPs ratio is <= ``target`` (analytic, vlmopt.api.flops)."""
    from vlmopt.api import apply_plan, flops

    nv = int(lm.config.image_seq_length)
    n_layers = int(lm.config.text_config.num_hidden_layers)
    if not 0 <= layer < n_layers:
        raise VlmoptError(f"--drop-layer {layer}: the model has {n_layers} decoder layers "
                          f"(0..{n_layers - 1})")

    def plan(keep):
        return {"schema": "vlmopt.plan/1", "model": {"name": lm.name,
                                                      "fingerprint": lm.fingerprint},
                "target": {"flops": target},
                "passes": [{"name": "drop_tokens",
                            "config": {"keep": {f"layer_{layer}": keep}}}],
                "provenance": {"tool": "vlmopt bench", "search": "bisection on keep"}}

    def ratio(keep):
        return flops(lm, apply_plan(lm, plan(keep), verify=False), n_text=n_text)["ratio"]

    if ratio(0) > target:
        raise VlmoptError(f"--target-flops {target}: a drop at layer_{layer} reaches "
                          f"{ratio(0):.3f} at best; use a smaller --drop-layer")
    lo, hi = 0, nv - 1  # ratio(lo) <= target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ratio(mid) <= target else (lo, mid - 1)
    return plan(lo)


# ----------------------------------------------------------------------------- variants


class TorchVariant:
    def __init__(self, gm):
        from vlmopt.export_graph import DecodeForm, PrefillForm

        self.pf, self.df = PrefillForm(gm).eval(), DecodeForm(gm).eval()

    def prefill(self, batch):
        import torch

        with torch.no_grad():
            return self.pf(**batch["torch"])

    def decode(self, out, n: int):
        import torch

        with torch.no_grad():
            for _ in range(n):
                tok = out[0].argmax(-1, keepdim=True)
                out = self.df(tok, out[1], list(out[2:]))
        return out


class HFVariant:
    """The transformers model's own forward with its KV cache: the plain PyTorch eager baseline."""

    def __init__(self, model):
        self.model = model

    def prefill(self, batch):
        import torch

        b = batch["torch"]
        with torch.no_grad():
            out = self.model(**b, use_cache=True, logits_to_keep=1)
        return (out.logits[:, -1], out.past_key_values, b["attention_mask"],
                b["position_ids"][:, -1:] + 1)

    def copy_state(self, state):
        import copy

        return (state[0], copy.deepcopy(state[1]), *state[2:])  # NOTE: decode grows the cache

    def decode(self, state, n: int):
        import torch

        logits, cache, mask, pos = state
        with torch.no_grad():
            for _ in range(n):
                tok = logits.argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(tok)], 1)
                out = self.model(input_ids=tok, past_key_values=cache, attention_mask=mask,
                                 position_ids=pos, use_cache=True, logits_to_keep=1)
                logits, cache, pos = out.logits[:, -1], out.past_key_values, pos + 1
        return logits


class OrtVariant:
    def __init__(self, art):
        self.art = art

    def prefill(self, batch):
        return self.art.run_prefill(batch["numpy"])

    def decode(self, out, n: int):
        for _ in range(n):
            tok = out[0].argmax(-1)[:, None].astype("int64")
            out = self.art.step(tok, out[1], out[2:])
        return out


def quantized_copy(src: Path, dst: Path, mode: str) -> Path:
    """The artifact at ``src`` with its decode graph quantized (prefill hard-linked)."""
    import shutil

    from vlmopt.emit import write_checksums
    from vlmopt.emit_quant import quantize_decode

    for f in src.rglob("*"):
        if f.is_file():
            t = dst / f.relative_to(src)
            t.parent.mkdir(parents=True, exist_ok=True)
            if f.parent.name == "onnx" and f.name.startswith("prefill"):
                os.link(f, t)
            else:
                shutil.copy2(f, t)
    quantize_decode(dst / "onnx" / "decode.onnx", mode)
    m = json.loads((dst / "manifest.json").read_text())
    m["quantize"] = {"mode": mode, "graph": "decode"}
    write_checksums(dst, m)
    return dst


def _reusable(d: Path, lm, gm, quantize: str | None = None) -> bool:
    """An earlier export in ``d`` of the same model with the same per-layer token counts."""
    from vlmopt.ir.capture import decoder_nodes
    from vlmopt.runtime import read_manifest

    if not (d / "manifest.json").is_file():
        return False
    try:
        m = read_manifest(d, verify=False)
    except VlmoptError:
        return False
    counts = [n.meta["vlmopt"]["n_visual"] for n in decoder_nodes(gm)]
    q = (m.get("quantize") or {}).get("mode")
    from vlmopt.emit import FUSE

    fused = bool((m.get("fusion") or {}).get("enabled"))  # NOTE: pre-fusion exports are not
    ok = (m["model"]["fingerprint"] == lm.fingerprint and q == quantize and fused == FUSE
          and m["kv"]["n_visual_per_layer"] == counts)
    if ok:
        log.info("reusing the export in %s", d)
    return ok


def _fresh(d: Path) -> None:
    import shutil

    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)


def _timed(fn, *a):
    t0 = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t0


def measure(variants: dict, batch: dict, repeats: int, n_decode: int, warmup: int = 1) -> dict:
    """Two phases of interleaved rounds (every variant once per round), medians in ms:
    prefill, then decode from each variant's own prefill state. NOTE: between the phases ONNX
    Runtime frees the prefill sessions, so large models need one graph per variant in memory.
    Variants whose name has a '+' (quantized decode) share their base variant's prefill."""
    runs = {k: {"prefill": [], "decode": []} for k in variants}
    state = {}
    for r in range(warmup + repeats):
        for name, v in variants.items():
            if "+" in name:
                continue
            state[name], t = _timed(v.prefill, batch)
            if r >= warmup:
                runs[name]["prefill"].append(t * 1e3)
            log.info("round %d %s: prefill %.1f ms", r, name, t * 1e3)
    for name, v in variants.items():
        if "+" in name:
            state[name] = state[name.split("+")[0]]
            runs[name]["prefill"] = runs[name.split("+")[0]]["prefill"]
        if isinstance(v, OrtVariant):
            v.art.release("prefill")
    for r in range(warmup + repeats):
        for name, v in variants.items():
            st = v.copy_state(state[name]) if hasattr(v, "copy_state") else state[name]
            _, t = _timed(v.decode, st, n_decode)
            if r >= warmup:
                runs[name]["decode"].append(t * 1e3 / n_decode)
            log.info("round %d %s: decode %.2f ms/token", r, name, t * 1e3 / n_decode)
    return {k: {"prefill_ms": statistics.median(v["prefill"]),
                "decode_ms_per_token": statistics.median(v["decode"]),
                "prefill_runs_ms": [round(x, 2) for x in v["prefill"]],
                "decode_runs_ms": [round(x, 3) for x in v["decode"]]} for k, v in runs.items()}


# ----------------------------------------------------------------------------- accuracy


def accuracy(arts: dict, records: list, n_tokens: int = 4) -> dict:
    """First-token accuracy of each ONNX variant on ``records``, and greedy-token agreement of
    the quantized decode graphs with the fp32 one (teacher-forced on the fp32 tokens)."""
    from vlmopt.runtime import preprocessor

    res = {}
    base = arts.get("ort/optimized")
    for name, art in arts.items():
        pre = preprocessor(art)
        hits, agree, total = 0, 0, 0
        for r in records:
            feeds = pre.encode([r.prompt], [r.load_image()])
            toks, _ = art.generate_ids(feeds, n_tokens)
            pred = pre.decode(toks[0, :1].tolist())
            hits += pred.strip().lower() == (r.answer or "").strip().lower()
            if base is not None and name.startswith("ort/optimized+"):
                ref, _ = base.generate_ids(feeds, n_tokens)
                n = min(ref.shape[1], toks.shape[1])
                agree += int((ref[:, :n] == toks[:, :n]).sum())
                total += n
        res[name] = {"accuracy": hits / len(records), "n": len(records)}
        if total:
            res[name]["decode_token_agreement_vs_fp32"] = agree / total
    return res


# ----------------------------------------------------------------------------- main


def benchmark(args) -> dict:
    import torch

    from vlmopt.api import apply_plan, flops
    from vlmopt.data.dataset import load_records
    from vlmopt.emit import emit, synthetic_batch
    from vlmopt.frontend.load import load, resolve_model
    from vlmopt.ir.capture import capture
    from vlmopt.plan import Plan
    from vlmopt.runtime import Artifact

    torch.set_num_threads(args.threads)
    resolve_model(args.model)
    # NOTE: every input is read before the model loads: a benchmark takes minutes
    given = Plan.load(args.plan) if args.plan else None
    data = builtin_default(args.model, args.data)
    records = load_records(data, limit=args.eval_limit) if data else None
    lm = load(args.model)  # a config-only directory: seeded random weights
    plan = given.to_json() if given else drop_plan(
        lm, args.target_flops, args.drop_layer, args.prompt_tokens)
    gms = {"original": capture(lm), "optimized": apply_plan(lm, plan)}
    cost = flops(lm, gms["optimized"], n_text=args.prompt_tokens)
    cost0 = flops(lm, None, n_text=args.prompt_tokens)
    tb = synthetic_batch(gms["original"], int(lm.config.text_config.vocab_size),
                         n=args.batch_size, n_text=args.prompt_tokens, ragged=False)
    batch = {"torch": tb, "numpy": {k: v.numpy() for k, v in tb.items()}}
    quant = args.quantize if isinstance(args.quantize, list) else _quantize_list(args.quantize)
    from vlmopt import bench_builder as bb

    notes = []
    with tempfile.TemporaryDirectory(prefix="vlmopt-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        builder = None
        if not getattr(args, "no_builder", False):
            builder, note = bb.prepare(lm, work / "genai-builder", tb["pixel_values"])
            notes.append(note)
        arts = {}
        for name, gm in gms.items():
            d = work / name
            if not _reusable(d, lm, gm):
                _fresh(d)
                t0 = time.perf_counter()
                emit(lm, gm, d, [], parity_samples=2)
                log.info("emitted %s in %.0f s", name, time.perf_counter() - t0)
            arts[f"ort/{name}"] = Artifact(d, threads=args.threads, spinning=False)
        for q in quant:
            d = work / f"optimized-{q}"
            if not _reusable(d, lm, gms["optimized"], q):
                _fresh(d)
                quantized_copy(work / "optimized", d, q)
            arts[f"ort/optimized+{q}"] = Artifact(d, threads=args.threads, spinning=False)
        variants = {} if args.no_torch else {"torch-hf/original": HFVariant(lm.model), **{
            f"torch/{k}": TorchVariant(g) for k, g in gms.items()}}
        variants.update({k: OrtVariant(a) for k, a in arts.items()})
        if builder is not None:
            variants[bb.ROW] = bb.BuilderVariant(builder, args.threads)
        if args.no_torch:  # NOTE: memory for the ONNX sessions of real-shape models
            gms.clear()
            lm.model.to("meta")  # frees the weights; the config stays
        lat = measure(variants, batch, args.repeats, args.decode_tokens)
        acc = accuracy(arts, records) if records and lm.processor else None
    return summarize(args, lm, plan, cost, cost0, lat, acc, data, notes)


def summarize(args, lm, plan, cost, cost0, lat, acc, data, notes=()) -> dict:
    def ratio(a, b, key):
        return lat[a][key] / lat[b][key] if a in lat and b in lat else None

    ideal = 1 / cost["ratio"]
    sp = {"ort_prefill_speedup": ratio("ort/original", "ort/optimized", "prefill_ms"),
          "torch_prefill_speedup": ratio("torch/original", "torch/optimized", "prefill_ms"),
          "ort_decode_speedup": ratio("ort/original", "ort/optimized", "decode_ms_per_token"),
          "ort_vs_torch_original_prefill": ratio("torch/original", "ort/original", "prefill_ms"),
          "ort_vs_torch_original_decode": ratio("torch/original", "ort/original",
                                                "decode_ms_per_token"),
          "ort_vs_hf_original_prefill": ratio("torch-hf/original", "ort/original", "prefill_ms"),
          "ort_vs_hf_original_decode": ratio("torch-hf/original", "ort/original",
                                             "decode_ms_per_token")}
    b = "genai-builder/original"  # speed relative to the builder's graph: > 1 is faster
    for name in ("original", "optimized"):
        for key, k in (("prefill", "prefill_ms"), ("decode", "decode_ms_per_token")):
            sp[f"ort_{name}_vs_builder_{key}"] = ratio(b, f"ort/{name}", k)
    tc = lm.config.text_config
    return {
        "model": args.model,
        "shapes": {"hidden": tc.hidden_size, "layers": tc.num_hidden_layers,
                   "n_visual": int(lm.config.image_seq_length), "vocab": tc.vocab_size,
                   "vision_hidden": lm.config.vision_config.hidden_size,
                   "vision_layers": lm.config.vision_config.num_hidden_layers,
                   "random_weights": not lm.has_weights},
        "plan": plan, "prompt_tokens": args.prompt_tokens, "batch_size": args.batch_size,
        "threads": args.threads, "repeats": args.repeats, "decode_tokens": args.decode_tokens,
        "flops": {"prefill_ratio": cost["ratio"], "ideal_prefill_speedup": ideal,
                  "original_prefill_tflops": cost["original_total"] / 1e12,
                  "decode_ratio": cost["decode_flops_per_token"]
                  / cost0["decode_flops_per_token"]},
        "latency": lat, "speedup": sp,
        "targets": {"ort_prefill_speedup_over_ideal": (sp["ort_prefill_speedup"] or 0) / ideal,
                    "ort_prefill_speedup_ge_0.8_ideal":
                        (sp["ort_prefill_speedup"] or 0) >= 0.8 * ideal,
                    "ort_ge_1.2x_torch_original": (sp["ort_vs_torch_original_prefill"] or 0)
                    >= 1.2 if sp["ort_vs_torch_original_prefill"] else None,
                    "ort_ge_1.2x_hf_original": (sp["ort_vs_hf_original_prefill"] or 0)
                    >= 1.2 if sp["ort_vs_hf_original_prefill"] else None,
                    "ort_original_ge_0.95x_builder": None if sp["ort_original_vs_builder_prefill"]
                    is None else sp["ort_original_vs_builder_prefill"] >= 0.95,
                    "ort_optimized_vs_builder_prefill_over_ideal": None if
                    sp["ort_optimized_vs_builder_prefill"] is None else
                    sp["ort_optimized_vs_builder_prefill"] / ideal},
        "accuracy": acc, "data": data if acc else None,
        "notes": ["torch-hf/original: the transformers model's own forward + KV cache; "
                  "torch/* run the export forms (vlmopt.export_graph) eagerly: the computation "
                  "the ONNX graphs hold", "'+int8'/'+int4' share the fp32 prefill graph; only "
                  "their decode graph is quantized", *notes],
        "host": {"cpus": os.cpu_count(), "onnxruntime": _ort_version()},
    }


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def print_table(res: dict) -> None:
    lat, f = res["latency"], res["flops"]
    print(f"{res['model']}: prefill FLOPs ratio {f['prefill_ratio']:.3f} (ideal speed-up "
          f"{f['ideal_prefill_speedup']:.2f}x), decode FLOPs ratio {f['decode_ratio']:.3f}; "
          f"{res['prompt_tokens']} text tokens, batch {res['batch_size']}, "
          f"{res['threads']} threads, median of {res['repeats']}")
    print(f"{'variant':<24}{'prefill ms':>12}{'decode ms/tok':>15}")
    for k, v in lat.items():
        print(f"{k:<24}{v['prefill_ms']:>12.1f}{v['decode_ms_per_token']:>15.2f}")
    for k, v in res["speedup"].items():
        if v is not None:
            print(f"{k:<32}{v:>8.2f}x")
    t = res["targets"]
    sp = res["speedup"]
    print(f"prefill speed-up, optimized vs original: ONNX Runtime "
          f"{sp['ort_prefill_speedup'] or 0:.2f}x, PyTorch {sp['torch_prefill_speedup'] or 0:.2f}x;"
          f" FLOPs ratio {f['prefill_ratio']:.3f} -> ideal {f['ideal_prefill_speedup']:.2f}x; "
          f"measured/ideal {t['ort_prefill_speedup_over_ideal']:.2f} (target >= 0.8)")
    for n in res["notes"][2:]:
        print(f"note: {n}")
    if res["accuracy"]:
        for k, v in res["accuracy"].items():
            extra = (f"  decode agreement vs fp32 {v['decode_token_agreement_vs_fp32']:.3f}"
                     if "decode_token_agreement_vs_fp32" in v else "")
            print(f"accuracy {k:<24}{v['accuracy']:.3f} (n={v['n']}){extra}")


def main(args) -> int:
    check_paths(args)
    res = benchmark(args)
    if args.save:
        save_results(Path(args.save), res)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_table(res)
    return 0
