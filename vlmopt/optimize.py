"""``vlmopt optimize``: search the plan with the best calibration fidelity under a FLOPs target,
then measure it against the published methods at the same FLOPs and write the package.

    load -> calibration batches -> Layer Contribution -> search -> chosen plan (verified)
         -> baselines at the same FLOPs -> held-out evaluation -> latency -> emit -> report

OUT holds, while a run is in progress, only its resume state (``.vlmopt-run.json`` and the
SQLite study); the results appear all at once when the run finishes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vlmopt.errors import VlmoptError
from vlmopt.frontend.builtins import SYNTHVQA_MODELS

log = logging.getLogger(__name__)
STRATEGIES = ("joint", "gsearch", "psigmoid")
RUN_FILE = ".vlmopt-run.json"
STUDY_FILE = "study.db"


@dataclass
class Options:
    model: str
    target: float
    out: Path
    calib: str | None = None
    eval: str | None = None
    strategy: str = "joint"
    trials: int = 40
    seed: int = 0
    storage: str | None = None
    study: str | None = None
    scope: str = "llm"
    objective: str = "auto"  # auto | accuracy | agreement
    target_size: str | None = None  # weight bytes: a ratio "0.5" or bytes "4MB"; joint only
    calib_limit: int | None = None
    search_samples: int | None = 256  # trials are measured on this many calibration samples
    finalists: int = 8  # ... and the best this many again on all of them (None/0: no re-rank)
    eval_limit: int | None = None
    tolerance: float = 0.01  # G-Search: fidelity drop allowed per layer decision
    batch_size: int = 32
    emit: bool = True
    extra: dict = field(default_factory=dict)

    def signature(self, fingerprint: str) -> dict:
        """What must match for a re-run to resume this run's study."""
        return {"model": fingerprint, "target": self.target, "scope": self.scope,
                "target_size": self.target_size,
                "calib": self.calib, "calib_limit": self.calib_limit,
                "search_samples": self.search_samples,
                "strategy": self.strategy, "seed": self.seed, "objective": self.objective,
                "tolerance": self.tolerance}


def _default_data(model: str, data: str | None, split: str) -> str | None:
    if data:
        return data
    return f"builtin:synthvqa-{split}" if model in SYNTHVQA_MODELS else None


def prepare_out(opts: Options, fingerprint: str) -> tuple[str, bool]:
    """Check OUT and return (storage URL, resuming). Creates nothing."""
    out = opts.out
    sig = opts.signature(fingerprint)
    run_file = out / RUN_FILE
    resuming = False
    if out.exists():
        if not out.is_dir():
            raise VlmoptError(f"--out {out}: exists and is not a directory")
        if (out / "plan.json").exists():
            raise VlmoptError(f"--out {out}: holds a finished optimization (nothing overwritten)")
        if run_file.exists():
            old = json.loads(run_file.read_text())
            diff = [k for k in sig if old.get(k) != sig[k]]
            if diff:
                raise VlmoptError(f"--out {out}: holds an unfinished run with other settings "
                                  f"({', '.join(diff)}); use another --out")
            resuming = True
        elif any(out.iterdir()):
            raise VlmoptError(f"--out {out}: exists and is not empty (nothing overwritten)")
    storage = opts.storage or f"sqlite:///{(out / STUDY_FILE).resolve()}"
    return storage, resuming


def study_name(opts: Options, fingerprint: str) -> str:
    if opts.study:
        return opts.study
    blob = json.dumps(opts.signature(fingerprint), sort_keys=True)
    return "vlmopt-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def _parse_size(spec: str) -> tuple[float, str]:
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(spec))
    if not m or m.group(2).upper() not in _UNITS:
        raise VlmoptError(f"--target-size must be a ratio like 0.5 or a size like 4MB, "
                          f"got {spec!r}")
    return float(m.group(1)), m.group(2).upper()


def size_ratio(spec: str, original_bytes: int) -> float:
    """``--target-size``: a ratio in (0, 1] of the original weight bytes, or a byte count with
    an optional unit (4MB, 2.5GiB)."""
    value, unit = _parse_size(spec)
    ratio = value if (not unit and value <= 1) else value * _UNITS[unit] / original_bytes
    if not 0 < ratio <= 1:
        raise VlmoptError(f"--target-size {spec} is {ratio:.3f} of the original "
                          f"{original_bytes / 1e6:.2f} MB of weights; it must lie in (0, 1]")
    return ratio


