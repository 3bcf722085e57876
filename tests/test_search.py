"""Search strategies on a toy objective with a known optimum, the prefix-caching evaluator
against plain runs, and baselines at the same FLOPs."""

from __future__ import annotations

import dataclasses
import math

import optuna
import pytest
import torch
from vlmopt.search import baselines, strategies
from vlmopt.search.evaluator import Evaluator, Metrics
from vlmopt.search.space import (
    SEARCH_SELECT,
    Space,
    counts_of,
    sigmoid_counts,
    snap,
)
from vlmopt.search.study import Context, open_study

N, L = 64, 8
NEED = [64, 48, 32, 16, 16, 8, 8, 4]  # toy: fidelity holds iff every layer keeps >= NEED


class ToySpace(Space):
    """Cost = mean fraction of visual tokens over layers (no fixed part)."""

    def __init__(self):
        self.n_visual, self.n_layers, self._ratios = N, L, {}
        self.dynamic, self.default_select = False, "visionzip"
        self.select_methods = SEARCH_SELECT
        self.has_cls, self.score = True, None
        self.base = self.flops([])

    def flops(self, steps):
        c = counts_of(steps, N, L)
        r = sum(c) / (N * L)
        return {"total": r, "llm": r, "ratio_total": r, "ratio_llm": r, "per_node": {},
                "size_ratio": 1.0,
                "visual_tokens_per_layer": c}

    def minimum(self, scope):
        return 1 / (N * L)


class ToyEvaluator:
    def __init__(self):
        self.results, self.n_evaluated = {}, 0

    def evaluate(self, steps):
        from vlmopt.search.evaluator import plan_hash

        key = plan_hash(steps)
        if key not in self.results:
            self.n_evaluated += 1
            c = counts_of(steps, N, L)
            short = sum(max(0, need - have) for need, have in zip(NEED, c))
            self.results[key] = Metrics(accuracy=max(0.0, 0.9 - 0.002 * short),
                                        agreement=1.0, kl=0.0)
        return self.results[key]

    def remember(self, steps, m):
        from vlmopt.search.evaluator import plan_hash

        self.results[plan_hash(steps)] = m


def _ctx(tmp_path, target, name="s"):
    study = open_study(f"sqlite:///{tmp_path / 'study.db'}", name, seed=0)
    return Context(study, ToyEvaluator(), ToySpace(), target, "llm")


def test_gsearch_finds_the_fewest_tokens_per_layer_that_hold_fidelity(tmp_path):
    ctx = _ctx(tmp_path, target=1.0)
    best = strategies.gsearch(ctx, tolerance=0.0)
    # the grid's smallest count >= NEED at each layer, non-increasing
    grid = sorted({round(N * g) for g in strategies.GRID})
    expect = [min(g for g in grid if g >= n) for n in NEED]
    assert best.counts == expect, (best.counts, expect)
    assert best.metrics.fidelity == pytest.approx(0.9)
    # binary search: far fewer evaluations than the grid times the layers
    assert ctx.evaluator.n_evaluated < L * len(strategies.GRID) / 2


def test_gsearch_cuts_to_the_budget_when_fidelity_alone_is_too_expensive(tmp_path):
    ctx = _ctx(tmp_path, target=0.3)
    best = strategies.gsearch(ctx, tolerance=0.0)
    assert best.feasible and best.ratio_llm <= 0.3
    assert best.ratio_llm > 0.3 - 2 / N  # the budget is spent, not wasted


def test_psigmoid_meets_the_budget_and_finds_a_schedule_near_the_toy_optimum(tmp_path):
    target = sum(NEED) / (N * L) + 0.02
    ctx = _ctx(tmp_path, target)
    best = strategies.psigmoid(ctx, n_trials=30)
    assert best.ratio_llm <= target + 1e-12
    for r in ctx.records:  # every evaluated trial is within the target
        assert r.metrics is None or r.ratio_llm <= target + 1e-12
    assert best.metrics.fidelity >= 0.85, best.counts


def test_sigmoid_schedule_is_non_increasing_and_keeps_layer_0():
    c = sigmoid_counts(8, 100, k=2.0, l0=3.5, r_min=0.1)
    assert c[0] == 100 and all(a >= b for a, b in zip(c, c[1:])) and c[-1] >= 10
    assert snap([5, 9, 3], 8, "pool") == (4, 4, 3)


def test_joint_search_beats_or_matches_its_seeds_and_records_infeasible_trials(tmp_path):
    ctx = _ctx(tmp_path, target=0.25)
    best = strategies.joint(ctx, n_trials=20, freeze_order=[f"layer_{i}" for i in range(L)])
    seeds = [r for r in ctx.records[:5] if r.feasible]
    assert best.metrics.score >= max(r.metrics.score for r in seeds)
    assert best.ratio_llm <= 0.25 + 1e-12
    states = {t.state for t in ctx.study.get_trials()}
    assert optuna.trial.TrialState.COMPLETE in states


