#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export VLMOPT_CACHE="${VLMOPT_CACHE:-$PWD/.cache}"
python -m pytest -q -p no:cacheprovider tests "$@"
