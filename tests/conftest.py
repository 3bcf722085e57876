"""Session fixtures: tiny LLaVA checkpoints and a small SynthVQA dataset, built once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# NOTE: one thread. On a small, busy machine tiny ops with several OpenMP threads are ~25x slower
# (threads spin waiting for each other); subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)

from helpers import make_tiny_llava  # noqa: E402

from vlmopt.data import synthvqa  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    """Tiny LLaVA (Llama decoder, MHA) with safetensors weights and processor files."""
    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_gqa(tmp_path_factory) -> Path:
    """Tiny LLaVA with a Qwen2 decoder and grouped-query attention (2 KV heads for 4 heads)."""
    return make_tiny_llava(tmp_path_factory.mktemp("tiny-qwen2"), decoder="qwen2", kv_heads=2)


@pytest.fixture(scope="session")
def tiny_config_only(tmp_path_factory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("tiny-config-only"), weights=False)


@pytest.fixture(scope="session")
def loaded_tiny(tiny_llava):
    """The tiny checkpoint loaded by vlmopt (shared: tests must not modify it)."""
    from vlmopt.frontend.load import load

    return load(tiny_llava)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """data.jsonl of 10 SynthVQA samples (seed 5): every question type, several prompt lengths."""
    return synthvqa.write_dataset(tmp_path_factory.mktemp("synth"), 10, seed=5)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache/vlmopt."""
    monkeypatch.setenv("VLMOPT_CACHE", str(tmp_path / "vlmopt-cache"))
