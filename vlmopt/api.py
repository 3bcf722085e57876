"""The Python API: load, capture, apply_plan, flops, evaluate."""

from __future__ import annotations

import os
from pathlib import Path

from torch import fx

from vlmopt.frontend.load import LoadedModel
from vlmopt.frontend.load import load as _load
from vlmopt.ir.capture import capture as _capture
from vlmopt.ir.capture import decoder_nodes
from vlmopt.ir.rewrite import visual_tokens
from vlmopt.plan import Plan

DEFAULT_TEXT_TOKENS = 32


def load(spec: str | os.PathLike, **kwargs) -> LoadedModel:
    """Load a LLaVA checkpoint directory (or ``builtin:synth-llava``) offline."""
    return _load(spec, **kwargs)


def capture(lm: LoadedModel) -> fx.GraphModule:
    """The block graph of the model; bit-identical to the HF model with no pass applied."""
    return _capture(lm)


def apply_plan(lm: LoadedModel, plan: Plan | str | os.PathLike | dict, *, verify: bool = True,
               example: dict | None = None, dump_dir: str | os.PathLike | None = None,
               check_fingerprint: bool = True) -> fx.GraphModule:
    """Capture ``lm`` and run the plan's passes on it (verifying after each pass)."""
    from vlmopt.pipeline import run_passes

    if isinstance(plan, dict):
        plan = Plan.from_json(plan)
    elif not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if check_fingerprint:
        plan.check_model(lm.fingerprint, lm.name)
    gm, report = run_passes(_capture(lm), plan.passes, verify=verify, example=example,
                            dump_dir=Path(dump_dir) if dump_dir else None)
    gm.meta["vlmopt"]["report"] = report
    return gm


def layer_specs(gm: fx.GraphModule, n_text: int, n_visual: int | None = None):
    """The cost model's view of each decoder node of a (rewritten) graph; ``n_visual``: the
    visual tokens of the sample's image(s) entering the LLM (dynamic resolution)."""
    from vlmopt.cost import LayerSpec
    from vlmopt.ir.rewrite import visual_tokens

    specs = []
    for n in decoder_nodes(gm):
        info = n.meta["vlmopt"]
        nv = info["n_visual"] if n_visual is None else visual_tokens(info, n_visual)
        if nv is None:
            raise ValueError("this model's visual-token count follows the image size: "
                             "give the image's count")
        specs.append(LayerSpec(n_tokens=n_text + nv, n_visual=nv,
                               frozen_visual=bool(info.get("frozen", False)),
                               q_rank=info.get("q_rank"), k_rank=info.get("k_rank"),
                               bits=tuple(sorted(info.get("bits", {}).items())),
                               group_size=info.get("group_size", 0)))
    return specs


def _weight_bytes(shapes, gm: fx.GraphModule, specs) -> dict:
    """Weight bytes per node of ``gm``: low ranks and quantized bits (vlmopt.cost)."""
    from vlmopt import cost

    node_bits, group = {}, 0
    for n in gm.graph.nodes:
        info = n.meta.get("vlmopt", {})
        if info.get("block") in ("head", "project") and info.get("bits"):
            node_bits[info["block"]] = info["bits"]
            group = info["group_size"]
    return cost.weight_bytes(shapes, specs, node_bits=node_bits, group_size=group)


def image_grids(lm: LoadedModel, image_size: tuple[int, int] | None) -> list | None:
    """Patch grids of one ``(height, width)`` image for a dynamic-resolution model (None: the
    cost model's reference image); a fixed-resolution model takes only its own size."""
    if lm.adapter.fixed_n_visual() is not None:
        native = lm.adapter.image_size()
        if image_size is not None and tuple(image_size) != (native, native):
            raise ValueError(f"{lm.name} takes {native}x{native} images only (fixed resolution)")
        return None
    if image_size is None:
        return None
    return type(lm.adapter).image_grids(lm.path, lm.config, *image_size)


