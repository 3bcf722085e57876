"""The fault suite's harness: bad inputs to build, and the real CLI run as the console script
runs it (tests/faults/test_bad_inputs.py)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYNTH = "builtin:synth-llava"


# ----------------------------------------------------------------------------- inputs


def png_bytes(width: int, height: int, *, rows: int | None = None) -> bytes:
    """A grey 8-bit PNG of ``width`` x ``height`` written without allocating the image: rows are
    compressed one at a time. ``rows`` < height writes a header that promises more rows than the
    data holds (the image data is then short, as in a truncated file)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    z = zlib.compressobj(1)
    row = b"\x00" + b"\x80" * width  # filter byte 0, then mid-grey
    data = b"".join(z.compress(row) for _ in range(height if rows is None else rows))
    data += z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data)
            + chunk(b"IEND", b""))


def bomb_png(side: int = 20000) -> bytes:
    """A header claiming ``side`` x ``side`` pixels (400 Mpixels by default, over twice Pillow's
    MAX_IMAGE_PIXELS) and almost no data: what a decompression bomb looks like when opened."""
    return png_bytes(side, side, rows=1)


def plan_obj(name: str, fp: str, passes: list | None = None) -> dict:
    return {"schema": "vlmopt.plan/1", "model": {"name": name, "fingerprint": fp},
            "passes": passes or []}


# ----------------------------------------------------------------------------- the harness


@dataclass
class Env:
    """What a case gets: its own directory and the shared good inputs (heavy ones lazily)."""

    tmp: Path
    request: pytest.FixtureRequest
    monkeypatch: pytest.MonkeyPatch
    notes: dict = field(default_factory=dict)

    def fixture(self, name: str):
        return self.request.getfixturevalue(name)

    @property
    def data(self) -> Path:
        return self.fixture("good_data")

    @property
    def plan(self) -> Path:
        return self.fixture("good_plan")

    @property
    def fingerprint(self) -> str:
        return self.fixture("synth_fingerprint")

    def data_copy(self, name: str = "d") -> Path:
        """A private copy of the good dataset (3 records, images/00000..2.png)."""
        d = self.tmp / name
        shutil.copytree(self.data.parent, d)
        return d / "data.jsonl"

    def artifact_copy(self) -> Path:
        d = self.tmp / "art"
        shutil.copytree(self.fixture("fault_artifact"), d)
        return d

    def file(self, rel: str, content: str | bytes) -> Path:
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        return p


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its bytes ('dir' for directories)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    """``vlmopt.cli.main(argv)`` as the console script runs it: argparse's exit is the exit
    code, warnings and WARNING log records reach stderr (a real run's basicConfig handler)."""
    from vlmopt.cli import main

    capsys.readouterr()
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            for cat in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                        ResourceWarning):  # Python's own defaults
                warnings.simplefilter("ignore", cat)
            warnings.showwarning = _show_warning
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse
                rc = e.code
    finally:
        root.removeHandler(handler)
    out, err = capsys.readouterr()
    return rc, out, err


def run_subprocess(argv: list[str]) -> tuple[int, str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "vlmopt.cli", *argv], capture_output=True,
                       text=True, env=env, timeout=120, check=False)
    return p.returncode, p.stdout, p.stderr
