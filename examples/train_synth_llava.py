"""Train the built-in model ``builtin:synth-llava`` from scratch on SynthVQA.

    python examples/train_synth_llava.py --out vlmopt/builtin/synth-llava

Kept so that the commands recorded in the checkpoint's ``training.json`` run unchanged: it is
``examples/train_synth.py --family llava`` (see there for the losses, stages and options).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_synth import main  # noqa: E402

if __name__ == "__main__":
    if any(a == "--family" or a.startswith("--family=") for a in sys.argv[1:]):
        sys.exit("train_synth_llava.py trains the llava family; use train_synth.py --family")
    main(["--family", "llava", *sys.argv[1:]])
