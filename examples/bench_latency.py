"""Latency benchmark: original vs optimized, PyTorch eager and ONNX Runtime, on the built-in model
(when its checkpoint is present) and on a config-only real-shape model (random weights).

    python examples/bench_latency.py                      # both, results in examples/results/
    python examples/bench_latency.py --only llava-medium --repeats 5

Each run is `vlmopt bench` (vlmopt/bench.py); the printed table and the saved JSON hold the
medians, the measured speed-ups and the analytic FLOPs ratio beside them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = {
    # built-in model: 196 visual tokens, 8 layers; the vision tower is 18% of its total prefill,
    # so a drop at layer 1 sized to 0.5 of the total FLOPs (0.3 is out of reach for one drop)
    "synth-llava": ["builtin:synth-llava", "--target-flops", "0.5", "--drop-layer", "1",
                    "--prompt-tokens", "16", "--eval-limit", "200"],
    # config-only, hidden 2048, 16 layers, 576 visual tokens (ViT-B/14 at 336 px), random weights
    "llava-medium": [str(HERE / "configs" / "llava-medium"), "--target-flops", "0.3",
               "--drop-layer", "2", "--prompt-tokens", "32"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(RUNS))
    ap.add_argument("--repeats", default="3")
    ap.add_argument("--decode-tokens", default="8")
    args = ap.parse_args()
    from vlmopt.cli import main as cli
    from vlmopt.frontend.load import BUILTIN_MODELS

    code = 0
    for name, argv in RUNS.items():
        if args.only and name != args.only:
            continue
        if name == "synth-llava" and not (BUILTIN_MODELS[argv[0]] / "config.json").exists():
            print(f"skipping {name}: checkpoint not trained yet", file=sys.stderr)
            continue
        print(f"== {name}")
        code |= cli(["bench", *argv, "--repeats", args.repeats, "--decode-tokens",
                     args.decode_tokens, "--save", str(HERE / "results" / f"bench_{name}.json")])
    return code


if __name__ == "__main__":
    sys.exit(main())
