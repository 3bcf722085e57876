"""Emitted tiny artifacts shared by test_emit.py and test_runtime.py, built once per session
(ONNX export is the slow part: ~10 s a graph on a small machine)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

OPTIMIZED = [  # every token pass that changes shapes: select at layer 0, drop, frozen layer
    {"name": "select_visual", "config": {"method": "pool", "keep": 100}},
    {"name": "drop_tokens", "config": {"keep": {"layer_1": 40}}},
    {"name": "freeze_visual", "config": {"layers": ["layer_1"]}},
]
_CACHE: dict = {}


def plan_json(lm, passes: list) -> dict:
    return {"schema": "vlmopt.plan/1", "model": {"name": lm.name, "fingerprint": lm.fingerprint},
            "passes": passes}


def build(tmp_path_factory, tiny_llava: Path, lm, synth_data: Path) -> dict:
    """{"identity": ns, "optimized": ns}; ns.dir, ns.gm, ns.manifest. The identity artifact is
    written by `vlmopt apply` (the CLI path), the optimized one by vlmopt.emit.emit."""
    if "arts" in _CACHE:
        return _CACHE["arts"]
    from vlmopt.api import apply_plan
    from vlmopt.cli import main
    from vlmopt.data.dataset import load_records
    from vlmopt.emit import emit

    root = tmp_path_factory.mktemp("artifacts")
    plan = root / "identity.json"
    plan.write_text(json.dumps(plan_json(lm, [])))
    ident = root / "identity"
    assert main(["apply", str(plan), str(tiny_llava), "--out", str(ident), "--calib",
                 str(synth_data)]) == 0
    arts = {"identity": SimpleNamespace(
        dir=ident, gm=apply_plan(lm, plan_json(lm, [])),
        manifest=json.loads((ident / "manifest.json").read_text()))}
    gm = apply_plan(lm, plan_json(lm, OPTIMIZED))
    opt = root / "optimized"
    opt.mkdir()
    manifest = emit(lm, gm, opt, load_records(str(synth_data))[:4], parity_samples=4)
    arts["optimized"] = SimpleNamespace(dir=opt, gm=gm, manifest=manifest)
    _CACHE["arts"] = arts
    return arts
