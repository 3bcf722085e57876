"""The command line's argument types and error format (argparse helpers): a leaf module that
the CLI modules (``cli``, ``cli_optimize``, ``bench``) share; no library module needs it."""

from __future__ import annotations

import argparse
import math
import re
import sys


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one ``vlmopt: error:`` line, exit 2, no usage block
    (``--help`` still prints it). Subparsers inherit the class."""

    def error(self, message: str):
        self.exit(2, usage_error(self.prog, message))

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:  # NOTE: named after the verb they were given to, not the top-level parser
            verb = " ".join(v for v in (getattr(ns, "command", None),
                                        getattr(ns, "data_cmd", None)) if v)
            self.exit(2, usage_error(f"{self.prog} {verb}".strip(),
                                     f"unrecognized arguments: {' '.join(extras)}"))
        return ns


def usage_error(prog: str, message: str) -> str:
    verb = prog.removeprefix("vlmopt").strip()
    msg = " ".join(message.split())  # one line, whatever argparse composed
    msg = re.sub(r"^argument (\S+): (?=\1 )", "", msg)  # "argument --n: --n must ..." once
    return f"vlmopt: error: {verb + ': ' if verb else ''}{msg} (see {prog} --help)\n"


def int_flag(flag: str, minimum: int, maximum: int | None = None):
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {v!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{flag} must be >= {minimum}, got {n}")
        if maximum is not None and n > maximum:
            raise argparse.ArgumentTypeError(f"{flag} must be <= {maximum}, got {n}")
        return n
    return parse


def float_flag(flag: str, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False):
    """A finite float, optionally within [low, high] (an end open where asked)."""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    where = f" in {lo}{low:g}, {high:g}{hi}" if low is not None and high is not None else (
        f" {'>' if low_open else '>='} {low:g}" if low is not None else "")

    def parse(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {v!r}") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"{flag} must be a finite number, got {v!r}")
        bad_low = low is not None and (x <= low if low_open else x < low)
        bad_high = high is not None and (x >= high if high_open else x > high)
        if bad_low or bad_high:
            raise argparse.ArgumentTypeError(f"{flag} must lie{where}, got {v}")
        return x
    return parse


def ratio(flag: str):
    """A FLOPs (or size) ratio: finite, in (0, 1]."""
    return float_flag(flag, 0.0, 1.0, low_open=True)


def positive(flag: str):
    return int_flag(flag, 1)


def nonneg(flag: str):
    return int_flag(flag, 0)


def image_size(flag: str):
    """WIDTHxHEIGHT (or one side for a square), positive pixels."""
    def parse(v: str) -> tuple[int, int]:
        parts = v.lower().split("x")
        try:
            w, h = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
        except ValueError:
            w = h = 0
        if w <= 0 or h <= 0:
            raise argparse.ArgumentTypeError(f"{flag}: expected WIDTHxHEIGHT or one side in "
                                             f"pixels, got {v!r}")
        return h, w

    return parse


def progress(total: int, desc: str):
    """A rich progress bar on a terminal; nothing otherwise. Returns (advance, close)."""
    if not sys.stderr.isatty():
        return (lambda n: None), (lambda: None)
    from rich.progress import Progress

    p = Progress(transient=True)
    p.start()
    task = p.add_task(desc, total=total)
    return (lambda n: p.advance(task, n)), p.stop
