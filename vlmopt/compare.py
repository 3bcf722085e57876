"""Compare methods on one model and one dataset, fairly: same inputs, same reference, same run.

For every method: accuracy, agreement with the original model's answer, KL from it, analytic
prefill FLOPs ratio, and measured prefill latency ratio (median of interleaved repeats).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmopt import api, inputs
from vlmopt.data.dataset import Record
from vlmopt.evaluation import answer_token, record_batches
from vlmopt.ir.capture import capture, complete_inputs
from vlmopt.pipeline import make_config, registry, run_passes

log = logging.getLogger(__name__)


@dataclass
class Method:
    name: str
    steps: list  # [(pass name, fields)]


def default_methods(n_visual: int | None, n_layers: int, freeze_order: list[str] | None,
                    has_cls: bool = True, refused=(),
                    vit_layers: int | None = None) -> list[Method]:
    """The methods of the issue's table, scaled to the model: FastV K=2 R=50/75%, PyramidDrop
    at 1/4, 1/2, 3/4 depth (lambda 0.5), input-level selection at ~11% and ~33% of the visual
    tokens (perfect squares, so pooling is exact), ShortV on ~60% of the layers (by LC).
    PyramidDrop, VisionZip, DivPrune, VisPruner, MMTok, CDPruner and VTC-CLS come as their
    official code runs them (positions renumbered) and as vlmopt's original-positions variant
    (``_both``);
    VisPruner is PyTorch-only (its duplicate-removal loop is not exportable yet). VTC-CLS sums
    the CLS attention of ViT layers L-8 .. the feature layer (``start_layer`` -8: the official
    ``--layer 16`` on LLaVA-1.5's 24-layer CLIP, and valid on any depth). DART (K=2, reduction
    77.8% and 88.9%) keeps the original positions, as its official code does. SparseVLM: its
    "192" and "64" schedules with recycling, both position conventions.
    VisionZip comes three times: the official code's counting (CLS is the first of the
    dominant tokens, dvlab-research/VisionZip at 3151f6d; the plain name), LightCompress's
    (", patches only") and vlmopt's original positions. ``has_cls`` False (the adapter's: a
    SigLIP tower, or a CLIP whose CLS the LLM reads): VisionZip and VisPruner rank by received
    attention (their CLS-free variants, ``score`` "received"), and no VTC-CLS (it has none).
    ``n_visual`` None (dynamic resolution): the same rules as fractions of what reaches each
    cut, so they follow every image's count; VisionZip ranks by received attention (no CLS) and
    keeps no contextual tokens, MMTok takes its Qwen2.5-VL port's tv_temperature 0.01, and
    there is no pooling (no fixed grid), no VTC-CLS (no CLS) and no ToMe (the patch merger
    needs every patch). ToMe (merge_vision) merges inside the tower down to half the patches,
    as many merges per layer as its 50% cap allows on any depth. ``refused``: select_visual
    methods the family's tower cannot serve (its adapter's ``refused_select``, e.g. the
    CLS-attention ones on AnyRes towers): left out."""
    K = min(2, n_layers - 1)  # FastV's default K=2, if the model is that deep
    q = sorted({min(n_layers - 1, max(1, round(n_layers * f))) for f in (0.25, 0.5, 0.75)})
    if n_visual is None:
        return _without(_dynamic_methods(K, q, n_layers, freeze_order), refused)
    ms = [Method("original", []),
          Method(f"FastV K={K} R=50%",
                 [("drop_tokens", {"keep": {f"layer_{K}": round(n_visual * .5)}})]),
          Method(f"FastV K={K} R=75%",
                 [("drop_tokens", {"keep": {f"layer_{K}": round(n_visual * .25)}})]),
          *_both("PyramidDrop", "drop_tokens", {
              "keep": {f"layer_{k}": int(n_visual * r) for k, r in zip(q, (.5, .25, .125))},
              "score_at": "next"}),
          *[_dart(K, 4 + 8 * int(n_visual * (1 - r) // 8), r) for r in (.778, .889)]]
    ms += _sparsevlm(n_visual, n_layers)
    have_select = "select_visual" in registry()
    if have_select and vit_layers:
        ms += _vscan(n_visual, n_layers, vit_layers)
    for frac in (0.11, 0.33):
        k = max(1, round((n_visual * frac) ** 0.5)) ** 2  # nearest perfect square
        pct = f"{k}/{n_visual}"
        if have_select:
            ms += [*_cls_ranked(k, pct, has_cls),
                   *_both(f"DivPrune {pct}", "select_visual", {"method": "divprune", "keep": k}),
                   *_both(f"MMTok {pct}", "select_visual", {"method": "mmtok", "keep": k}),
                   *_both(f"CDPruner {pct}", "select_visual", {"method": "cdpruner",
                                                                "keep": k}),
                   Method(f"k-center {pct}", [("select_visual", {"method": "kcenter", "keep": k})]),
                   Method(f"pooling {pct}", [("select_visual", {"method": "pool", "keep": k})]),
                   Method(f"random {pct}", [("select_visual", {"method": "random", "keep": k})])]
        else:
            ms += [Method(f"random@layer1 {pct}", [("drop_tokens", {"keep": {"layer_1": k},
                                                                      "scorer": "random"})])]
    if "merge_vision" in registry() and has_cls:  # ToMe (CLIP with CLS dropped), half the patches
        k = n_visual - n_visual // 2
        ms += _both(f"ToMe {k}/{n_visual} (vision tower)", "merge_vision", {"keep": k})
    if freeze_order:
        r = max(1, round(n_layers * 0.6))
        ms.append(Method(f"ShortV {r}/{n_layers} layers",
                         [("freeze_visual", {"layers": sorted(freeze_order[:r])})]))
    return _without(ms, refused)


def _without(ms: list[Method], refused) -> list[Method]:
    """The methods none of whose select_visual steps uses a refused method."""
    return [m for m in ms if not any(n == "select_visual" and f.get("method") in refused
                                     for n, f in m.steps)]


def _cls_ranked(k: int, pct: str, has_cls: bool) -> list[Method]:
    """VisionZip, VisPruner and VTC-CLS at ``k`` tokens, as this tower can run them."""
    zip_ = {"method": "visionzip", "keep": k, "contextual": max(1, round(k * 10 / 64))}
    if not has_cls:  # received attention: their CLS-free variants; VTC-CLS has none
        return [*_both(f"VisionZip {pct} (received attention)", "select_visual",
                       {**zip_, "score": "received"}),
                *_both(f"VisPruner {pct} (received attention)", "select_visual",
                       {"method": "vispruner", "keep": k, "score": "received"})]
    lc, orig = _both(f"VisionZip {pct}", "select_visual", zip_)
    return [Method(lc.name, [("select_visual", {**zip_, "positions": "contiguous",
                                                "cls": "official"})]),
            Method(f"{lc.name}, patches only (LightCompress)", lc.steps), orig,
            *_both(f"VisPruner {pct}", "select_visual", {"method": "vispruner", "keep": k}),
            *_both(f"VTC-CLS {pct}", "select_visual", {"method": "vtc_cls", "keep": k,
                                                       "start_layer": -8})]


def _dart(K: int, keep: int | float, r: float) -> Method:
    """DART at layer K, 4 + 4 pivots, sized as its official code does for reduction ratio r
    (drop_tokens.dart); the official code keeps the original positions (a single row)."""
    return Method(f"DART K={K} R={r:.1%}", [("drop_tokens", {
        "keep": {f"layer_{K}": keep}, "scorer": "dart"})])


def _sparsevlm(n_visual: int | None, n_layers: int) -> list[Method]:
    """SparseVLM's official "192" and "64" schedules (drop_tokens.sparsevlm), scaled to the
    model, with 30% recycling; dynamic resolution: the stages' fractions, no recycling
    (vlmopt.ir.sparsevlm.official_schedule), original M-RoPE positions."""
    from vlmopt.ir.sparsevlm import official_schedule

    out = []
    for b in (192, 64):
        fields = {"keep": official_schedule(b, n_visual, n_layers, 0.3), "scorer": "sparsevlm"}
        if n_visual is None:
            out.append(Method(f"SparseVLM {b}/576 schedule", [("drop_tokens", fields)]))
        else:
            out += _both(f"SparseVLM {b}/576 schedule", "drop_tokens",
                         {**fields, "recycle": 0.3})
    return out


def _vscan(n_visual: int, n_layers: int, vit_layers: int) -> list[Method]:
    """VScan (vlmopt.ir.vscan.preset): the official 96 -> 32 after layer 15 of 32, and 64
    without stage 2, scaled to the model; both position conventions. CLS towers only: a
    fixed grid whose side allows the windows (else left out, as the rule refuses it)."""
    from vlmopt.ir import vscan

    out = []
    for keep, stage2 in ((96, (16, 32)), (64, None)):
        steps = vscan.preset(n_visual, n_layers, vit_layers, keep, stage2)
        try:
            vscan.check(n_visual, steps[0][1]["keep"], steps[0][1]["window"])
        except ValueError:
            continue
        name = f"VScan {keep}/576" + (" -> 32/576" if stage2 else "")
        out += [Method(name, steps),
                Method(f"{name}, original positions",
                       [(p, {**f, "positions": "original"}) for p, f in steps])]
    return out


def _both(name: str, pass_name: str, fields: dict) -> list[Method]:
    """A method as its official code runs it (positions renumbered 0.. after the cut) and as
    vlmopt's variant that keeps the original position ids."""
    return [Method(name, [(pass_name, {**fields, "positions": "contiguous"})]),
            Method(f"{name}, original positions", [(pass_name, dict(fields))])]


