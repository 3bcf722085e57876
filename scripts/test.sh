#!/usr/bin/env bash
# Set up (see setup.sh), lint, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export VLMOPT_CACHE="${VLMOPT_CACHE:-$PWD/.cache}"
ruff check vlmopt passes search tests examples
python -m pytest -q -rs -p no:cacheprovider tests "$@"