def test_a_reopened_study_resumes_without_reevaluating(tmp_path):
    def finished(c):
        return sum(t.state.is_finished() for t in c.study.get_trials())

    ctx = _ctx(tmp_path, target=0.3)
    strategies.psigmoid(ctx, n_trials=6)
    first = len(ctx.records)
    assert finished(ctx) == 6 and first >= 1
    again = _ctx(tmp_path, target=0.3)  # same storage and name: the records come back
    assert len(again.records) == first
    assert again.evaluator.results == ctx.evaluator.results
    strategies.psigmoid(again, n_trials=6)  # already done: nothing new
    assert again.evaluator.n_evaluated == 0 and len(again.records) == first
    strategies.psigmoid(again, n_trials=9)
    assert finished(again) == 9


def test_baselines_spend_at_most_the_budget_and_one_more_token_would_exceed_it(loaded_tiny):
    sp = Space(loaded_tiny, n_text=20)
    for name, cand in baselines.at_target(sp, 0.4, "llm"):
        if cand is None:
            continue
        r = sp.ratio(cand, "llm")
        assert r <= 0.4, name
        if cand.select in ("divprune", "visionzip", "random"):
            bigger = dataclasses.replace(cand, counts=snap(
                [cand.counts[0] + 1] * sp.n_layers, sp.n_visual, cand.select))
            assert sp.ratio(bigger, "llm") > 0.4, name


def test_target_below_the_minimum_names_the_minimum(loaded_tiny):
    from vlmopt.errors import VlmoptError

    sp = Space(loaded_tiny, n_text=20)
    low = sp.minimum("total")
    with pytest.raises(VlmoptError, match=f"minimum total prefill FLOPs ratio is {low:.3f}"):
        sp.check_target(low / 2, "total")
    assert 0 < sp.minimum("llm") < low


def test_cached_evaluation_equals_a_plain_run_of_each_graph(loaded_tiny, synth_data):
    from vlmopt.data.dataset import load_records
    from vlmopt.ir.capture import INPUTS

    recs = load_records(synth_data)
    ev = Evaluator(loaded_tiny, recs, batch_size=4)
    plans = [[("drop_tokens", {"keep": {"layer_1": 50}})],
             [("drop_tokens", {"keep": {"layer_1": 20}})],
             [("select_visual", {"method": "divprune", "keep": 36})],
             [("select_visual", {"method": "divprune", "keep": 36}),
              ("drop_tokens", {"keep": {"layer_1": 9}})],
             [("freeze_visual", {"layers": ["layer_1"]})]]
    for steps in plans:
        cached = ev._run(ev.build(steps))
        gm = ev.build(steps)
        with torch.no_grad():
            plain = [gm(*(b[k] for k in INPUTS)).float() for b in ev.batches]
        for a, b in zip(cached, plain):
            assert torch.equal(a, b), steps
    assert ev.cache.hits > 0  # the shared prefix (vision, layer_0) came from the cache
    m = ev.evaluate([])
    assert m.agreement == 1.0 and m.kl == 0.0 and m.accuracy is not None
    assert math.isfinite(ev.evaluate(plans[1]).kl)


def test_choose_takes_the_lowest_kl_within_one_calibration_answer_of_the_best():
    from vlmopt.search.evaluator import Metrics
    from vlmopt.search.study import TrialRecord, choose

    def rec(i, acc, kl, within=True):
        return TrialRecord(i, "joint", [], [], 0.3, 0.4, Metrics(acc, 1.0, kl), within)

    n = 100  # one answer = 0.01
    recs = [rec(0, 0.90, 0.05), rec(1, 0.89, 0.02), rec(2, 0.88, 0.001),
            rec(3, 0.95, 0.0, within=False)]
    assert choose(recs, n).number == 1  # within one answer, lower KL; 2 is two answers down
    assert choose(recs[:1] + recs[2:], n).number == 0
    assert choose([rec(4, 0.5, 0.0, within=False)], n) is None


def test_finalists_are_the_best_distinct_feasible_plans_by_screening_score():
    from vlmopt.search.evaluator import Metrics
    from vlmopt.search.study import TrialRecord, finalists

    def rec(i, steps, acc, kl, within=True, metrics=True):
        return TrialRecord(i, "joint", steps, [], 0.3, 0.4,
                           Metrics(acc, 1.0, kl) if metrics else None, within)

    a = [("select_visual", {"method": "divprune", "keep": 50})]
    b = [("select_visual", {"method": "divprune", "keep": 40})]
    c = [("select_visual", {"method": "pool", "keep": 49})]
    recs = [rec(0, a, 0.90, 0.05), rec(1, a, 0.90, 0.05),  # the same plan twice (a resume)
            rec(2, b, 0.90, 0.01), rec(3, c, 0.80, 0.0), rec(4, [], 0.99, 0.0, within=False),
            rec(5, [], 0.0, 0.0, metrics=False)]
    assert [r.number for r in finalists(recs, 2)] == [2, 0]  # equal fidelity: lower KL first
    assert [r.number for r in finalists(recs, 10)] == [2, 0, 3]
