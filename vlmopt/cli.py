"""The ``vlmopt`` command line. Every user error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from vlmopt.cli_args import (
    Parser,
    image_size,
    nonneg,
    positive,
    progress,
)
from vlmopt.data.defaults import builtin_default, default_data
from vlmopt.errors import VlmoptError

log = logging.getLogger("vlmopt")
DEFAULT_PROMPT_TOKENS = 32  # = vlmopt.api.DEFAULT_TEXT_TOKENS (the CLI does not import torch)


# ----------------------------------------------------------------------------- commands


def cmd_data_synth(args) -> int:
    import shutil

    from vlmopt.data import synthvqa

    out = Path(args.out)
    tmp = _fresh_out(out)
    try:
        synthvqa.write_dataset(tmp, args.n, args.seed)
        _publish(tmp, out)
    except OSError as e:
        raise _write_error(out, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # NOTE: gone once published (renamed to out)
    print(f"wrote {args.n} samples to {out / 'data.jsonl'}")
    return 0


def cmd_eval(args) -> int:
    from vlmopt.data.dataset import load_records
    from vlmopt.evaluation import evaluate, hf_runner
    from vlmopt.frontend.load import load, resolve_model
    from vlmopt.runtime import is_artifact

    if is_artifact(args.model):  # an emitted ONNX package: the deployed artifact's accuracy
        from vlmopt.artifact_eval import artifact_eval

        runner, processor, data = artifact_eval(args.model, args.data, args.plan)
        records = load_records(data, limit=args.limit)
        original = runner
        args.data = data
    else:
        from vlmopt.plan import Plan

        resolve_model(args.model)  # NOTE: the model's errors come before the data's
        plan = Plan.load(args.plan) if args.plan else None
        records = load_records(default_data(args.model, args.data), limit=args.limit)
        lm = load(args.model)
        if lm.processor is None:
            raise VlmoptError(f"{args.model}: no processor files; evaluation needs them")
        processor = lm.processor
        original = hf_runner(lm.model)
        runner = original
    if args.plan:
        from vlmopt.api import apply_plan
        from vlmopt.ir.capture import graph_runner

        runner = graph_runner(apply_plan(lm, plan))
    advance, close = progress(len(records), "evaluating")
    try:
        res = evaluate(runner, records, processor, batch_size=args.batch_size,
                       reference=original if (args.blank_image or args.plan) else None,
                       blank_image=args.blank_image, progress=advance)
    finally:
        close()
    out = {"model": args.model, "plan": args.plan,
           "data": args.data or default_data(args.model, None),
           "blank_image": args.blank_image, **res.to_json()}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.model} on {out['data']}" + (" (blank image)" if args.blank_image
                                                         else ""))
    t.add_column("type")
    t.add_column("accuracy", justify="right")
    t.add_column("majority answer rate", justify="right")
    for k, v in res.per_type.items():
        t.add_row(k, f"{v:.3f}", f"{res.majority_per_type[k]:.3f}")
    if res.accuracy is not None:
        t.add_row("overall", f"{res.accuracy:.3f}", "")
    Console().print(t)
    print(f"samples: {res.n}  agreement: {res.agreement:.3f}  KL: {res.kl:.4f}  "
          f"reference: {res.reference}  throughput: {res.samples_per_s:.1f} samples/s")
    return 0


def _load_for_cost(model: str):
    """Config-only directories load on the meta device: cost needs shapes, not weights."""
    from vlmopt.frontend.load import load, resolve_model

    path = resolve_model(model)
    has_weights = any(path.glob("*.safetensors"))
    return load(model, device="cpu" if has_weights else "meta")


def cmd_flops(args) -> int:
    from vlmopt.api import apply_plan, flops_over
    from vlmopt.frontend.load import resolve_model
    from vlmopt.plan import Plan, plan_basis

    resolve_model(args.model)  # NOTE: the model's errors come before the plan's
    plan = Plan.load(args.plan) if args.plan else None
    basis = (plan.target or {}) if plan else {}
    # at the plan's own place by default: its calibration prompts' length and image sizes
    plan_tokens, plan_sizes = plan_basis(basis, str(args.plan))
    n_text = next(n for n in (args.prompt_tokens, plan_tokens, DEFAULT_PROMPT_TOKENS)
                  if n is not None)
    sizes = {tuple(args.image_size): 1} if args.image_size else plan_sizes
    lm = _load_for_cost(args.model)
    graph = apply_plan(lm, plan, verify=True) if plan else None
    try:
        res = flops_over(lm, graph, n_text=n_text, image_sizes=sizes)
    except ValueError as e:
        raise VlmoptError(f"--image-size: {e}") from None
    at = ("--prompt-tokens" if args.prompt_tokens is not None else
          "the plan's calibration prompts" if plan_tokens is not None else "the default")
    achieved = basis.get("achieved") if at == "the plan's calibration prompts" and (
        not args.image_size) else None
    if args.json:
        print(json.dumps({"model": args.model, "plan": args.plan, "prompt_tokens_from": at,
                          "optimize_reported": achieved, **res}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"prefill FLOPs: {args.model}" + (f" + {args.plan}" if args.plan else "")
              + f" ({res['n_visual']} visual + "
              + (f"{res['n_image_text']} newline + " if res.get("n_image_text") else "")
              + f"{res['n_text']} text tokens"
              + (f", image grid {res['image_grids'][0]}" if res["image_grids"] else "") + ")")
    t.add_column("node")
    t.add_column("visual tokens", justify="right")
    t.add_column("GFLOPs", justify="right")
    t.add_column("share", justify="right")
    vis = res["visual_tokens_per_layer"]
    for k, v in res["per_node"].items():
        if k == "total":
            continue
        nv = str(vis[int(k.split("_")[1])]) if k.startswith("layer_") else ""
        t.add_row(k, nv, f"{v / 1e9:,.3f}", f"{v / res['total']:.1%}")
    Console().print(t)
    n_img = sum(n for *_, n in res["image_sizes"])
    if n_img > 1:
        print(f"per-node figures at the last image size; totals and ratios averaged over {n_img} "
              f"calibration images ({len(res['image_sizes'])} sizes)")
    print(f"LLM prefill FLOPs ratio {res['llm_ratio']:.4f}  total prefill FLOPs ratio "
          f"{res['ratio']:.4f}  at {n_text} text tokens ({at})"
          + (f"; optimize reported LLM {achieved['llm']:.4f}, total {achieved['total']:.4f}"
             if achieved else ""))
    print(f"total {res['total'] / 1e12:.4f} TFLOPs  original {res['original_total'] / 1e12:.4f} "
          f"TFLOPs  LLM {res['llm'] / 1e12:.4f} TFLOPs  original "
          f"{res['original_llm'] / 1e12:.4f} TFLOPs  vision tower (+ projector) share "
          f"{res['vision_share']:.1%}")
    print(f"decode {res['decode_flops_per_token'] / 1e9:.3f} GFLOPs/token  KV cache "
          f"{sum(res['kv_cache_bytes_per_layer']) / 2**20:.2f} MiB")
    print(f"weights {res['weight_bytes_total'] / 2**20:.2f} MiB  original "
          f"{res['original_weight_bytes_total'] / 2**20:.2f} MiB  ratio "
          f"{res['weight_bytes_total'] / res['original_weight_bytes_total']:.4f}")
    return 0


def cmd_analyze(args) -> int:
    from vlmopt.analysis import layer_contribution, rank_layers
    from vlmopt.data.dataset import load_records
    from vlmopt.frontend.load import load, resolve_model

    resolve_model(args.model)
    calib = default_data(args.model, args.calib, "--calib", split="calib")
    records = load_records(calib, limit=args.limit)
    lm = load(args.model)
    advance, close = progress(len(records), "layer contribution")
    try:
        lc = layer_contribution(lm, records, batch_size=args.batch_size, progress=advance,
                                use_cache=not args.no_cache)
    finally:
        close()
    order = rank_layers(lc)
    if args.json:
        print(json.dumps({"model": args.model, "calib": calib, "n": len(records),
                          "layer_contribution": {f"layer_{i}": v for i, v in enumerate(lc)},
                          "freeze_order": order}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Layer Contribution (KL when visual tokens get no update), {len(records)} "
              f"samples of {calib}")
    t.add_column("layer")
    t.add_column("LC", justify="right")
    t.add_column("freeze rank", justify="right")
    for i, v in enumerate(lc):
        t.add_row(f"layer_{i}", f"{v:.5f}", str(order.index(f"layer_{i}") + 1))
    Console().print(t)
    return 0


def check_out(out: Path) -> None:
    """Refuse, creating nothing, an OUT that is not ours to write: an existing file or
    non-empty directory, a parent that is missing, not a directory or not writable."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise VlmoptError(f"--out {out}: exists and is not a directory (nothing overwritten)")
        if any(out.iterdir()):
            raise VlmoptError(f"--out {out}: exists and is not empty (nothing overwritten)")
    parent = out.absolute().parent
    if not parent.exists():
        raise VlmoptError(f"--out {out}: parent directory {parent} does not exist")
    if not parent.is_dir():
        raise VlmoptError(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VlmoptError(f"--out {out}: parent directory {parent} is not writable")


def _write_error(out: Path, e: OSError) -> VlmoptError:
    what = f" {e.filename}" if e.filename else ""
    return VlmoptError(f"--out {out}: cannot write{what} ({e.strerror or e}); nothing was "
                       "written")


def _fresh_out(out: Path) -> Path:
    """A temp dir beside ``out``; renamed to ``out`` only when everything was written."""
    import tempfile

    check_out(out)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.absolute().parent))
    except OSError as e:
        raise _write_error(out, e) from None


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty, checked by _fresh_out
    tmp.rename(out)


