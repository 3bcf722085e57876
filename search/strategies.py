"""Search strategies (shared/methods.md section 9): G-Search, P-Sigmoid and the joint search.

All work through ``study.Context``: a candidate's FLOPs are checked against the target before
it is evaluated; every measurement is an optuna trial.
"""

from __future__ import annotations

import logging

import optuna
from vlmopt.search.space import Candidate, sigmoid_counts, snap
from vlmopt.search.study import WORKER, Context, TrialRecord

log = logging.getLogger(__name__)

# G-Search's grid of keep fractions (of the tokens entering the LLM), coarse to fine.
GRID = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.1875, 0.125, 0.09375, 0.0625, 0.03125, 0.0)


def gsearch(ctx: Context, *, tolerance: float = 0.01) -> TrialRecord:
    """Greedy, shallow to deep: at each layer the fewest visual tokens such that, with every
    deeper layer at that count too, calibration fidelity stays within ``tolerance`` of the
    original's; binary search over GRID (fidelity assumed monotone in the count). Then cut to
    the FLOPs budget by scaling the schedule down if it is over."""
    sp = ctx.space
    N, L = sp.n_visual, sp.n_layers
    full = Candidate(tuple([N] * L))
    perf0 = ctx.measure(full, "gsearch", probe=True).metrics.fidelity
    counts = [N] * L
    for layer in range(1, L):
        options = [g for g in GRID if round(N * g) <= counts[layer - 1]]
        lo, hi = 0, len(options) - 1  # options[lo] known good (the previous count)
        while lo < hi:  # find the last good option (fewest tokens)
            mid = (lo + hi + 1) // 2
            c = round(N * options[mid])
            cand = Candidate(tuple(counts[:layer] + [c] * (L - layer)))
            m = ctx.measure(cand, "gsearch", probe=True).metrics
            if m.fidelity >= perf0 - tolerance:
                lo = mid
            else:
                hi = mid - 1
        counts[layer:] = [round(N * options[lo])] * (L - layer)
        log.info("gsearch: layer %d keeps %d", layer, counts[layer])
    cand = Candidate(tuple(counts))
    if not ctx.feasible(cand):  # cut to the budget: scale the schedule after layer 0
        s = ctx.space.fit(lambda x: Candidate(snap([N] + [c * x for c in counts[1:]], N,
                                                   "none")), 0.0, 1.0, ctx.target, ctx.scope)
        if s is not None:
            cand = Candidate(snap([N] + [c * s for c in counts[1:]], N, "none"))
        else:  # even layer 0 must shrink: select before the LLM, same shape
            sel = sp.default_select
            s = ctx.space.fit(lambda x: Candidate(snap([c * x for c in counts], N, sel), sel),
                              0.0, 1.0, ctx.target, ctx.scope)
            cand = Candidate(snap([c * (s or 0.0) for c in counts], N, sel), sel)
    return ctx.measure(cand, "gsearch")


def _solve_l0(ctx: Context, build) -> Candidate | None:
    """The sigmoid's midpoint that spends the budget: the largest l0 that fits."""
    L = ctx.space.n_layers
    l0 = ctx.space.fit(build, -float(L), 2.0 * L, ctx.target, ctx.scope)
    return None if l0 is None else build(l0)


def psigmoid(ctx: Context, n_trials: int, *, source: str = "psigmoid") -> TrialRecord | None:
    """P-Sigmoid: r(l) = r_min + (1 - r_min) / (1 + exp(k (l - l0))); optuna tunes (k, r_min)
    and l0 is solved so the plan meets the budget exactly (methods.md 9.2, option a)."""
    sp = ctx.space
    N, L = sp.n_visual, sp.n_layers
    n_start = N
    if not ctx.feasible(Candidate(tuple([N] + [0] * (L - 1)))):  # layer 0 alone is over
        n_start = sp.fit(lambda c: Candidate(tuple([c] + [0] * (L - 1)), sp.default_select),
                         1, N, ctx.target, ctx.scope, integer=True) or 1
    select = "none" if n_start == N else sp.default_select

    def objective(trial: optuna.Trial) -> float:
        k = trial.suggest_float("k", 0.3, 12.0, log=True)
        r_min = trial.suggest_float("r_min", 0.0, 0.6)
        cand = _solve_l0(ctx, lambda l0: Candidate(snap(sigmoid_counts(L, n_start, k, l0, r_min),
                                                        N, select), select))
        return _finish(ctx, trial, cand, source)

    _optimize(ctx, objective, n_trials, source, seeds=[{"k": 8.0, "r_min": 0.0},
                                                       {"k": 1.0, "r_min": 0.1}])
    return ctx.best


