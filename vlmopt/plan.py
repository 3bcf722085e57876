"""plan.json: the one serializable description of an optimization.

    {"schema": "vlmopt.plan/1",
     "model": {"name": "builtin:synth-llava", "fingerprint": "sha256:..."},
     "target": {"flops": 0.3},                      # or null
     "passes": [{"name": "drop_tokens", "config": {...}}, ...],   # in pipeline.ORDER
     "provenance": {"tool": "vlmopt 0.1.0", "search": null, "seed": null, "objective": null}}
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmopt import pipeline
from vlmopt.errors import PlanError

SCHEMA = "vlmopt.plan/1"


@dataclass
class Plan:
    model_name: str
    fingerprint: str
    passes: list[tuple[str, Any]] = field(default_factory=list)  # (name, Config)
    target: dict | None = None
    provenance: dict = field(default_factory=dict)
    source: str | None = field(default=None, compare=False)  # the file it came from, for errors

    def to_json(self) -> dict:
        from vlmopt.version import __version__

        return {
            "schema": SCHEMA,
            "model": {"name": self.model_name, "fingerprint": self.fingerprint},
            "target": self.target,
            "passes": [{"name": n, "config": dataclasses.asdict(c)} for n, c in self.passes],
            "provenance": {"tool": f"vlmopt {__version__}", **self.provenance},
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def from_json(cls, obj: Any, where: str = "plan") -> Plan:
        def need(d, key, typ, ctx):
            if not isinstance(d, dict) or key not in d:
                raise PlanError(f"{where}: missing field '{ctx}{key}'")
            if not isinstance(d[key], typ):
                raise PlanError(f"{where}: field '{ctx}{key}' must be {typ.__name__}")
            return d[key]

        if not isinstance(obj, dict):
            raise PlanError(f"{where}: a plan is a JSON object")
        schema = need(obj, "schema", str, "")
        if schema != SCHEMA:
            raise PlanError(f"{where}: field 'schema' is {schema!r}; this vlmopt reads {SCHEMA!r}")
        model = need(obj, "model", dict, "")
        name = need(model, "name", str, "model.")
        fp = need(model, "fingerprint", str, "model.")
        steps = []
        for i, p in enumerate(need(obj, "passes", list, "")):
            pname = need(p, "name", str, f"passes[{i}].")
            fields = need(p, "config", dict, f"passes[{i}].")
            at = f"{where}: passes[{i}]: "
            try:
                steps.append((pname, pipeline.make_config(pname, fields, at)))
            except PlanError as e:  # an unknown pass's error comes without the place
                raise PlanError(str(e) if str(e).startswith(at) else at + str(e)) from None
        try:
            pipeline.check_order([n for n, _ in steps])
        except PlanError as e:
            raise PlanError(f"{where}: {e}") from None
        target = obj.get("target")
        if target is not None and not isinstance(target, dict):
            raise PlanError(f"{where}: field 'target' must be an object or null")
        plan_basis(target, where)
        prov = obj.get("provenance")
        if prov is not None and not isinstance(prov, dict):
            raise PlanError(f"{where}: field 'provenance' must be an object or null")
        prov = prov or {}
        return cls(name, fp, steps, target, {k: v for k, v in prov.items() if k != "tool"},
                   source=where)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = Path(path)
        if path.is_dir():
            raise PlanError(f"{path}: is a directory; give the plan.json file")
        if not path.is_file():
            raise PlanError(f"{path}: plan file not found")
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise PlanError(f"{path}: cannot read ({e.strerror or e})") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise PlanError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
        if not text.strip():
            raise PlanError(f"{path}: empty file; a plan is a JSON object")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return cls.from_json(obj, str(path))

    def check_model(self, fingerprint: str, name: str) -> None:
        if fingerprint != self.fingerprint:
            raise PlanError(f"{self.source or 'plan'}: made for model {self.model_name!r} "
                            f"(fingerprint {self.fingerprint}), not {name!r} ({fingerprint})")


def plan_basis(target: dict | None, where: str = "plan") -> tuple[int | None, dict | None]:
    """(prompt tokens, {(height, width): images}) at which ``optimize`` met a plan's FLOPs target,
    as it recorded them in the plan's ``target`` (None, None for a plan written by hand)."""
    t = target or {}
    n = t.get("prompt_tokens")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise PlanError(f"{where}: field 'target.prompt_tokens' must be a non-negative integer")
    sizes = t.get("image_sizes")
    if sizes is None:
        return n, None
    ok = isinstance(sizes, list) and sizes and all(
        isinstance(e, list) and len(e) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in e) for e in sizes)
    if not ok:
        raise PlanError(f"{where}: field 'target.image_sizes' must be a list of "
                        f"[height, width, images] positive integers")
    return n, {(h, w): c for h, w, c in sizes}
