"""``python -m vlmopt.integrations.lmms_eval task DATA --out DIR [--name N] [--limit N]``:
write an lmms-eval task over a vlmopt dataset, then print how to run it."""

from __future__ import annotations

import argparse
import sys

from vlmopt.errors import VlmoptError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmopt.integrations.lmms_eval",
                                description="lmms-eval tasks over vlmopt datasets")
    sub = p.add_subparsers(dest="verb", required=True)
    t = sub.add_parser("task", help="write an lmms-eval task directory for a JSONL dataset")
    t.add_argument("data", help="JSONL dataset or builtin:synthvqa-{calib,test}")
    t.add_argument("--out", required=True, help="task directory (its parent must exist)")
    t.add_argument("--name", default=None, help="task name (default: vlmopt_synthvqa)")
    t.add_argument("--limit", type=int, default=None, help="the first N records only")
    args = p.parse_args(argv)
    from vlmopt.integrations.lmms_eval.task import DEFAULT_NAME, write_task

    name = args.name or DEFAULT_NAME
    try:
        if args.limit is not None and args.limit < 1:
            raise VlmoptError(f"--limit must be a positive integer, got {args.limit}")
        path = write_task(args.data, args.out, name, limit=args.limit)
    except VlmoptError as e:
        print(f"vlmopt: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}\nrun: lmms-eval --model vlmopt --model_args artifact=OUT "
          f"--include_path {path.parent} --tasks {name} --output_path results/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
