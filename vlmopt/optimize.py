"""``vlmopt optimize``: search the plan with the best calibration fidelity under a FLOPs target,
then measure it against the published methods at the same FLOPs and write the package.

    load -> calibration batches -> Layer Contribution -> search -> chosen plan (verified)
         -> baselines at the same FLOPs -> held-out evaluation -> latency -> emit -> report

OUT holds, while a run is in progress, only its lock, its resume state (``.vlmopt-run.json``
and the SQLite study) and the results being staged; they are published by a journalled move when
the run finishes (vlmopt.outdir). Everything that can be checked without the model (flags, OUT,
the storage, the data files) is checked before it loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vlmopt import outdir
from vlmopt.data.defaults import builtin_default
from vlmopt.errors import VlmoptError

log = logging.getLogger(__name__)
STRATEGIES = ("joint", "gsearch", "psigmoid")
RUN_FILE = outdir.RUN
STUDY_FILE = outdir.STUDY


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
    fuse: bool = True  # fused ONNX Runtime contrib ops in the artifact (vlmopt.emit_fuse)
    extra: dict = field(default_factory=dict)

    def signature(self, fingerprint: str) -> dict:
        """What must match for a re-run to resume this run's study."""
        return {"model": fingerprint, "target": self.target, "scope": self.scope,
                "target_size": self.target_size,
                "calib": self.calib, "calib_limit": self.calib_limit,
                "search_samples": self.search_samples,
                "strategy": self.strategy, "seed": self.seed, "objective": self.objective,
                "tolerance": self.tolerance}


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
    from vlmopt.data.dataset import load_records
    from vlmopt.frontend.load import fingerprint, read_config, resolve_model
    from vlmopt.search.study import WORKER, check_storage, open_study, recover

    say = Stages(stage or (lambda msg: log.info(msg)))
    t_start = time.perf_counter()
    _check_flags(opts)
    path = resolve_model(opts.model)
    read_config(path)  # the family is known (or one error line) before anything else
    opts.calib = builtin_default(opts.model, opts.calib, "calib")
    opts.eval = builtin_default(opts.model, opts.eval, "test")
    if opts.calib is None:
        raise VlmoptError(f"--calib is required for model {opts.model}")
    fp = fingerprint(path)
    sig = opts.signature(fp)
    od = outdir.OutDir(opts.out)
    od.precheck()
    calib = load_records(opts.calib, limit=opts.calib_limit)
    if not calib:
        raise VlmoptError(f"--calib {opts.calib}: no records")
    labelled = all(r.answer is not None for r in calib)
    if opts.objective == "accuracy" and not labelled:
        raise VlmoptError(f"--calib {opts.calib}: the accuracy objective needs an 'answer' on "
                          "every record (use --objective agreement)")
    held = load_records(opts.eval, limit=opts.eval_limit) if opts.eval else []
    if opts.storage:
        check_storage(opts.storage)

    with od:  # one writer per OUT, from here to the end
        state = od.state(sig)
        if state == "publish":  # killed while moving a complete result in: finish the move
            say(f"finishing the publish of the interrupted run in {opts.out}")
            od.finish_publish()
            res = json.loads((opts.out / "report.json").read_text())
            res["seconds"] = time.perf_counter() - t_start
            return res
        owned = opts.storage is None
        storage = opts.storage or f"sqlite:///{(opts.out / STUDY_FILE).resolve()}"
        fresh_out = not any(p.name != outdir.LOCK for p in opts.out.iterdir())
        try:
            study = open_study(storage, study_name(opts, fp), opts.seed)
        except VlmoptError:
            if fresh_out:
                (opts.out / STUDY_FILE).unlink(missing_ok=True)
            raise
        if owned:  # OUT's own study, under its lock: this process is its only worker
            study.set_user_attr("seeder", WORKER)
        failed = recover(study, owned=owned)
        if state == "fresh":
            od.start(sig)
        else:
            say(f"resuming the study in {storage}"
                + (f" ({failed} interrupted trial(s) queued again)" if failed else ""))
        try:
            return _run(opts, od, study, calib, held, say, t_start, progress)
        except BaseException:
            if fresh_out and not _has_trials(study):  # nothing worth resuming: leave no trace
                (opts.out / STUDY_FILE).unlink(missing_ok=True)
                (opts.out / RUN_FILE).unlink(missing_ok=True)
            raise


