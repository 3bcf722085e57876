"""Prefill graph size and export time of a greedy selection (DivPrune): ONNX Loop vs unrolled.

    python examples/bench_select_export.py [--cases demo 576]

demo: builtin:synth-llava with the demo's plan (DivPrune keep 68 + ShortV on layers 6-7; 196
visual tokens). 576: a config-only LLaVA with LLaVA-1.5's vision grid (336 px, patch 14: 576
visual tokens) and a tiny decoder, DivPrune keeping 192. Each plan's prefill is exported twice:
as vlmopt exports it (the greedy loop as one ONNX Loop) and with the loop unrolled once per kept
token (``DiversityScore.unroll_export``, the construction before the Loop). Node counts include
the nodes inside Loop bodies.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import onnx

import vlmopt
from vlmopt import emit
from vlmopt.ir.select import DiversityScore

DEMO_PLAN = [{"name": "select_visual", "config": {"method": "divprune", "keep": 68}},
             {"name": "freeze_visual", "config": {"layers": ["layer_6", "layer_7"]}}]
CONFIG_576 = Path(__file__).resolve().parent / "configs" / "llava-1.5-7b" / "config.json"


def count_nodes(graph: onnx.GraphProto) -> dict[str, int]:
    """Node counts by op type, recursively through subgraphs (Loop/If/Scan bodies)."""
    out: dict[str, int] = {}
    for n in graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
        for a in n.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                for k, v in count_nodes(g).items():
                    out[k] = out.get(k, 0) + v
    return out


def tiny_576(root: Path) -> Path:
    """LLaVA-1.5-7B's config with its vision grid kept and every width and depth made tiny."""
    cfg = json.loads(CONFIG_576.read_text())
    cfg["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                              vocab_size=512)
    cfg["image_token_index"] = 500
    cfg["pad_token_id"] = 501
    cfg["text_config"]["pad_token_id"] = 501
    cfg["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, projection_dim=32)
    cfg.pop("dtype", None)
    path = root / "llava-576-tiny"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def measure(lm, passes: list, unroll: bool, root: Path) -> dict:
    plan = {"schema": "vlmopt.plan/1", "model": {"name": lm.name, "fingerprint": lm.fingerprint},
            "passes": passes}
    gm = vlmopt.apply_plan(lm, plan)
    batch = emit.synthetic_batch(gm, int(lm.config.text_config.vocab_size), n=2)
    path = root / f"prefill-{'unrolled' if unroll else 'loop'}.onnx"
    DiversityScore.unroll_export = unroll
    try:
        t = time.perf_counter()
        emit.export_prefill(gm, batch, path)
        seconds = time.perf_counter() - t
    finally:
        DiversityScore.unroll_export = False
    g = onnx.load(str(path)).graph
    ops = count_nodes(g)
    return {"top_level": len(g.node), "all": sum(ops.values()), "ArgMax": ops.get("ArgMax", 0),
            "Loop": ops.get("Loop", 0), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["demo", "576"], choices=["demo", "576"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = {"demo": lambda: (vlmopt.load("builtin:synth-llava"), DEMO_PLAN),
                 "576": lambda: (vlmopt.load(str(tiny_576(root))),
                                 [{"name": "select_visual",
                                   "config": {"method": "divprune", "keep": 192}}])}
        print(f"{'case':<28} {'export':<9} {'nodes':>6} {'(+bodies)':>9} {'ArgMax':>6} "
              f"{'Loop':>4} {'export s':>8}")
        for name in args.cases:
            lm, passes = cases[name]()
            keep = passes[0]["config"]["keep"]
            label = f"{name}: {lm.config.image_seq_length} tokens, keep {keep}"
            for unroll in (True, False):
                r = measure(lm, passes, unroll, root)
                print(f"{label:<28} {'unrolled' if unroll else 'Loop':<9} {r['top_level']:>6} "
                      f"{r['all']:>9} {r['ArgMax']:>6} {r['Loop']:>4} {r['seconds']:>8.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