def _dynamic_methods(K: int, q: list[int], n_layers: int, freeze_order) -> list[Method]:
    ms = [Method("original", []),
          Method(f"FastV K={K} R=50%", [("drop_tokens", {"keep": {f"layer_{K}": 0.5}})]),
          Method(f"FastV K={K} R=75%", [("drop_tokens", {"keep": {f"layer_{K}": 0.25}})]),
          Method("PyramidDrop", [("drop_tokens", {"keep": {f"layer_{k}": 0.5 for k in q},
                                                   "score_at": "next"})]),
          *[_dart(K, round(1 - r, 3), r) for r in (.778, .889)],
          *_sparsevlm(None, n_layers)]
    for frac in (0.11, 0.33):
        pct = f"{frac:.0%}"
        ms += [Method(f"VisionZip {pct} (received attention, dominant only)",
                      [("select_visual", {"method": "visionzip", "keep": frac,
                                          "score": "received"})]),
               Method(f"MMTok {pct}", [("select_visual", {"method": "mmtok", "keep": frac,
                                                           "tv_temperature": 0.01})])]
        ms += [Method(f"DivPrune {pct}", [("select_visual", {"method": "divprune",
                                                              "keep": frac})]),
               Method(f"CDPruner {pct}", [("select_visual", {"method": "cdpruner",
                                                              "keep": frac})]),
               Method(f"k-center {pct}", [("select_visual", {"method": "kcenter", "keep": frac})]),
               Method(f"random {pct}", [("select_visual", {"method": "random", "keep": frac})])]
    if freeze_order:
        r = max(1, round(n_layers * 0.6))
        ms.append(Method(f"ShortV {r}/{n_layers} layers",
                         [("freeze_visual", {"layers": sorted(freeze_order[:r])})]))
    return ms