class Stages:
    """``say(msg)`` that also times each step, from one announcement to the next:
    ``seconds`` {step: s}, in order (the report and ``examples/bench_optimize.py`` print it)."""

    def __init__(self, say: Callable[[str], None]):
        self.say, self.seconds = say, {}
        self.name, self.t = "checking the inputs", time.perf_counter()

    def __call__(self, msg: str) -> None:
        self.close()
        self.name = msg
        self.say(msg)

    def close(self) -> dict[str, float]:
        now = time.perf_counter()
        self.seconds[self.name] = self.seconds.get(self.name, 0.0) + now - self.t
        self.t = now
        return self.seconds


def _check_flags(opts: Options) -> None:
    import math

    if not (math.isfinite(opts.target) and 0 < opts.target <= 1):
        raise VlmoptError(f"--target-flops must lie in (0, 1], got {opts.target}")
    if opts.strategy not in STRATEGIES:
        raise VlmoptError(f"--strategy must be one of {', '.join(STRATEGIES)}")
    if not (math.isfinite(opts.tolerance) and 0 <= opts.tolerance <= 1):
        raise VlmoptError(f"--tolerance must lie in [0, 1], got {opts.tolerance}")
    if opts.target_size is not None:
        _parse_size(opts.target_size)  # a malformed flag fails before anything is loaded
    if opts.target_size is not None and opts.strategy != "joint":
        raise VlmoptError("--target-size needs --strategy joint (the search over Q/K rank and "
                          "bits)")


def _has_trials(study) -> bool:
    return bool(study.get_trials(deepcopy=False))


def _run(opts: Options, od, study, calib, held, say, t_start, progress) -> dict:
    from vlmopt.analysis import layer_contribution, rank_layers
    from vlmopt.frontend.load import load
    from vlmopt.plan import Plan
    from vlmopt.search import baselines, strategies
    from vlmopt.search.evaluator import Evaluator
    from vlmopt.search.space import Space
    from vlmopt.search.study import Context, choose, finalists, settle

    say(f"loading {opts.model}")
    lm = load(opts.model)
    if lm.processor is None:
        raise VlmoptError(f"{opts.model}: no processor files; optimize needs them")
    # Racing: every trial is measured on the first ``search_samples`` calibration samples
    # (cheap, but one answer is 1/256 of fidelity), the finalists again on all of them.
    n_screen = min(len(calib), opts.search_samples or len(calib))
    rerank = n_screen < len(calib) and bool(opts.finalists)
    if not rerank:
        n_screen = len(calib)
    # the FLOPs target is checked from the prompts' lengths and image sizes before any forward
    from collections import Counter

    from vlmopt.evaluation import image_size, mean_text_tokens

    screen = calib[:n_screen]
    sizes = {(h, w): n for (w, h), n in Counter(image_size(r) for r in screen).items()}
    Space(lm, mean_text_tokens(lm, screen, opts.batch_size), image_sizes=sizes).check_target(
        opts.target, opts.scope)
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
    if opts.storage:  # a shared study: every worker ranks the same, whole set of trials
        settle(study, say)
    ctx.sync()
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
        reranked = [dataclasses.replace(r, metrics=_rerank(study, final, r.steps)) for r in fin]
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
                        **({"size": size} if size is not None else {}),
                        **_cost_basis(space, best.steps)},
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
    say("drawing the kept visual tokens")
    from vlmopt.visualize import report_overlays

    kept, kept_files = report_overlays(lm, rows, chosen, final.build, calib)
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
        "latency_s": lat, "latency_ratio": lat["chosen"] / lat["original"], "kept": kept,
        "search_seconds": t_search, "search_evaluations": n_search,
        "evaluations": evaluator.n_evaluated + (final.n_evaluated if rerank else 0),
    }
    _publish(od, opts, lm, chosen, plan, result, calib, say, kept_files,
             (evaluator.base, evaluator.batches[0]))
    result["seconds"] = time.perf_counter() - t_start
    result["stage_seconds"] = dict(say.close()) if isinstance(say, Stages) else {}
    return result


