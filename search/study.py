"""The search's bookkeeping: one optuna study per run, so a killed search resumes and several
workers can share one (SQLite file by default, PostgreSQL for many machines).

Every evaluated candidate is a trial whose user attributes hold its steps, metrics and FLOPs;
a resumed run reads them back into the evaluator's cache, so nothing is measured twice.
Infeasible candidates (over the FLOPs target) are recorded as pruned trials, never evaluated.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import FrozenTrial, TrialState
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


HEARTBEAT_S = 10  # a running trial writes a heartbeat this often ...
GRACE_S = 60  # ... and one silent for this long belongs to a dead worker: failed and retried
WORKER = f"{socket.gethostname()}:{os.getpid()}"


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE whose random state is a function of the seed and of the trial's place in the study
    (its number less the failed trials before it), not of how many samples this process has
    drawn. A resumed run therefore proposes what the uninterrupted run would have: the history
    is the same (the killed trial is retried with its parameters) and so is the random state.
    Workers sharing a study get distinct places, hence distinct proposals."""

    def __init__(self, seed: int, n_startup_trials: int = 8):
        self.seed, self.n_startup = seed, n_startup_trials
        self._inner = self._make(0)

    def _make(self, k: int) -> optuna.samplers.TPESampler:
        return optuna.samplers.TPESampler(seed=(self.seed * 1_000_003 + k) % 2**32,
                                          n_startup_trials=self.n_startup)

    def before_trial(self, study, trial):
        fails = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                    if t.number < trial.number)
        self._inner = self._make(trial.number - fails)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def check_storage(storage: str) -> None:
    """A storage URL's form and driver, before anything is loaded."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        url = make_url(storage)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise VlmoptError(f"--storage {storage}: not a database URL (e.g. sqlite:///study.db, "
                          "postgresql://user@host/db)") from None
    try:
        dialect = url.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        raise VlmoptError(f"--storage {storage}: unknown database kind "
                          f"{url.drivername!r}") from None
    try:
        dialect.import_dbapi()
    except ImportError as e:
        hint = (" (psycopg 3: pip install 'vlmopt[postgres]')" if url.get_backend_name()
                == "postgresql" else "")
        raise VlmoptError(f"--storage {storage}: the {url.drivername} driver is not installed: "
                          f"no module {e.name!r}{hint}") from None


def _retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial a kill interrupted runs again, with the parameters it had (once)."""
    RetryFailedTrialCallback(max_retry=1)(study, trial)


