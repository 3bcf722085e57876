"""The search's bookkeeping: one optuna study per run, so a killed search resumes and several
workers can share one (SQLite file by default, PostgreSQL for many machines).

Every evaluated candidate is a trial whose user attributes hold its steps, metrics and FLOPs;
a resumed run reads them back into the evaluator's cache, so nothing is measured twice.
Infeasible candidates (over the FLOPs target) are recorded as pruned trials, never evaluated.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from vlmopt.search.evaluator import Evaluator, Metrics
from vlmopt.search.space import Candidate, Space

from vlmopt.errors import VlmoptError

log = logging.getLogger(__name__)


@dataclass
class TrialRecord:
    number: int
    source: str  # strategy or "seed"
    steps: list  # [(pass, fields)]
    counts: list[int]
    ratio_llm: float
    ratio_total: float
    metrics: Metrics | None  # None: over the target, so never evaluated
    within: bool = True  # within the targets (G-Search probes may be over them)
    size_ratio: float = 1.0  # weight bytes / the original's

    @property
    def feasible(self) -> bool:
        return self.within and self.metrics is not None

    def to_json(self) -> dict:
        return {"number": self.number, "source": self.source, "steps": self.steps,
                "counts": self.counts, "ratio_llm": self.ratio_llm,
                "ratio_total": self.ratio_total, "within_target": self.within,
                "size_ratio": self.size_ratio,
                "metrics": self.metrics.to_json() if self.metrics else None}


def choose(records: list[TrialRecord], n: int) -> TrialRecord | None:
    """Calibration fidelity moves in steps of one answer (1/n); feasible plans within one step
    of the best are indistinguishable by it, so among them the one whose answer distribution
    stays closest to the original's (lowest KL, a far less noisy signal that tracks held-out
    accuracy on the built-in model) is chosen."""
    ok = [r for r in records if r.feasible]
    if not ok:
        return None
    top = max(r.metrics.fidelity for r in ok)
    near = [r for r in ok if r.metrics.fidelity >= top - 1.0 / max(1, n) - 1e-12]
    return min(near, key=lambda r: (r.metrics.kl, -r.metrics.fidelity, -r.ratio_llm))


def finalists(records: list[TrialRecord], k: int) -> list[TrialRecord]:
    """The ``k`` best distinct feasible plans by screening score (fidelity, ties by KL): the
    plans worth measuring again on more calibration samples."""
    from vlmopt.search.evaluator import plan_hash

    ok = sorted((r for r in records if r.feasible),
                key=lambda r: (-r.metrics.score, -r.ratio_llm, r.number))
    seen, out = set(), []
    for r in ok:
        key = plan_hash(r.steps)
        if key not in seen:
            seen.add(key)
            out.append(r)
        if len(out) == k:
            break
    return out


def open_study(storage: str, name: str, seed: int) -> optuna.Study:
    """Create or load the study; an unreachable storage is one clear error."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        rdb = optuna.storages.RDBStorage(storage)
    except Exception as e:  # noqa: BLE001 - sqlalchemy/driver errors vary by backend
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VlmoptError(f"--storage {storage}: cannot open ({msg})") from None
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8)
    return optuna.create_study(storage=rdb, study_name=name, direction="maximize",
                               sampler=sampler, load_if_exists=True)


class Context:
    """What a strategy works with: evaluate or reject candidates, and record every trial."""

    def __init__(self, study: optuna.Study, evaluator: Evaluator, space: Space, target: float,
                 scope: str, progress: Callable[[TrialRecord, TrialRecord | None], None]
                 | None = None, *, target_size: float | None = None,
                 calib: str | None = None):
        self.study, self.evaluator, self.space = study, evaluator, space
        self.target, self.scope, self.progress = target, scope, progress
        self.target_size = target_size  # weight bytes / the original's; None = no constraint
        self.calib = calib  # dataset spec that lowrank_qk's covariances come from
        self.records: list[TrialRecord] = []
        self._resume()

    def _resume(self) -> None:
        for t in self.study.get_trials(deepcopy=False):
            a = t.user_attrs
            if "steps" not in a:
                continue
            steps = [(n, f) for n, f in json.loads(a["steps"])]
            m = Metrics(**a["metrics"]) if a.get("metrics") else None
            if m is not None:
                self.evaluator.remember(steps, m)
            self.records.append(TrialRecord(t.number, a["source"], steps, a["counts"],
                                            a["ratio_llm"], a["ratio_total"], m,
                                            a.get("within", True), a.get("size_ratio", 1.0)))
        if self.records:
            log.info("resumed study %s: %d trials", self.study.study_name, len(self.records))

    @property
    def best(self) -> TrialRecord | None:
        ok = [r for r in self.records if r.feasible]
        return max(ok, key=lambda r: (r.metrics.score, -r.ratio_llm)) if ok else None

    def choose(self) -> TrialRecord | None:
        """The plan to ship: ``choose`` over this run's records."""
        return choose(self.records, len(self.evaluator.records))

    def feasible(self, cand: Candidate) -> bool:
        return self.space.ratio(cand, self.scope) <= self.target + 1e-12

    def within(self, f: dict) -> bool:
        """Both constraints: FLOPs (in the scope) and, if set, weight bytes."""
        return f[f"ratio_{self.scope}"] <= self.target + 1e-12 and (
            self.target_size is None or f["size_ratio"] <= self.target_size + 1e-12)

    def measure(self, cand: Candidate, source: str, trial: optuna.Trial | None = None, *,
                probe: bool = False) -> TrialRecord:
        """Cost first; evaluate only a candidate within the target (or a ``probe``: a G-Search
        measurement of the fidelity curve, which is never chosen if over the target). Records
        the trial: into ``trial`` when a strategy's optuna trial is running, else as a new
        finished trial."""
        steps = self.space.steps_of(cand)
        if trial is None:  # a resumed run re-walks its strategy: record each plan once
            for r in self.records:
                if r.source == source and r.steps == steps:
                    return r
        f = self.space.flops(steps)
        ok = self.within(f)
        m = self.evaluator.evaluate(steps) if (ok or probe) else None
        attrs = {"source": source, "steps": json.dumps(steps), "counts": list(cand.counts),
                 "ratio_llm": f["ratio_llm"], "ratio_total": f["ratio_total"], "within": ok,
                 "size_ratio": f["size_ratio"],
                 "metrics": {"accuracy": m.accuracy, "agreement": m.agreement, "kl": m.kl}
                 if m else None}
        if trial is not None:
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            number = trial.number
        else:
            ft = optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE if m else optuna.trial.TrialState.PRUNED,
                value=m.score if m else None, user_attrs=attrs)
            self.study.add_trial(ft)
            number = len(self.study.get_trials(deepcopy=False)) - 1
        rec = TrialRecord(number, source, steps, list(cand.counts), f["ratio_llm"],
                          f["ratio_total"], m, ok, f["size_ratio"])
        self.records.append(rec)
        if self.progress:
            self.progress(rec, self.best)
        return rec

    def counts(self) -> dict[str, int]:
        """Trials of the study by outcome (a failed trial is one a kill interrupted)."""
        out = {"evaluated": 0, "rejected_over_target": 0, "interrupted": 0}
        for t in self.study.get_trials(deepcopy=False):
            if t.state == optuna.trial.TrialState.FAIL:
                out["interrupted"] += 1
            elif t.user_attrs.get("metrics"):
                out["evaluated"] += 1
            elif t.state.is_finished():
                out["rejected_over_target"] += 1
        return out