def _cost_basis(space, steps) -> dict:
    """Where the FLOPs target was met, recorded in the plan so that ``vlmopt flops --plan``
    recounts at the same place: the calibration prompts' mean text tokens, the calibration image
    sizes (dynamic resolution), and the LLM and total ratios reached there."""
    f = space.flops(steps)
    sizes = [[*k, n] for k, n in space.sizes.items() if k is not None]
    return {"prompt_tokens": space.n_text, **({"image_sizes": sizes} if sizes else {}),
            "achieved": {"llm": f["ratio_llm"], "total": f["ratio_total"]}}


def _rerank(study, final, steps):
    """A finalist's metrics on the whole calibration set, measured once per study: stored in
    it, so a killed run and every worker of a shared study reuse them."""
    from vlmopt.search.evaluator import Metrics, plan_hash

    key = f"rerank:{plan_hash(steps)}"
    got = study.user_attrs.get(key)
    if got is not None:
        m = Metrics(**got)
        final.remember(steps, m)
        return m
    m = final.evaluate(steps)
    study.set_user_attr(key, {"accuracy": m.accuracy, "agreement": m.agreement, "kl": m.kl})
    # read back: of two workers measuring it at once, both use the value stored last
    m = Metrics(**study.user_attrs[key])
    final.remember(steps, m)
    return m


def _compression(gm) -> dict:
    """Per decoder layer of the chosen graph: Q/K ranks (None = dense) and weight bits."""
    from vlmopt.ir.capture import decoder_nodes

    out = {}
    for n in decoder_nodes(gm):
        m = n.meta["vlmopt"]
        out[n.name] = {"q_rank": m.get("q_rank"), "k_rank": m.get("k_rank"),
                       "bits": sorted(set(m.get("bits", {}).values()))}
    return out


def _publish(od: outdir.OutDir, opts: Options, lm, chosen, plan, result: dict, calib,
             say, kept_files: dict | None = None, timing: tuple | None = None) -> None:
    """Write every output into OUT's staging directory, then publish them (vlmopt.outdir). A
    full or read-only disk is one error line; the staged part goes, the study stays."""
    import errno

    from vlmopt import report

    tmp = od.staging()
    try:
        plan.save(tmp / "plan.json")
        if opts.emit:
            try:
                from vlmopt.emit import emit
            except ModuleNotFoundError as e:  # an install without the exporter's packages;
                if (e.name or "").split(".")[0] not in ("onnx", "onnxruntime", "onnxscript"):
                    raise  # any other import failure is a bug, not a build variant
                emit = None
                result["artifact"] = "ONNX export not available in this build"
            if emit is not None:
                say("exporting ONNX and checking parity")
                (tmp / "artifact").mkdir()
                manifest = emit(lm, chosen, tmp / "artifact", calib, fuse=opts.fuse)
                for p in (tmp / "artifact").iterdir():
                    p.rename(tmp / p.name)
                (tmp / "artifact").rmdir()
                result["artifact"] = {"graphs": list(manifest.get("graphs", {}))}
                if timing is not None:
                    say("measuring prefill latency on ONNX Runtime")
                    from vlmopt.ort_latency import prefill_latency

                    ort = prefill_latency(tmp, timing[0], chosen, timing[1])
                    result["latency_ort_s"] = ort
                    result["latency_ratio_ort"] = ort["chosen"] / ort["original"]
        if kept_files:
            (tmp / "kept").mkdir()
            for name, data in kept_files.items():
                (tmp / "kept" / name).write_bytes(data)
        say("writing the report")
        if isinstance(say, Stages):  # every step so far (writing the report itself excluded)
            result["stage_seconds"] = dict(say.close())
        report.write(result, tmp)
        od.commit()
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES):
            raise VlmoptError(f"--out {opts.out}: cannot write the results ({e.strerror}); "
                              "the search is kept in the study: run the same command again "
                              "to finish") from None
        raise
    except BaseException:
        if not od.run_file.exists() or "publishing" not in json.loads(
                od.run_file.read_text()):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