def optimize(opts: Options, progress: Callable | None = None,
             stage: Callable[[str], None] | None = None) -> dict:
    """Run the whole job; returns the report's data. ``stage(msg)`` announces each step."""
    from vlmopt.analysis import layer_contribution, rank_layers
    from vlmopt.data.dataset import load_records
    from vlmopt.frontend.load import load, resolve_model
    from vlmopt.plan import Plan
    from vlmopt.search import baselines, strategies
    from vlmopt.search.evaluator import Evaluator
    from vlmopt.search.space import Space
    from vlmopt.search.study import Context, choose, finalists, open_study

    say = stage or (lambda msg: log.info(msg))
    t_start = time.perf_counter()
    if not 0 < opts.target <= 1:
        raise VlmoptError(f"--target-flops must lie in (0, 1], got {opts.target}")
    if opts.strategy not in STRATEGIES:
        raise VlmoptError(f"--strategy must be one of {', '.join(STRATEGIES)}")
    if opts.target_size is not None:
        _parse_size(opts.target_size)  # a malformed flag fails before anything is loaded
    if opts.target_size is not None and opts.strategy != "joint":
        raise VlmoptError("--target-size needs --strategy joint (the search over Q/K rank and "
                          "bits)")
    resolve_model(opts.model)
    opts.calib = _default_data(opts.model, opts.calib, "calib")
    opts.eval = _default_data(opts.model, opts.eval, "test")
    if opts.calib is None:
        raise VlmoptError(f"--calib is required for model {opts.model}")
    calib = load_records(opts.calib, limit=opts.calib_limit)
    if not calib:
        raise VlmoptError(f"--calib {opts.calib}: no records")
    labelled = all(r.answer is not None for r in calib)
    if opts.objective == "accuracy" and not labelled:
        raise VlmoptError(f"--calib {opts.calib}: the accuracy objective needs an 'answer' on "
                          "every record (use --objective agreement)")
    held = load_records(opts.eval, limit=opts.eval_limit) if opts.eval else []

    say(f"loading {opts.model}")
    lm = load(opts.model)
    if lm.processor is None:
        raise VlmoptError(f"{opts.model}: no processor files; optimize needs them")
    storage, resuming = prepare_out(opts, lm.fingerprint)
    # Racing: every trial is measured on the first ``search_samples`` calibration samples
    # (cheap, but one answer is 1/256 of fidelity), the finalists again on all of them.
    n_screen = min(len(calib), opts.search_samples or len(calib))
    rerank = n_screen < len(calib) and bool(opts.finalists)
    if not rerank:
        n_screen = len(calib)
    say(f"encoding {n_screen} calibration samples for the search"
        + (f" (finalists: all {len(calib)})" if rerank else ""))
    evaluator = Evaluator(lm, calib[:n_screen], batch_size=opts.batch_size)
    if opts.objective == "agreement":
        evaluator.labelled = False
    space = Space(lm, evaluator.n_text, evaluator)
    space.check_target(opts.target, opts.scope)
    size = None
    if opts.target_size is not None:
        size = size_ratio(opts.target_size, space.base["weight_bytes"])
        smallest = space.flops([("lowrank_qk", {"q_ratio": {"_default": 0.25},
                                                "k_ratio": {"_default": 0.25},
                                                "calib": opts.calib}),
                                ("quantize", {"bits": {"_default": 4}})])["size_ratio"]
        if size < smallest:
            raise VlmoptError(f"--target-size {opts.target_size} is below what the search can "
                              f"reach: the minimum is {smallest:.3f} of the original weight "
                              "bytes (Q/K at 25%, every decoder linear at 4 bits)")

    created = not opts.out.exists()
    opts.out.mkdir(parents=True, exist_ok=True)
    try:
        study = open_study(storage, study_name(opts, lm.fingerprint), opts.seed)
    except VlmoptError:
        if created:
            shutil.rmtree(opts.out, ignore_errors=True)
        raise
    (opts.out / RUN_FILE).write_text(json.dumps(opts.signature(lm.fingerprint), indent=2))
    if resuming:
        say(f"resuming the study in {storage}")

    say("Layer Contribution per layer")
    lc = layer_contribution(lm, calib[:64], batch_size=opts.batch_size)
    order = rank_layers(lc)

    say(f"searching ({opts.strategy})")
    ctx = Context(study, evaluator, space, opts.target, opts.scope, progress,
                  target_size=size, calib=opts.calib)
    if opts.strategy == "gsearch":
        strategies.gsearch(ctx, tolerance=opts.tolerance)
    elif opts.strategy == "psigmoid":
        strategies.psigmoid(ctx, opts.trials)
    else:
        strategies.joint(ctx, opts.trials, freeze_order=order)
    best = ctx.choose()
    if best is None:
        raise VlmoptError(f"no plan within --target-flops {opts.target} was found")
    n_search = evaluator.n_evaluated
    final, finals = evaluator, []
    if rerank:
        fin = finalists(ctx.records, opts.finalists)
        say(f"re-ranking the {len(fin)} best plans on all {len(calib)} calibration samples")
        final = Evaluator(lm, calib, batch_size=opts.batch_size)
        final.labelled = evaluator.labelled
        reranked = [dataclasses.replace(r, metrics=final.evaluate(r.steps)) for r in fin]
        finals = [{"number": r.number, "steps": r.steps, "ratio_llm": r.ratio_llm,
                   "search": s.metrics.to_json(), "all": r.metrics.to_json()}
                  for r, s in zip(reranked, fin)]
        best = choose(reranked, len(calib))
    t_search = time.perf_counter() - t_start

    say("verifying the chosen plan")
    from vlmopt.pipeline import make_config

    chosen = evaluator.build(best.steps, verify=True)
    plan = Plan(lm.name, lm.fingerprint, [(n, make_config(n, f)) for n, f in best.steps],
                target={"flops": opts.target, "scope": opts.scope,
                        **({"size": size} if size is not None else {})},
                provenance={"search": opts.strategy, "seed": opts.seed,
                            "objective": "accuracy" if evaluator.labelled else "agreement",
                            "calib": opts.calib, "trials": len(ctx.records),
                            "study": study.study_name})

    compression = _compression(chosen)

    say("baselines at the same FLOPs")
    rows = [{"method": "original", "steps": [], "ratio_llm": 1.0, "ratio_total": 1.0,
             "calib": final.evaluate([]).to_json()},
            {"method": f"vlmopt ({opts.strategy})", "steps": best.steps,
             "ratio_llm": best.ratio_llm, "ratio_total": best.ratio_total,
             "calib": best.metrics.to_json()}]
    for name, cand in baselines.at_target(space, opts.target, opts.scope):
        if cand is None:
            rows.append({"method": name, "steps": None, "unreachable": True})
            continue
        steps = space.steps_of(cand)
        f = space.flops(steps)
        rows.append({"method": name, "steps": steps, "ratio_llm": f["ratio_llm"],
                     "ratio_total": f["ratio_total"],
                     "calib": final.evaluate(steps).to_json()})
    if held:
        say(f"held-out evaluation on {len(held)} samples of {opts.eval}")
        held_ev = Evaluator(lm, held, batch_size=opts.batch_size)
        for r in rows:
            if r.get("steps") is not None:
                r["eval"] = held_ev.evaluate(r["steps"]).to_json()
        del held_ev

    say("measuring prefill latency")
    from vlmopt.compare import prefill_latency

    lat = prefill_latency({"original": evaluator.base, "chosen": chosen}, evaluator.batches[0])
    result = {
        "model": lm.name, "fingerprint": lm.fingerprint, "target": opts.target,
        "target_size": size,
        "scope": opts.scope, "strategy": opts.strategy, "seed": opts.seed,
        "calib": opts.calib, "n_calib": len(calib), "n_search": n_screen,
        "finalists": finals,
        "eval": opts.eval, "n_eval": len(held),
        "n_text": evaluator.n_text, "n_visual": space.n_visual, "n_layers": space.n_layers,
        "plan": plan.to_json(), "chosen": best.to_json(),
        "flops": {k: v for k, v in space.flops(best.steps).items()},
        "original_flops": space.base,
        "layer_contribution": lc, "freeze_order": order, "compression": compression,
        "trials": [r.to_json() for r in ctx.records], "trial_counts": ctx.counts(),
        "methods": rows,
        "latency_s": lat, "latency_ratio": lat["chosen"] / lat["original"],
        "search_seconds": t_search, "search_evaluations": n_search,
        "evaluations": evaluator.n_evaluated + (final.n_evaluated if rerank else 0),
    }
    _publish(opts, lm, chosen, plan, result, calib, say)
    result["seconds"] = time.perf_counter() - t_start
    return result