@torch.no_grad()
def compare(lm, records: list[Record], methods: list[Method], *, batch_size: int = 16,
            latency_repeats: int = 5, progress: Callable | None = None) -> list[dict]:
    base = capture(lm)
    graphs = {}
    for m in methods:
        steps = [(n, make_config(n, f)) for n, f in m.steps]
        graphs[m.name] = run_passes(base, steps, verify=True)[0] if steps else base
    tok = lm.processor.tokenizer
    hits, agree, kls = defaultdict(list), defaultdict(list), defaultdict(list)
    per_type = defaultdict(lambda: defaultdict(list))
    first, n_text = None, 0
    for chunk in record_batches(records, batch_size, lm.processor):
        batch = complete_inputs(inputs.encode(lm.processor, [r.prompt for r in chunk],
                                              [r.load_image() for r in chunk]))
        first = first or batch
        n_text += int((batch["input_ids"] != lm.model.config.image_token_id).sum())
        ref = F.log_softmax(base(**batch).float(), -1)
        for name, g in graphs.items():
            logp = ref if g is base else F.log_softmax(g(**batch).float(), -1)
            pred = logp.argmax(-1)
            agree[name] += (pred == ref.argmax(-1)).tolist()
            kls[name] += (ref.exp() * (ref - logp)).sum(-1).clamp(min=0).tolist()
            for r, p in zip(chunk, pred.tolist()):
                if r.answer is not None:
                    ok = p == answer_token(tok, r.answer)
                    hits[name].append(ok)
                    per_type[name][r.type or "all"].append(ok)
        if progress:
            progress(len(chunk))
    lat = prefill_latency(graphs, first, latency_repeats)
    # FLOPs as optimize counts them: at the prompts' mean text tokens, over the records' images
    n_text = round(n_text / max(1, len(records)))
    sizes = None
    if lm.adapter.fixed_n_visual() is None:
        from collections import Counter

        from vlmopt.evaluation import image_size

        sizes = {(h, w): n for (w, h), n in Counter(image_size(r) for r in records).items()}
    out = []
    for m in methods:
        g = graphs[m.name]
        h = hits[m.name]
        out.append({
            "method": m.name,
            "passes": m.steps,
            "accuracy": sum(h) / len(h) if h else None,
            "per_type": {t: sum(v) / len(v) for t, v in sorted(per_type[m.name].items())},
            "agreement": sum(agree[m.name]) / len(agree[m.name]),
            "kl": sum(kls[m.name]) / len(kls[m.name]),
            **_ratios(api.flops_over(lm, g, n_text=n_text, image_sizes=sizes)),
            "latency_ms": lat[m.name] * 1e3,
            "latency_ratio": lat[m.name] / lat["original" if "original" in lat else m.name],
        })
    return out


@torch.no_grad()
def prefill_latency(graphs: dict, batch: dict, repeats: int = 5) -> dict[str, float]:
    """Median prefill time per graph on one batch (graph inputs); methods interleaved
    round-robin so machine noise hits them alike."""
    times = defaultdict(list)
    for g in graphs.values():  # warm-up
        g(**batch)
    for _ in range(repeats):
        for name, g in graphs.items():
            t0 = time.perf_counter()
            g(**batch)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _ratios(f: dict) -> dict:
    return {"ratio_llm": f["llm_ratio"], "ratio_total": f["ratio"], "prompt_tokens": f["n_text"]}