def flops(lm: LoadedModel, graph: fx.GraphModule | None = None, *,
          n_text: int = DEFAULT_TEXT_TOKENS, image_size: tuple[int, int] | None = None) -> dict:
    """Analytic prefill FLOPs per node of ``graph`` (default: the original), its ratio to the
    original, decode FLOPs per token and KV-cache bytes per layer, for ``n_text`` text tokens
    and (dynamic-resolution models) one ``(height, width)`` image."""
    from vlmopt import cost

    grids = image_grids(lm, image_size)
    shapes = lm.shapes(grids)
    n0 = shapes.n_visual if shapes.dynamic else None
    n_prompt, n_text = n_text, n_text + shapes.n_image_text  # + AnyRes newlines: text too
    base_gm = _capture(lm)
    gm = graph if graph is not None else base_gm
    base = cost.prefill_flops(shapes, layer_specs(base_gm, n_text, n0))
    specs = layer_specs(gm, n_text, n0)
    n_in = gm.meta["vlmopt"].get("n_visual_project")
    opt = cost.prefill_flops(shapes, specs, n_visual_in=n_in)
    tome = next((n.meta["vlmopt"]["tome"] for n in gm.graph.nodes
                 if "tome" in n.meta.get("vlmopt", {})), None)
    if tome:  # merge_vision: the tower at its merged counts, the projector on what remains
        n_in = tome["n_out"]
        opt["vision"] = cost.tome_vision_flops(shapes, tome["r"])
        opt["project"] = cost.projector_flops(shapes, n_in)
        opt["total"] = sum(v for k, v in opt.items() if k != "total")
    for n in gm.graph.nodes:  # explicit scorers are part of the optimized model's cost
        info = n.meta.get("vlmopt", {})
        if info.get("block") == "score":
            nv = info["n_visual"] if n0 is None else visual_tokens(info, n0)
            if info["mode"] == "sparsevlm":  # text query rows only (vlmopt.ir.sparsevlm)
                from vlmopt.ir import sparsevlm

                opt[n.name] = sparsevlm.score_flops(shapes, n_text, n_text + nv)
            else:
                opt[n.name] = cost.score_flops(shapes, n_text + nv, info["mode"],
                                               info.get("pivots", 0))
            opt["total"] += opt[n.name]
        if info.get("block") == "raters" or info.get("merged"):  # SparseVLM's extra matmuls
            from vlmopt.ir import sparsevlm

            if info.get("merged"):
                extra = sparsevlm.recycle_flops(info["recycled"], info["merged"], shapes.d)
            else:
                nv = info["n_visual"] if n0 is None else visual_tokens(info, n0)
                extra = sparsevlm.rater_flops(nv, n_text + nv, shapes.d)
            opt[n.name] = extra
            opt["total"] += extra
        if (info.get("select_op") in ("diversity", "coverage", "dpp")
                and info.get("n_visual") is None):
            info = {**info, "n_visual": n0}  # dynamic resolution: the image's count
        extra = cost.select_flops(shapes, info, n_text) if "select_op" in info else 0
        if extra:  # select_visual's explicit matmuls (the vision node's CLS attention included)
            opt[n.name] = opt.get(n.name, 0) + extra
            opt["total"] += extra
    kv_len = [s.n_tokens for s in specs]
    wbytes = _weight_bytes(shapes, gm, specs)
    vision = opt["vision"] + opt["project"]
    # LLM FLOPs: all but the original tower and the projector (at the count it projects), so a
    # scorer a method adds (VisionZip's CLS attention, DivPrune's distances) counts against it
    fixed = cost.vision_flops(shapes)
    llm = (opt["total"] - (opt["vision"] if tome else fixed)
           - cost.projector_flops(shapes, n_in or shapes.n_visual))
    base_llm = base["total"] - fixed - cost.projector_flops(shapes, shapes.n_visual)
    return {
        "n_text": n_prompt,
        "n_visual": shapes.n_visual,
        "n_image_text": shapes.n_image_text,
        "image_grids": [list(g) for g in shapes.grids],
        "vision_share": vision / opt["total"],
        "llm": llm,
        "original_llm": base_llm,
        "llm_ratio": llm / base_llm,
        "per_node": opt,
        "total": opt["total"],
        "original_total": base["total"],
        "ratio": opt["total"] / base["total"],
        "visual_tokens_per_layer": [s.n_visual for s in specs],
        "decode_flops_per_token": cost.decode_flops_per_token(shapes, kv_len, specs),
        "kv_cache_bytes_per_layer": cost.kv_cache_bytes(shapes, kv_len),
        "weight_bytes_per_node": wbytes,
        "weight_bytes_total": wbytes["total"],
        "original_weight_bytes_total": cost.weight_bytes(shapes)["total"],
    }


def flops_over(lm: LoadedModel, graph: fx.GraphModule | None = None, *, n_text: int,
               image_sizes: dict | None = None) -> dict:
    """Prefill FLOPs of ``graph`` at ``n_text`` text tokens, summed over ``image_sizes``
    (``{(height, width): images}``; None: the model's own size): the one definition of the LLM
    and total ratios that ``optimize``'s target, ``compare``, the report and ``vlmopt flops
    --plan`` share. LLM = everything but the vision tower and projector; total = all of it.
    Per-node figures are those of the last size."""
    sizes = dict(image_sizes or {None: 1})
    acc = dict.fromkeys(("total", "original_total", "llm", "original_llm"), 0.0)
    for size, n in sizes.items():
        f = flops(lm, graph, n_text=n_text, image_size=size)
        for k in acc:
            acc[k] += n * f[k]
    images = sum(sizes.values())
    return {**f, "n_text": n_text, "image_sizes": [[*k, n] for k, n in sizes.items() if k],
            "total": acc["total"] / images, "original_total": acc["original_total"] / images,
            "llm": acc["llm"] / images, "original_llm": acc["original_llm"] / images,
            "ratio": acc["total"] / acc["original_total"],
            "llm_ratio": acc["llm"] / acc["original_llm"]}


def evaluate(lm: LoadedModel, data, *, graph: fx.GraphModule | None = None,
             limit: int | None = None, batch_size: int = 16, blank_image: bool = False):
    """Accuracy of ``graph`` (default: the original model) on ``data``; agreement and KL are
    measured against the original model on the same inputs."""
    from vlmopt.data.dataset import load_records
    from vlmopt.evaluation import evaluate as _evaluate
    from vlmopt.evaluation import hf_runner
    from vlmopt.ir.capture import graph_runner

    records = data if isinstance(data, list) else load_records(data, limit=limit)
    original = hf_runner(lm.model)
    runner = graph_runner(graph) if graph is not None else original
    ref = original if (graph is not None or blank_image) else None
    return _evaluate(runner, records, lm.processor, reference=ref, batch_size=batch_size,
                     blank_image=blank_image)
