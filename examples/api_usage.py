"""The Python API end to end: load, capture, a FastV plan, FLOPs, accuracy against the original.

    python examples/api_usage.py [MODEL] [--limit N]
"""

from __future__ import annotations

import argparse

from vlmopt.passes import drop_tokens

import vlmopt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="builtin:synth-llava")
    ap.add_argument("--data", default="builtin:synthvqa-test")
    ap.add_argument("--limit", type=int, default=64)
    args = ap.parse_args()

    lm = vlmopt.load(args.model)
    n_visual = int(lm.config.image_seq_length)
    fastv = drop_tokens.fastv(k=2, r=0.5, n_visual=n_visual)  # FastV K=2, R=50%
    plan = {"schema": "vlmopt.plan/1",
            "model": {"name": lm.name, "fingerprint": lm.fingerprint},
            "passes": [{"name": "drop_tokens", "config": {"keep": fastv.keep}}]}
    graph = vlmopt.apply_plan(lm, plan)  # captured, rewritten, verified
    cost = vlmopt.flops(lm, graph)
    print(f"visual tokens per layer: {cost['visual_tokens_per_layer']}")
    print(f"prefill FLOPs: {cost['total'] / 1e9:.3f} G ({cost['ratio']:.3f} of the original)")
    res = vlmopt.evaluate(lm, args.data, graph=graph, limit=args.limit)
    base = vlmopt.evaluate(lm, args.data, limit=args.limit)
    print(f"accuracy: original {base.accuracy:.3f}, FastV {res.accuracy:.3f}; "
          f"agreement {res.agreement:.3f}, KL {res.kl:.4f}")


if __name__ == "__main__":
    main()
