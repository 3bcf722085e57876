"""The built-in models (torch-free names only): checkpoints shipped in vlmopt/builtin/, all
trained on SynthVQA, so their default calibration and evaluation sets are its fixed splits."""

from __future__ import annotations

from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
BUILTIN_MODELS = {"builtin:synth-llava": BUILTIN_DIR / "synth-llava",
                  "builtin:synth-qwen": BUILTIN_DIR / "synth-qwen"}
SYNTHVQA_MODELS = tuple(BUILTIN_MODELS)