def joint(ctx: Context, n_trials: int, *, freeze_order: list[str],
          select_methods: tuple[str, ...] | None = None,
          max_frozen_frac: float = 0.6) -> TrialRecord | None:
    """Token schedule + where visual tokens are selected before the LLM + ShortV layers, searched
    together: select method (the space's ``select_methods`` by default) and keep
    fraction, sigmoid (k, r_min) with l0 solved for the budget, the number of frozen layers
    (lowest Layer Contribution first) and the scorer."""
    sp = ctx.space
    N, L = sp.n_visual, sp.n_layers
    max_frozen = round(L * max_frozen_frac)
    select_methods = select_methods or sp.select_methods

    def objective(trial: optuna.Trial) -> float:
        select = trial.suggest_categorical("select", list(select_methods))
        frac = trial.suggest_float("keep0", 0.02, 1.0) if select != "none" else 1.0
        k = trial.suggest_float("k", 0.3, 12.0, log=True)
        r_min = trial.suggest_float("r_min", 0.0, 1.0)
        n_frozen = trial.suggest_int("frozen", 0, max_frozen)
        scorer = trial.suggest_categorical("scorer", ["last_query", "text_mean"])
        n0 = N if select == "none" else max(1, round(N * frac))
        frozen = tuple(freeze_order[:n_frozen])
        extra = _weight_steps(ctx, trial) if ctx.target_size is not None else ()

        def build(l0):
            counts = snap(sigmoid_counts(L, n0, k, l0, r_min), N, select)
            return Candidate(counts, select, frozen, scorer, extra=extra)

        return _finish(ctx, trial, _solve_l0(ctx, build), "joint")

    base = {"k": 1.0, "frozen": 0, "scorer": "last_query"}
    if ctx.target_size is not None:  # seeds start from CASP's setting: Q/K at 25%, int8
        base.update(qk=0.25, bits=8)
    seeds = [{"select": "none", "k": 8.0, "r_min": 0.0, "frozen": 0, "scorer": "last_query"},
             {"select": "none", "k": 2.0, "r_min": 0.1, "frozen": max_frozen // 2,
              "scorer": "text_mean"}]
    for method in select_methods[1:]:  # each input-level method at the most tokens that fit
        # ... alone, and with the 2 or 4 lowest-contribution layers frozen (ShortV), which
        # frees budget for more tokens everywhere
        for n_frozen in (0, 2, 4)[:1 + 2 * (max_frozen >= 2)]:
            frozen = tuple(freeze_order[:min(n_frozen, max_frozen)])

            def flat(c, method=method, frozen=frozen):
                return Candidate(snap([c] * L, N, method), method, frozen)

            c = sp.fit(flat, 1, N, ctx.target, ctx.scope, integer=True)
            if c is None:
                continue
            c = flat(c).counts[0]
            seeds.append({**base, "select": method, "keep0": max(0.02, c / N), "r_min": 1.0,
                          "frozen": len(frozen)})
            if not n_frozen:
                seeds.append({**base, "select": method, "keep0": min(1.0, 2 * c / N),
                              "k": 2.0, "r_min": 0.1})
    _optimize(ctx, objective, n_trials, "joint", seeds=seeds)
    return ctx.best


QK_RATIOS = (1.0, 0.5, 0.25)  # fraction of W_q/W_k parameters kept (CASP: 0.25)
BITS = (16, 8, 4)  # decoder weight bits; 16 = left in floating point


def _weight_steps(ctx: Context, trial: optuna.Trial) -> tuple:
    """Q/K rank and weight bits for the joint search under a size target (section 8)."""
    qk = trial.suggest_categorical("qk", list(QK_RATIOS))
    bits = trial.suggest_categorical("bits", list(BITS))
    steps = []
    if qk < 1.0:
        steps.append(("lowrank_qk", {"q_ratio": {"_default": qk}, "k_ratio": {"_default": qk},
                                     "calib": ctx.calib}))
    if bits < 16:
        steps.append(("quantize", {"bits": {"_default": bits}, "group_size": 64}))
    return tuple(steps)


def _finish(ctx: Context, trial: optuna.Trial, cand: Candidate | None, source: str) -> float:
    if cand is None:  # no midpoint fits the budget with these parameters: nothing evaluated
        trial.set_user_attr("source", source)
        trial.set_user_attr("infeasible", True)
        trial.set_user_attr("worker", WORKER)
        raise optuna.TrialPruned("over the FLOPs target at every l0")
    rec = ctx.measure(cand, source, trial)
    if rec.metrics is None:
        raise optuna.TrialPruned("over the FLOPs target")
    return rec.metrics.score


def _optimize(ctx: Context, objective, n_trials: int, source: str, seeds: list[dict]) -> None:
    """``n_trials`` finished trials of ``source`` in the study, counted over every worker (a
    resumed or a second worker runs only what is left); the seeds are queued once."""
    ok = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    trials = ctx.study.get_trials(deepcopy=False)
    # only the process that created the study (or owns it: OUT's own, under its lock) queues
    # the seeds: workers starting together would queue them twice
    if ctx.study.user_attrs.get("seeder", WORKER) == WORKER and not any(
            t.user_attrs.get("source") == source or "fixed_params" in t.system_attrs
            for t in trials):
        for s in seeds:
            ctx.study.enqueue_trial(s, skip_if_exists=True)

    def finished(study) -> int:
        return sum(1 for t in study.get_trials(deepcopy=False, states=ok)
                   if t.user_attrs.get("source") == source)

    def enough(study, _trial) -> None:
        if finished(study) >= n_trials:
            study.stop()

    left = n_trials - finished(ctx.study)
    if left > 0:
        ctx.study.optimize(objective, n_trials=left, catch=(), callbacks=[enough])
