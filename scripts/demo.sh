#!/usr/bin/env bash
# Set up (see setup.sh) and run the demo on the built-in model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
vlmopt eval builtin:synth-llava --data builtin:synthvqa-test