def _compression(gm) -> dict:
    """Per decoder layer of the chosen graph: Q/K ranks (None = dense) and weight bits."""
    from vlmopt.ir.capture import decoder_nodes

    out = {}
    for n in decoder_nodes(gm):
        m = n.meta["vlmopt"]
        out[n.name] = {"q_rank": m.get("q_rank"), "k_rank": m.get("k_rank"),
                       "bits": sorted(set(m.get("bits", {}).values()))}
    return out


def _publish(opts: Options, lm, chosen, plan, result: dict, calib, say) -> None:
    """Write every output into a temp dir inside OUT, then move them in; the run file goes."""
    from vlmopt import report

    tmp = Path(tempfile.mkdtemp(prefix=".publish.", dir=opts.out))
    try:
        plan.save(tmp / "plan.json")
        if opts.emit:
            try:
                from vlmopt.emit import emit
            except ImportError:
                emit = None
                result["artifact"] = "ONNX export not available in this build"
            if emit is not None:
                say("exporting ONNX and checking parity")
                (tmp / "artifact").mkdir()
                manifest = emit(lm, chosen, tmp / "artifact", calib)
                for p in (tmp / "artifact").iterdir():
                    p.rename(tmp / p.name)
                (tmp / "artifact").rmdir()
                result["artifact"] = {"graphs": list(manifest.get("graphs", {}))}
        say("writing the report")
        report.write(result, tmp)
        # NOTE: plan.json marks a finished run, so it moves in last
        for p in sorted(tmp.iterdir(), key=lambda p: p.name == "plan.json"):
            p.rename(opts.out / p.name)
        tmp.rmdir()
        (opts.out / RUN_FILE).unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