def cmd_apply(args) -> int:
    import shutil

    from vlmopt.api import apply_plan, flops_over
    from vlmopt.frontend.load import resolve_model
    from vlmopt.ir.capture import readable
    from vlmopt.plan import Plan, plan_basis

    # NOTE: every input and OUT are checked before the model loads
    plan = Plan.load(args.plan)
    resolve_model(args.model)
    calib = [] if args.no_onnx else _emit_calib(args.model, args.calib)
    out = Path(args.out)
    check_out(out)
    dump = Path(args.dump_dir) if args.dump_dir else None
    if dump is not None and dump.exists() and not dump.is_dir():
        raise VlmoptError(f"--dump-dir {dump}: exists and is not a directory")
    lm = _load_for_cost(args.model) if args.no_onnx else _load_for_emit(args.model)
    tmp = _fresh_out(out)
    try:
        gm = apply_plan(lm, plan, verify=True, dump_dir=args.dump_dir)
        plan.save(tmp / "plan.json")
        (tmp / "graph.txt").write_text(readable(gm))
        n_text, sizes = plan_basis(plan.target, str(args.plan))
        cost = flops_over(lm, gm, n_text=DEFAULT_PROMPT_TOKENS if n_text is None else n_text,
                          image_sizes=sizes)
        (tmp / "passes.json").write_text(json.dumps(
            {"passes": gm.meta["vlmopt"]["report"], "ratio_llm": cost["llm_ratio"],
             "ratio_total": cost["ratio"], "prompt_tokens": cost["n_text"],
             "image_sizes": cost["image_sizes"]}, indent=2))
        manifest = None
        if not args.no_onnx:
            from vlmopt.emit import emit

            manifest = emit(lm, gm, tmp, calib, quantize=args.quantize,
                            fuse=not args.no_fuse)
        _publish(tmp, out)
    except OSError as e:
        if dump is not None and e.filename and Path(e.filename).is_relative_to(dump):
            raise VlmoptError(f"--dump-dir {dump}: cannot write {e.filename} "
                              f"({e.strerror or e})") from None
        raise _write_error(out, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # NOTE: gone once published (renamed to out)
    onnx = "no ONNX export (--no-onnx)" if manifest is None else (
        f"ONNX package checked against PyTorch on {manifest['parity']['samples']} sample(s), "
        f"max logit diff {manifest['parity']['max_abs_logit_diff']:.2g}")
    print(f"applied {len(plan.passes)} pass(es); prefill FLOPs ratio {cost['ratio']:.4f}; "
          f"wrote {out} ({onnx})")
    return 0


def _load_for_emit(model: str):
    """Export needs weights: a config-only directory loads with seeded random weights."""
    from vlmopt.frontend.load import load

    return load(model)


def _emit_calib(model: str, calib: str | None) -> list:
    """Parity samples for emit: --calib, the built-in calibration split, or none (emit then
    checks parity on synthetic prompts and pixels)."""
    from vlmopt.data.dataset import load_records

    calib = builtin_default(model, calib, "calib")
    if calib is None:
        log.warning("no --calib: ONNX parity is checked on synthetic inputs only")
        return []
    return load_records(calib, limit=8)


def cmd_run(args) -> int:
    # NOTE: ONNX Runtime alone; nothing on this path may import torch (tests/test_runtime.py)
    from vlmopt.runtime import Artifact, new_tokens_room, open_image, preprocessor

    art = Artifact(args.out, provider=args.provider)
    if not art.manifest.get("processor"):
        raise VlmoptError(f"{args.out}: the artifact has no processor files (made from a "
                          "config-only model); vlmopt run needs them")
    pre = preprocessor(art)
    image = Path(args.image)
    if not image.is_file():
        raise VlmoptError(f"--image {image}: no such file"
                          + (" (a directory)" if image.is_dir() else ""))
    token = "<image>" if art.dynamic else pre.image_token
    if args.prompt.count(token) != 1:
        raise VlmoptError(f"--prompt must contain {token} exactly once (found "
                          f"{args.prompt.count(token)})")
    im = open_image(image, f"--image {image}")
    room = new_tokens_room(art.manifest, pre.encode([args.prompt], [im]))
    if room is not None and room[0] + args.max_new_tokens > room[1]:
        raise VlmoptError(f"--max-new-tokens {args.max_new_tokens}: the prompt takes {room[0]} "
                          f"of the model's {room[1]} positions, so at most "
                          f"{max(room[1] - room[0], 0)} new tokens fit")
    print(art.generate(pre, [args.prompt], [im], max_new_tokens=args.max_new_tokens)[0])
    return 0


def cmd_bench(args) -> int:
    from vlmopt.bench import main as bench_main

    return bench_main(args)


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="vlmopt", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("data", help="datasets").add_subparsers(dest="data_cmd", required=True,
                                                              metavar="{synth}")
    s = d.add_parser("synth", help="write a SynthVQA dataset (PNG images + data.jsonl)")
    s.add_argument("--n", type=positive("--n"), required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_data_synth)

    e = sub.add_parser("eval", help="accuracy, agreement, KL and throughput on a dataset")
    e.add_argument("model", help="checkpoint directory or builtin:synth-llava")
    e.add_argument("--data", help="JSONL dataset or builtin:synthvqa-{calib,test}")
    e.add_argument("--limit", type=positive("--limit"))
    e.add_argument("--batch-size", type=positive("--batch-size"), default=16)
    e.add_argument("--plan", help="evaluate the model optimized by this plan.json "
                   "(agreement and KL are then against the original)")
    e.add_argument("--blank-image", action="store_true",
                   help="feed a flat grey image instead (measures how much answers need it)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    f = sub.add_parser("flops", help="analytic prefill/decode FLOPs per node, and the ratio")
    f.add_argument("model", help="checkpoint or config-only directory, or builtin:synth-llava")
    f.add_argument("--plan", help="plan.json to apply before counting")
    f.add_argument("--prompt-tokens", type=nonneg("--prompt-tokens"),
                   help="text (non-visual) prompt tokens per sample (default: the --plan's "
                        f"calibration prompts, as optimize counted them; else "
                        f"{DEFAULT_PROMPT_TOKENS})")
    f.add_argument("--image-size", type=image_size("--image-size"), metavar="WxH",
                   help="image size for dynamic-resolution models (Qwen-VL), sized by the "
                        "checkpoint's own image processor (default: 448x448)")
    f.add_argument("--json", action="store_true")
    f.set_defaults(fn=cmd_flops)

    z = sub.add_parser("analyze", help="Layer Contribution per decoder layer (ShortV)")
    z.add_argument("model")
    z.add_argument("--calib", help="calibration JSONL (default for builtin:synth-llava: "
                   "builtin:synthvqa-calib)")
    z.add_argument("--limit", type=positive("--limit"), default=64)
    z.add_argument("--batch-size", type=positive("--batch-size"), default=16)
    z.add_argument("--no-cache", action="store_true", help="recompute even if cached")
    z.add_argument("--json", action="store_true")
    z.set_defaults(fn=cmd_analyze)

    from vlmopt.cli_compare import add_parser as add_compare

    add_compare(sub)

    from vlmopt.cli_optimize import add_parser as add_optimize

    add_optimize(sub)

    from vlmopt.cli_show import add_parser as add_show

    add_show(sub)

    a = sub.add_parser("apply", help="apply a plan.json to a model")
    a.add_argument("plan")
    a.add_argument("model")
    a.add_argument("--out", required=True)
    a.add_argument("--dump-dir", help="write the readable graph after each pass here")
    a.add_argument("--calib", help="samples for the ONNX parity check (default for "
                   "builtin:synth-llava: builtin:synthvqa-calib; otherwise synthetic inputs)")
    a.add_argument("--quantize", choices=("int8", "int4"),
                   help="quantize the decode graph's weight MatMuls (ONNX Runtime)")
    a.add_argument("--no-fuse", action="store_true", help="keep the exported graphs unfused")
    a.add_argument("--no-onnx", action="store_true", help="write plan and graph only")
    a.set_defaults(fn=cmd_apply)

    r = sub.add_parser("run", help="generate with an emitted artifact on ONNX Runtime alone")
    r.add_argument("out", help="artifact directory (vlmopt apply/optimize --out)")
    r.add_argument("--image", required=True)
    r.add_argument("--prompt", required=True, help="prompt containing <image> once")
    r.add_argument("--max-new-tokens", type=positive("--max-new-tokens"), default=16)
    r.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    r.set_defaults(fn=cmd_run)

    from vlmopt.bench import add_arguments as bench_arguments

    bench_arguments(sub.add_parser("bench", help="latency: original vs optimized, prefill and "
                                   "decode, PyTorch eager and ONNX Runtime")).set_defaults(
        fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.debug and args.command != "run":  # NOTE: `run` imports no torch/transformers
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        import warnings

        warnings.filterwarnings("ignore")
        # the ONNX exporter logs each torchvision op it skips; noise for a user
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        return args.fn(args)
    except VlmoptError as e:
        if args.debug:
            raise
        print(f"vlmopt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlmopt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `vlmopt eval ... --json | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
