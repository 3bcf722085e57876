"""``vlmopt compare --targets 0.3 0.15 0.1``: every method of the table at the same FLOPs.

Each method of ``compare.default_methods`` keeps its own shape (where it cuts, its stages'
ratios, its scorer, its position convention); its one free knob, how many visual tokens it
keeps, is scaled to the largest value whose LLM (or total) prefill FLOPs ratio fits the target:

- count budgets (fixed-grid models) are all multiplied by one factor ``s`` (rounded, at least 1,
  a 0 stays 0; VisionZip's contextual share follows), so a PyramidDrop keeps its 1 : 1/2 : 1/4
  profile and a FastV its cut layer;
- fraction budgets (dynamic resolution) are fractions of what reaches each cut, so only the
  first one is scaled: every later count follows it.

The factor is found by bisection on the analytic cost (vlmopt.api.flops_over, the definition
``optimize``'s target uses), the kept count of the method's largest budget as an integer where
budgets are counts. A method that cannot reach the target even at one token per budget (FastV
keeps every token for its first K layers; ShortV freezes layers but keeps the tokens) is a row
that says so, with its lowest ratio. Two methods that become the same plan (FastV R=50% and
R=75% both scale to one cut) are one row: the first of a name with the same passes, cut layers
and switches stands for it; one with other cut layers is a row of its own.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass

from vlmopt.compare import Method
from vlmopt.errors import VlmoptError

log = logging.getLogger(__name__)
TARGETS = (0.3, 0.15, 0.1)
_BUDGET = re.compile(r" R=[\d.]+%| \d+(\.\d+)?%| \d+/\d+( -> \d+/\d+)?( schedule)?")


@dataclass
class Fitted:
    name: str  # the method's name without its budget
    method: Method | None  # the plan at the target; None: it cannot reach it
    ratio: float  # its FLOPs ratio at the target (the lowest it reaches when None)
    scale: float | None = None


def family_name(name: str) -> str:
    """A method's name without its budget ("DivPrune 64/576, original positions" ->
    "DivPrune, original positions")."""
    return re.sub(r"\s+", " ", _BUDGET.sub("", name)).strip()


def _layer(k: str) -> int:
    return int(k.rsplit("_", 1)[1])


def _budgets(steps) -> list[int | float]:
    """Every token budget of a plan, in pass and layer order."""
    out: list[int | float] = []
    for name, f in steps:
        if name in ("select_visual", "merge_vision") and f.get("method", "tome") != "none":
            out.append(f["keep"])
        elif name == "drop_tokens":
            out += [f["keep"][k] for k in sorted(f["keep"], key=_layer)]
    return out


def scale_steps(steps, s: float) -> list[tuple[str, dict]]:
    """The plan with its token budgets scaled by ``s`` (module docstring's rule)."""
    first_fraction = True
    out = []

    def scaled(v):
        nonlocal first_fraction
        if isinstance(v, float):  # a fraction of what reaches the cut
            if not first_fraction:
                return v
            first_fraction = False
            return min(1.0, max(1e-6, v * s))
        return 0 if v == 0 else max(1, round(v * s))

    for name, fields in steps:
        f = copy.deepcopy(fields)
        if name in ("select_visual", "merge_vision") and f.get("method", "tome") != "none":
            old = f["keep"]
            f["keep"] = scaled(old)
            if f.get("contextual"):
                share = f["contextual"] / old
                f["contextual"] = min(f["keep"] - 1, max(1, round(f["keep"] * share)))
                if f["contextual"] < 1:
                    del f["contextual"]
        elif name == "drop_tokens":
            f["keep"] = {k: scaled(f["keep"][k]) for k in sorted(f["keep"], key=_layer)}
        out.append((name, f))
    return out


class Fitter:
    """Fits methods to FLOPs targets on one model at the calibration prompts' text length and
    image sizes; plans' ratios are cached."""

    def __init__(self, lm, n_text: int, image_sizes: dict | None, n_visual: int | None,
                 scope: str = "llm"):
        from vlmopt.ir.capture import capture

        self.lm, self.n_text, self.sizes, self.scope = lm, n_text, image_sizes, scope
        self.n_visual = n_visual
        self.base = capture(lm)
        self._ratio: dict[str, float] = {}

    def ratio(self, steps) -> float:
        """The plan's FLOPs ratio in the fitter's scope; inf when the plan cannot be built
        (a budget its rule refuses, e.g. VScan's windows)."""
        from vlmopt import api
        from vlmopt.pipeline import make_config, run_passes
        from vlmopt.search.evaluator import plan_hash

        key = plan_hash(steps)
        if key not in self._ratio:
            try:
                gm = run_passes(self.base, [(n, make_config(n, f)) for n, f in steps],
                                verify=False)[0] if steps else self.base
                f = api.flops_over(self.lm, gm, n_text=self.n_text, image_sizes=self.sizes)
                self._ratio[key] = f["llm_ratio" if self.scope == "llm" else "ratio"]
            except (ValueError, VlmoptError) as e:
                log.debug("plan %s cannot be built: %s", steps, e)
                self._ratio[key] = float("inf")
        return self._ratio[key]

    def fit(self, m: Method, target: float) -> Fitted:
        name = family_name(m.name)
        budgets = _budgets(m.steps)
        if not budgets:  # no token knob (the original, ShortV)
            r = self.ratio(m.steps)
            return Fitted(name, m if r <= target else None, r)
        counts = [b for b in budgets if not isinstance(b, float)]
        if counts:  # integer knob: the largest budget's kept count, 1 .. N
            top = max(counts)
            hi = self.n_visual if self.n_visual else top

            def at(c: int):
                return scale_steps(m.steps, c / top)
            lo_v, hi_v = 1, hi
        else:  # the first fraction, (0, 1]
            top = budgets[0]

            def at(x: float):
                return scale_steps(m.steps, x / top)
            lo_v, hi_v = 1e-3, 1.0
        low = self.ratio(at(lo_v))
        if low == float("inf") and self.ratio(at(hi_v)) < float("inf"):
            # the rule refuses the smallest budgets (ToMe's per-layer merge cap): the least
            # budget it builds, by bisection on buildability
            bad, good = lo_v, hi_v
            for _ in range(40):
                if (counts and good - bad <= 1) or (not counts and good - bad <= 1e-4):
                    break
                mid = (bad + good) // 2 if counts else (bad + good) / 2
                bad, good = (bad, mid) if self.ratio(at(mid)) < float("inf") else (mid, good)
            lo_v, low = good, self.ratio(at(good))
        if low > target:
            return Fitted(name, None, low)
        if self.ratio(at(hi_v)) <= target:
            lo_v = hi_v
        else:
            for _ in range(40):
                if counts and hi_v - lo_v <= 1:
                    break
                if not counts and hi_v - lo_v <= 1e-4:
                    break
                mid = (lo_v + hi_v) // 2 if counts else (lo_v + hi_v) / 2
                if self.ratio(at(mid)) <= target:
                    lo_v = mid
                else:
                    hi_v = mid
        steps = at(lo_v)
        return Fitted(name, Method(name, steps), self.ratio(steps), lo_v / top)


def budget_label(steps) -> str:
    """The plan's budgets in a few words: "divprune 64 + drop 2:32 4:16", "ToMe 288"."""
    parts = []
    for name, f in steps:
        if name == "select_visual":
            parts.append(f"{f['method']} {_num(f['keep'])}"
                         + (f" ({f['contextual']} contextual)" if f.get("contextual") else ""))
        elif name == "merge_vision":
            parts.append(f"ToMe {_num(f['keep'])}")
        elif name == "drop_tokens":
            parts.append("drop " + " ".join(f"{_layer(k)}:{_num(v)}" for k, v in
                                            sorted(f["keep"].items(), key=lambda kv:
                                                   _layer(kv[0]))))
        elif name == "freeze_visual":
            parts.append(f"freeze {len(f['layers'])} layers")
        else:
            parts.append(name)
    return " + ".join(parts) or "-"


def _num(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def at_targets(fitter: Fitter, methods: list[Method], targets) -> dict[float, list[Fitted]]:
    """Per target, each method family fitted to it (one row per family and structure; the
    original is left to the caller)."""
    out = {}
    for t in targets:
        shapes: dict[str, tuple] = {}  # family name -> the plan structure it stands for
        rows = []
        for m in methods:
            if m.name == "original":
                continue
            # a method without a token knob (ShortV) keeps its name: nothing is refitted
            name = family_name(m.name) if _budgets(m.steps) else m.name
            shape = structure(m.steps)
            if shapes.get(name, shape) != shape:  # the same method cut elsewhere: its own row
                name = f"{name} (as {m.name})"
            if name in shapes:  # e.g. FastV R=50% and R=75%: one cut, one row at a target
                continue
            shapes[name] = shape
            fit = fitter.fit(m, t)
            fit.name = name
            if fit.method:
                fit.method.name = name
            rows.append(fit)
        out[t] = rows
    return out


def structure(steps) -> tuple:
    """What a plan is apart from its budgets: its passes, methods, cut layers and switches."""
    out = []
    for name, f in steps:
        keep = f.get("keep")
        out.append((name, tuple(sorted(keep)) if isinstance(keep, dict) else None,
                    tuple(sorted((k, str(v)) for k, v in f.items()
                                 if k not in ("keep", "contextual")))))
    return tuple(out)


def run(lm, records, methods: list[Method], targets, *, scope: str = "llm",
        batch_size: int = 16, ort: bool = False, repeats: int = 5, progress=None
        ) -> dict[float, list[dict]]:
    """Per target, the table rows: the original, then every method fitted to the target with
    ``compare``'s figures (accuracy, agreement, KL, FLOPs, PyTorch latency; ``ort``: also the
    ONNX Runtime prefill latency of each plan's exported graph), its budgets and the published
    figure; a method that cannot reach the target is a row with ``unreachable`` and its lowest
    ratio."""
    from collections import Counter

    from vlmopt.compare import compare
    from vlmopt.evaluation import image_size, mean_text_tokens
    from vlmopt.published import published

    sizes = None
    if lm.adapter.fixed_n_visual() is None:
        sizes = {(h, w): n for (w, h), n in Counter(image_size(r) for r in records).items()}
    fitter = Fitter(lm, mean_text_tokens(lm, records, batch_size), sizes,
                    lm.adapter.fixed_n_visual(), scope)
    out = {}
    for t, fits in at_targets(fitter, methods, targets).items():
        ms = [Method("original", [])] + [f.method for f in fits if f.method]
        rows = {r["method"]: r for r in compare(lm, records, ms, batch_size=batch_size,
                                                latency_repeats=repeats, progress=progress)}
        if ort:
            lat = ort_latencies(fitter.base, ms, lm, records[:1], repeats)
            for name, v in lat.items():
                rows[name]["ort_latency_ms"] = v * 1e3
                rows[name]["ort_latency_ratio"] = v / lat["original"]
        table = [rows["original"]]
        for f in fits:
            if f.method is None:
                table.append({"method": f.name, "unreachable": True,
                              f"lowest_ratio_{scope}": f.ratio, "published": published(f.name)})
            else:
                table.append({**rows[f.name], "budgets": budget_label(f.method.steps),
                              "scale": f.scale, "published": published(f.name)})
        out[t] = table
    return out


def ort_latencies(base, methods: list[Method], lm, records, repeats: int) -> dict[str, float]:
    """Median ONNX Runtime (CPU) prefill seconds of each method's exported, fused graph on one
    record, in interleaved rounds (as ``ort_latency.prefill_latency`` does for two graphs)."""
    import tempfile
    from pathlib import Path

    from vlmopt import emit, inputs, runtime
    from vlmopt.emit_fuse import fuse_graph
    from vlmopt.ir.capture import complete_inputs
    from vlmopt.ort_latency import first_sample, interleaved
    from vlmopt.pipeline import make_config, run_passes

    batch = complete_inputs(inputs.encode(lm.processor, [r.prompt for r in records],
                                          [r.load_image() for r in records]))
    sessions, feeds = {}, {}
    with tempfile.TemporaryDirectory(prefix="vlmopt-compare-ort-") as tmp:
        for i, m in enumerate(methods):
            gm = run_passes(base, [(n, make_config(n, f)) for n, f in m.steps],
                            verify=False)[0] if m.steps else base
            b = first_sample(batch, gm.meta["vlmopt"]) if emit.dynamic(gm) else batch
            path = Path(tmp) / f"{i}.onnx"
            try:
                emit.export_prefill(gm, b, path)
                fuse_graph(path)
            except Exception as e:  # noqa: BLE001 - a method PyTorch runs but ONNX cannot
                log.warning("%s: not exported for ONNX Runtime timing (%s)", m.name, e)
                continue
            sessions[m.name] = runtime.session(path, "cpu", None, spinning=False)
            f = {k: v.numpy() for k, v in emit.export_feeds(gm, b).items()}
            feeds[m.name] = {i.name: f[i.name] for i in sessions[m.name].get_inputs()}
        out = interleaved(sessions, feeds, repeats)
        del sessions
    return out
