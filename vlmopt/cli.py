"""The ``vlmopt`` command line. Every user error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vlmopt.errors import VlmoptError

log = logging.getLogger("vlmopt")


def _positive(flag: str):
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {v!r}") from None
        if n <= 0:
            raise argparse.ArgumentTypeError(f"{flag} must be > 0, got {n}")
        return n
    return parse


def _progress(total: int, desc: str):
    """A rich progress bar on a terminal; nothing otherwise. Returns (advance, close)."""
    if not sys.stderr.isatty():
        return (lambda n: None), (lambda: None)
    from rich.progress import Progress

    p = Progress(transient=True)
    p.start()
    task = p.add_task(desc, total=total)
    return (lambda n: p.advance(task, n)), p.stop


# ----------------------------------------------------------------------------- commands


def cmd_data_synth(args) -> int:
    from vlmopt.data import synthvqa

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise VlmoptError(f"--out {out}: directory exists and is not empty (nothing overwritten)")
    path = synthvqa.write_dataset(out, args.n, args.seed)
    print(f"wrote {args.n} samples to {path}")
    return 0


def default_data(model: str, data: str | None, flag: str = "--data") -> str:
    if data:
        return data
    if model == "builtin:synth-llava":
        return "builtin:synthvqa-test"
    raise VlmoptError(f"{flag} is required for model {model}")


def cmd_eval(args) -> int:
    from vlmopt.data.dataset import load_records
    from vlmopt.evaluate import evaluate, hf_runner
    from vlmopt.frontend.load import load, resolve_model

    resolve_model(args.model)  # NOTE: the model's errors come before the data's
    records = load_records(default_data(args.model, args.data), limit=args.limit)
    lm = load(args.model)
    if lm.processor is None:
        raise VlmoptError(f"{args.model}: no processor files; evaluation needs them")
    runner = hf_runner(lm.model)
    advance, close = _progress(len(records), "evaluating")
    try:
        res = evaluate(runner, records, lm.processor, batch_size=args.batch_size,
                       reference=runner if args.blank_image else None,
                       blank_image=args.blank_image, progress=advance)
    finally:
        close()
    out = {"model": args.model, "data": args.data or default_data(args.model, None),
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


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmopt", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="datasets").add_subparsers(dest="data_cmd", required=True)
    s = d.add_parser("synth", help="write a SynthVQA dataset (PNG images + data.jsonl)")
    s.add_argument("--n", type=_positive("--n"), required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_data_synth)

    e = sub.add_parser("eval", help="accuracy, agreement, KL and throughput on a dataset")
    e.add_argument("model", help="checkpoint directory or builtin:synth-llava")
    e.add_argument("--data", help="JSONL dataset or builtin:synthvqa-{calib,test}")
    e.add_argument("--limit", type=_positive("--limit"))
    e.add_argument("--batch-size", type=_positive("--batch-size"), default=16)
    e.add_argument("--blank-image", action="store_true",
                   help="feed a flat grey image instead (measures how much answers need it)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        import warnings

        warnings.filterwarnings("ignore")
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


if __name__ == "__main__":
    sys.exit(main())
