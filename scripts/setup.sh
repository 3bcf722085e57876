#!/usr/bin/env bash
# Creates .venv (if missing) and installs vlmopt with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
quiet() {  # pip's notes about absent local index folders are noise, not errors
  "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
  return "${PIPESTATUS[0]}"
}
quiet python -m pip install -q --upgrade pip
# NOTE: torch is pinned to the CPU build (2.13.0); a free range would pull a multi-GB CUDA build.
quiet python -m pip install -q "torch==2.13.0"
quiet python -m pip install -q -e ".[dev,lmms]"
# NOTE: lmms-eval without its declared deps (torchvision among them must not be installed here);
# what `lmms-eval --model vlmopt` imports is the `lmms` extra above (pyproject.toml).
quiet python -m pip install -q --no-deps "lmms-eval==0.7.3"