def open_study(storage: str, name: str, seed: int) -> optuna.Study:
    """Create or load the study; an unreachable storage is one clear error. Running trials
    send heartbeats, so a dead worker's trial is failed and retried by whoever comes next."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import sqlalchemy

    check_storage(storage)
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_S,
                                                 grace_period=GRACE_S,
                                                 heartbeat_stale_trial_callback=_retry)
            try:  # the one process that creates a shared study queues its seed trials
                study = optuna.create_study(storage=rdb, study_name=name,
                                            direction="maximize", sampler=TrialSeededTPE(seed))
                study.set_user_attr("seeder", WORKER)
                with warnings.catch_warnings():  # the objective's name, as dashboards show it
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.set_metric_names(["score (fidelity - 0.01 KL)"])
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(storage=rdb, study_name=name,
                                          sampler=TrialSeededTPE(seed))
            return study
        except sqlalchemy.exc.IntegrityError:
            # workers starting together race to create the schema: the loser retries
            if attempt == 4:
                raise VlmoptError(f"--storage {storage}: cannot create the study tables "
                                  "(another process keeps creating them)") from None
            time.sleep(0.5 * (attempt + 1))
        except Exception as e:  # noqa: BLE001 - sqlalchemy/driver errors vary by backend
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VlmoptError(f"--storage {storage}: cannot open ({msg})") from None
    raise AssertionError("unreachable")


def recover(study: optuna.Study, *, owned: bool) -> int:
    """Before a (resumed) run: trials left RUNNING by a dead process are failed, and every
    failed trial not yet retried is queued again with its parameters. ``owned``: the storage
    is this OUT's own, under its lock, so any running trial is stale now; a shared storage
    relies on heartbeats. Returns how many trials were failed here."""
    n = 0
    if owned:
        storage = study._storage
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            tid = storage.get_trial_id_from_study_id_trial_number(study._study_id, t.number)
            try:
                storage.set_trial_state_values(tid, state=TrialState.FAIL)
                n += 1
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
    else:
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    retried = {x for t in trials for x in t.system_attrs.get("retry_history", [])}
    for t in trials:
        if t.state == TrialState.FAIL and t.number not in retried \
                and "failed_trial" not in t.system_attrs:
            _retry(study, t)
    return n


def settle(study: optuna.Study, say: Callable[[str], None] | None = None,
           poll_s: float = 2.0) -> None:
    """Wait until no trial of the study is running (other workers finishing theirs; a dead
    worker's trial is failed by its missing heartbeat), so every worker then ranks the same
    set of trials."""
    told = False
    while True:
        optuna.storages.fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        if say and not told:
            say(f"waiting for {len(running)} running trial(s) of other workers")
            told = True
        time.sleep(poll_s)


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
        self.sync()
        if self.records:
            log.info("resumed study %s: %d trials", self.study.study_name, len(self.records))

    def sync(self) -> None:
        """The records are the study's finished trials, every worker's, in trial order (their
        measurements go into the evaluator's cache, so no plan is measured twice)."""
        self.records = []
        done = (TrialState.COMPLETE, TrialState.PRUNED)
        for t in sorted(self.study.get_trials(deepcopy=False, states=done),
                        key=lambda t: t.number):
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

    @property
    def best(self) -> TrialRecord | None:
        ok = [r for r in self.records if r.feasible]
        return max(ok, key=lambda r: (r.metrics.score, -r.ratio_llm)) if ok else None

    def choose(self) -> TrialRecord | None:
        """The plan to ship: ``choose`` over the records (all workers' after ``sync``)."""
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
        if ok or probe:
            self._shared(steps)
        m = self.evaluator.evaluate(steps) if (ok or probe) else None
        attrs = {"source": source, "steps": json.dumps(steps), "counts": list(cand.counts),
                 "ratio_llm": f["ratio_llm"], "ratio_total": f["ratio_total"], "within": ok,
                 "size_ratio": f["size_ratio"], "worker": WORKER,
                 "metrics": {"accuracy": m.accuracy, "agreement": m.agreement, "kl": m.kl}
                 if m else None,
                 # flat copies, one column each in optuna-dashboard's trial table
                 **({"fidelity": m.fidelity, "accuracy": m.accuracy, "agreement": m.agreement,
                     "kl": m.kl} if m else {})}
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

    def _shared(self, steps: list) -> None:
        """A plan another worker of the study measured since the last ``sync`` is taken from
        the study, not measured again."""
        from vlmopt.search.evaluator import plan_hash

        if plan_hash(steps) in self.evaluator.results:
            return
        blob = json.dumps(steps)
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            a = t.user_attrs
            if a.get("metrics") and a.get("steps") == blob:
                self.evaluator.remember(steps, Metrics(**a["metrics"]))
                return

    def counts(self) -> dict:
        """Trials of the study by outcome (a failed trial is one a kill interrupted; it was
        queued again with its parameters) and, under ``workers``, how many each process ran."""
        out: dict = {"evaluated": 0, "rejected_over_target": 0, "interrupted": 0}
        workers: dict[str, int] = {}
        for t in self.study.get_trials(deepcopy=False):
            if t.state == TrialState.FAIL:
                out["interrupted"] += 1
            elif t.user_attrs.get("metrics"):
                out["evaluated"] += 1
            elif t.state.is_finished():
                out["rejected_over_target"] += 1
            if t.state.is_finished() and t.state != TrialState.FAIL:
                w = t.user_attrs.get("worker", "?")
                workers[w] = workers.get(w, 0) + 1
        out["workers"] = workers
        return out
