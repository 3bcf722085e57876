"""The pass manager: plans' pass lists run in the canonical order (``vlmopt.passreg.ORDER``),
each followed by the verifier."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from torch import fx

from vlmopt.errors import PlanError
from vlmopt.passreg import _REGISTRY, ORDER, PassInfo

log = logging.getLogger(__name__)


def registry() -> dict[str, PassInfo]:
    import vlmopt.passes  # noqa: F401  (registers every pass module)

    return dict(_REGISTRY)


def get_pass(name: str) -> PassInfo:
    reg = registry()
    if name not in reg:
        raise PlanError(f"unknown pass {name!r}; known passes: {', '.join(sorted(reg))}")
    return reg[name]


def make_config(name: str, fields: dict, where: str = "") -> Any:
    """Build a pass Config from JSON fields; errors name the pass and the field."""
    info = get_pass(name)
    known = {f.name for f in dataclasses.fields(info.config)}
    for k in fields:
        if k not in known:
            raise PlanError(f"{where}pass {name!r}: unknown field {k!r} "
                            f"(fields: {', '.join(sorted(known))})")
    try:
        return info.config(**fields)
    except (ValueError, TypeError) as e:
        raise PlanError(f"{where}pass {name!r}: {e}") from None


def check_order(names: list[str]) -> None:
    for a, b in zip(names, names[1:]):
        if a == b:
            raise PlanError(f"pass {a!r} appears twice in a row; merge its configs")
        if ORDER.index(a) > ORDER.index(b):
            raise PlanError(f"pass {b!r} must run before pass {a!r} (see pipeline.ORDER)")


def run_passes(gm: fx.GraphModule, steps: list[tuple[str, Any]], *, verify: bool = True,
               example: dict | None = None, dump_dir: Path | None = None
               ) -> tuple[fx.GraphModule, list[dict]]:
    """Apply (name, config) steps in order, verifying the graph after each one."""
    from vlmopt.ir.capture import clone, readable
    from vlmopt.ir.verify import verify_graph

    check_order([n for n, _ in steps])
    gm = clone(gm)
    if dump_dir is not None:
        dump_dir = Path(dump_dir)
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "00_captured.txt").write_text(readable(gm))
    report = []
    for i, (name, config) in enumerate(steps, 1):
        t0 = time.perf_counter()
        try:
            res = get_pass(name).run(gm, config)
        except ValueError as e:  # the plan asks what this model cannot do
            msg = str(e)
            raise PlanError(msg if msg.startswith(name) else f"pass {name!r}: {msg}") from None
        gm = res.graph
        gm.meta["vlmopt"]["passes"].append(name)
        if verify:
            verify_graph(gm, pass_name=name, example=example)
        report.append({"pass": name, "changed": res.changed, "stats": res.stats,
                       "seconds": round(time.perf_counter() - t0, 3)})
        log.info("pass %s: changed=%s %s", name, res.changed, res.stats)
        if dump_dir is not None:
            (dump_dir / f"{i:02d}_{name}.txt").write_text(readable(gm))
    return gm, report
