#!/usr/bin/env bash
# Set up (see setup.sh) and run the main job on the built-in model: optimize it to 30% of its
# LLM prefill FLOPs and write plan, ONNX package and report to a fresh runs/demo-<time>/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
mkdir -p runs  # OUT's parent must exist (vlmopt never creates it)
out="runs/demo-$(date +%Y%m%d-%H%M%S)"
vlmopt optimize builtin:synth-llava --target-flops 0.3 --out "$out"
echo "report: $out/report.html"
