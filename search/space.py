"""The search space: a candidate (visual tokens per layer, where they are selected, frozen
layers) as pass steps, and its cost under the model's analytic cost model.

A candidate's ``counts[l]`` is the number of visual tokens entering decoder layer ``l``
(non-increasing). ``counts[0] < N`` is realised by ``select_visual`` (before the LLM); a later
decrease by ``drop_tokens`` between layers; ``frozen`` layers by ``freeze_visual``.

FLOPs scopes: ``total`` is the whole prefill (vision tower, projector, decoder, head); ``llm`` is
the prefill without the vision tower and projector - the part token methods can reduce, and the
convention of the papers' FLOPs ratios (shared/methods.md section 11). Method overheads (scorer
rows, VisionZip's CLS attention, DivPrune's distance matrix) count in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vlmopt import api
from vlmopt.errors import VlmoptError

SCOPES = ("llm", "total")
SELECT_METHODS = ("none", "visionzip", "divprune", "kcenter", "pool", "random")
# The input-level selections the joint search tries. Greedy max-min diversity (divprune) is in:
# its picks among near-identical background tokens win by ~1e-5, so on some inputs ONNX Runtime
# keeps other (equally valid) tokens than PyTorch; export parity is therefore checked on inputs
# whose picks all win clearly (emit.decision_margins), and the artifact's accuracy is measured.
# kcenter is divprune's loop from another start and random a baseline: left to `compare`.
SEARCH_SELECT = ("none", "visionzip", "divprune", "pool")


@dataclass(frozen=True)
class Candidate:
    counts: tuple[int, ...]  # visual tokens entering each decoder layer
    select: str = "none"  # select_visual method when counts[0] < N
    frozen: tuple[str, ...] = ()  # ShortV layers
    scorer: str = "last_query"  # drop_tokens scorer
    score_at: str = "previous"  # FastV scores at the layer before a cut; PyramidDrop "next"
    positions: str = "original"  # or "contiguous": renumbered after each cut (official codes)
    extra: tuple = field(default=())  # further (pass, fields) steps, e.g. lowrank_qk/quantize
    cls: str = "patches"  # visionzip: or "official" (CLS counted, official order; contiguous)

    def steps(self, n_visual: int, fractions: bool = False, score: str | None = None
              ) -> list[tuple[str, dict]]:
        """The plan steps; ``fractions``: budgets as fractions of what reaches each cut (a
        dynamic-resolution model, whose counts follow the image; ``n_visual`` is then the
        reference image's count), 0 staying the count 0; ``score``: what ranks a VisionZip
        selection on this tower (select_visual's field; None: left to the pass)."""
        def budget(c: int, of: int):
            return c / of if fractions and c else c

        steps: list[tuple[str, dict]] = []
        cur = n_visual
        if self.counts[0] < n_visual:
            method = self.select if self.select != "none" else (
                "divprune" if fractions else "visionzip")  # Space.default_select
            fields = {"method": method, "keep": budget(self.counts[0], n_visual)}
            if method == "visionzip":
                fields["contextual"] = visionzip_contextual(self.counts[0])
                if self.cls != "patches":
                    fields["cls"] = self.cls
                if score:
                    fields["score"] = score
            if self.positions != "original":
                fields["positions"] = self.positions
            steps.append(("select_visual", fields))
            cur = self.counts[0]
        keep = {}
        for i, c in enumerate(self.counts[1:], 1):
            if c < cur:
                keep[f"layer_{i}"] = budget(c, cur)
                cur = c
        if keep:
            fields = {"keep": keep, "scorer": self.scorer}
            if self.score_at != "previous":
                fields["score_at"] = self.score_at
            if self.positions != "original":
                fields["positions"] = self.positions
            steps.append(("drop_tokens", fields))
        if self.frozen:
            steps.append(("freeze_visual", {"layers": sorted(self.frozen, key=_layer_no)}))
        steps += [(n, dict(f)) for n, f in self.extra]
        return steps


def counts_of(steps: list[tuple[str, dict]], n_visual: int, n_layers: int) -> list[int]:
    """Visual tokens entering each layer under a plan's steps (the inverse of
    ``Candidate.steps`` for the token passes)."""
    cur, drops = n_visual, {}
    for name, f in steps:
        if name == "select_visual" and f.get("method", "none") != "none":
            cur = f["keep"]
        elif name == "drop_tokens":
            drops = {_layer_no(k): v for k, v in f.get("keep", {}).items()}
    out = []
    for i in range(n_layers):
        cur = drops.get(i, cur)
        out.append(cur)
    return out


def _layer_no(name: str) -> int:
    return int(name.split("_")[1])


def visionzip_contextual(keep: int) -> int:
    """VisionZip's split: 10 contextual of 64 tokens (54 dominant), scaled; none below 4."""
    return 0 if keep < 4 else max(1, round(keep * 10 / 64))


def snap(counts, n_visual: int, select: str) -> tuple[int, ...]:
    """Non-increasing, within [0, N]; layer 0 >= 1; a pooled layer 0 is a perfect square."""
    out, cur = [], n_visual
    for i, c in enumerate(counts):
        c = max(0, min(cur, int(c)))
        if i == 0:
            c = max(1, c)
            if select == "pool" and c < n_visual:
                c = max(1, math.isqrt(c)) ** 2
        out.append(c)
        cur = c
    return tuple(out)


def sigmoid_counts(n_layers: int, n_start: int, k: float, l0: float, r_min: float
                   ) -> list[int]:
    """P-Sigmoid: layer l keeps round(n_start * r(l)) with r(l) = r_min + (1 - r_min) /
    (1 + exp(k (l - l0))) for l >= 1; layer 0 keeps n_start (shared/methods.md section 9.2)."""
    out = [n_start]
    for layer in range(1, n_layers):
        z = max(-60.0, min(60.0, k * (layer - l0)))
        out.append(round(n_start * (r_min + (1 - r_min) / (1 + math.exp(z)))))
    return out


class Space:
    """Costs candidates for one model and one mean text length; caches by plan.

    Dynamic-resolution models (Qwen-VL): candidates are counted at the reference image (the
    calibration set's most common size), their plans carry fractions (``steps_of``), and FLOPs
    are summed over the calibration images' sizes, so the target holds on the calibration set.
    """

    def __init__(self, lm, n_text: int, evaluator=None, image_sizes: dict | None = None):
        from collections import Counter

        from vlmopt.evaluation import image_size

        self.lm, self.n_text, self.evaluator = lm, n_text, evaluator
        cfg = lm.config
        self.n_layers = int(cfg.text_config.num_hidden_layers)
        self.dynamic = lm.adapter.fixed_n_visual() is None
        self.sizes: dict = {None: 1}  # (height, width) -> images; None: the model's own size
        if self.dynamic:
            if image_sizes is None and evaluator is not None:
                wh = Counter(image_size(r) for r in evaluator.records)
                image_sizes = {(h, w): n for (w, h), n in wh.items()}
            self.sizes = dict(image_sizes or {
                type(lm.adapter).reference_image_size(cfg): 1})
        ref = max(self.sizes, key=lambda k: self.sizes[k])
        self.shapes = lm.shapes(api.image_grids(lm, ref))
        self.n_visual = self.shapes.n_visual
        # Dynamic resolution: VisionZip ranks by CLS attention, which CLS-free towers lack, and
        # pooling needs a fixed grid; DivPrune's greedy loop, whose length follows the image,
        # exports as one ONNX Loop with its count computed in the graph (ir.select.greedy_loop)
        self.default_select = "divprune" if self.dynamic else "visionzip"
        refused = lm.adapter.refused_select  # e.g. CLS-attention methods on AnyRes towers
        self.select_methods = tuple(m for m in (("none", "divprune") if self.dynamic
                                                else SEARCH_SELECT) if m not in refused)
        # CLS-ranked selections on this tower: by CLS attention (the pass's default), or
        # (SigLIP, Qwen-VL: no CLS the LLM does not read) by received attention, which the
        # plans then say (select_visual's ``score``)
        self.has_cls = bool(lm.adapter.has_cls)
        self.score = None if self.has_cls else "received"
        self._ratios: dict[str, dict] = {}
        self.base = self.flops([])

    def steps_of(self, cand: Candidate) -> list[tuple[str, dict]]:
        return cand.steps(self.n_visual, fractions=self.dynamic, score=self.score)

    def flops(self, steps: list[tuple[str, dict]]) -> dict:
        """{"total", "llm", "ratio_total", "ratio_llm", "per_node"} for a plan's steps."""
        from vlmopt.search.evaluator import plan_hash

        key = plan_hash(steps)
        if key in self._ratios:
            return self._ratios[key]
        f = api.flops_over(self.lm, self._build(steps), n_text=self.n_text,
                           image_sizes=self.sizes)  # summed over the calibration images
        out = {"total": f["total"], "llm": f["llm"], "ratio_total": f["ratio"],
               "ratio_llm": f["llm_ratio"], "per_node": f["per_node"],
               "visual_tokens_per_layer": f["visual_tokens_per_layer"],
               "weight_bytes": f["weight_bytes_total"],
               "weight_bytes_per_node": f["weight_bytes_per_node"],
               "size_ratio": f["weight_bytes_total"] / f["original_weight_bytes_total"]}
        self._ratios[key] = out
        return out

    def _build(self, steps):
        if self.evaluator is not None:
            return self.evaluator.build(steps)
        from vlmopt.ir.capture import capture
        from vlmopt.pipeline import make_config, run_passes

        gm = capture(self.lm)
        return run_passes(gm, [(n, make_config(n, f)) for n, f in steps], verify=False)[0] \
            if steps else gm

    def ratio(self, cand: Candidate | list, scope: str) -> float:
        steps = self.steps_of(cand) if isinstance(cand, Candidate) else cand
        return self.flops(steps)[f"ratio_{scope}"]

    def minimum(self, scope: str) -> float:
        """The cheapest plan token passes can make: one visual token into the LLM, none after
        layer 1 (for a 1-layer decoder: one token throughout)."""
        counts = [1] + [0] * (self.n_layers - 1)
        return self.ratio(Candidate(tuple(counts), select="random"), scope)

    def check_target(self, target: float, scope: str) -> None:
        if not 0 < target <= 1:
            raise VlmoptError(f"--target-flops must lie in (0, 1], got {target}")
        low = self.minimum(scope)
        if target < low:
            still = "vision tower and text tokens" if scope == "total" else "text tokens"
            raise VlmoptError(
                f"--target-flops {target} is below what any plan can reach for this model: "
                f"the minimum {scope} prefill FLOPs ratio is {low:.3f} (every visual token "
                f"dropped; the {still} still cost)")

    def fit(self, make, lo: float, hi: float, target: float, scope: str, *,
            integer: bool = False, iters: int = 40):
        """Largest x in [lo, hi] with ratio(make(x)) <= target (ratio non-decreasing in x);
        None if even make(lo) is over the target."""
        if self.ratio(make(lo), scope) > target:
            return None
        if self.ratio(make(hi), scope) <= target:
            return hi
        for _ in range(iters):
            if integer and hi - lo <= 1:
                break
            mid = (lo + hi) // 2 if integer else (lo + hi) / 2
            if self.ratio(make(mid), scope) <= target:
                lo = mid
            else:
                hi = mid
        return lo
