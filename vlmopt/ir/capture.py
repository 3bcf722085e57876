"""capture: a loaded LLaVA model -> a torch.fx GraphModule at block granularity.

    pixel_values -> vision -> project --------------------.
    input_ids ----> embed ------------------------------> merge -> mask, rope -> layer_0 -> ...
                                          ... -> layer_{L-1} -> norm -> head -> logits [B, V]

The graph is built node by node (not traced): HF layers are leaves. Values flowing along the
decoder chain: hidden [B, T, D], position_ids [B, T], visual_mask [B, T] (bool) and the 2-D
padding mask [B, T]; the 4-D causal mask and rotary (cos, sin) are recomputed from them after
every change of T. Inputs: input_ids, pixel_values, attention_mask, position_ids.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx, nn

from vlmopt.frontend.load import LlavaAdapter, LoadedModel
from vlmopt.ir import blocks

INPUTS = ("input_ids", "pixel_values", "attention_mask", "position_ids")


def _tag(node: fx.Node, block: str, **info) -> fx.Node:
    node.meta["vlmopt"] = {"block": block, **info}
    return node


def capture(model: LoadedModel | nn.Module) -> fx.GraphModule:
    """Block graph of a LLaVA model; with no pass applied it reproduces HF's logits bit for bit."""
    hf = model.model if isinstance(model, LoadedModel) else model
    a = LlavaAdapter(hf)
    cfg = hf.config
    root = nn.Module()
    root.vision = blocks.Vision(a.vision_tower, a.feature_layer, a.drops_cls)
    root.project = blocks.Project(a.projector)
    root.embed = blocks.Embed(a.embed)
    root.merge = blocks.Merge(a.image_token_id)
    root.causal_mask = blocks.CausalMask(cfg.text_config)
    root.rope = blocks.Rope(a.rotary)
    for i, layer in enumerate(a.layers):
        setattr(root, f"layer_{i}", blocks.Decoder(layer, i))
    root.norm = blocks.Norm(a.norm)
    root.head = blocks.Head(a.lm_head)

    n_vis = int(cfg.image_seq_length)
    g = fx.Graph()
    ids, pix, amask, pos = (g.placeholder(n) for n in INPUTS)
    feats = _tag(g.call_module("vision", (pix,)), "vision")
    img = _tag(g.call_module("project", (feats,)), "project")
    tok = _tag(g.call_module("embed", (ids,)), "embed")
    merged = _tag(g.call_module("merge", (tok, img, ids)), "merge")
    hidden = g.call_function(operator.getitem, (merged, 0))
    visual = g.call_function(operator.getitem, (merged, 1))
    hidden.name, visual.name = "hidden", "visual_mask"
    mask = _tag(g.call_module("causal_mask", (hidden, amask, pos)), "mask")
    rope = _tag(g.call_module("rope", (hidden, pos)), "rope")
    for i in range(len(a.layers)):
        hidden = _tag(g.call_module(f"layer_{i}", (hidden, mask, rope, pos, visual, amask)),
                      "decoder", layer=i, n_visual=n_vis)
    out = _tag(g.call_module("norm", (hidden,)), "norm")
    logits = _tag(g.call_module("head", (out,)), "head")
    g.output(logits)
    gm = fx.GraphModule(root, g, class_name="VlmoptGraph")
    gm.meta["vlmopt"] = {
        "family": "llava",
        "n_layers": len(a.layers),
        "image_token_id": a.image_token_id,
        "n_visual": n_vis,
        "image_size": int(cfg.vision_config.image_size),
        "passes": [],
    }
    if isinstance(model, LoadedModel):  # lets a pass rebuild calibration statistics from a plan
        gm.meta["vlmopt"]["source"] = {"path": str(model.path), "name": model.name,
                                       "fingerprint": model.fingerprint}
    return gm


def clone(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copied graph that *shares* the modules (no weight copies)."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name="VlmoptGraph")
    for n in new.graph.nodes:  # NOTE: deepcopy(graph) shares node.meta dicts between clones
        n.meta = {k: copy.deepcopy(v) for k, v in n.meta.items() if k == "vlmopt"}
    new.meta["vlmopt"] = copy.deepcopy(gm.meta.get("vlmopt", {}))
    return new


def decoder_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.meta.get("vlmopt", {}).get("block") == "decoder"]


def node_by_block(gm: fx.GraphModule, block: str) -> fx.Node:
    for n in gm.graph.nodes:
        if n.meta.get("vlmopt", {}).get("block") == block:
            return n
    raise KeyError(block)


def complete_inputs(batch: dict) -> dict:
    """Graph inputs from an encoded batch; a missing 2-D mask means no padding."""
    ids = batch["input_ids"]
    amask = batch.get("attention_mask")
    if amask is None:
        amask = torch.ones_like(ids)
    pos = batch.get("position_ids")
    if pos is None:
        pos = (amask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "pixel_values": batch["pixel_values"],
            "attention_mask": amask, "position_ids": pos}


def graph_runner(gm: fx.GraphModule):
    """Runner for vlmopt.evaluate: batch -> last-position logits [B, V]."""

    @torch.no_grad()
    def run(batch: dict) -> torch.Tensor:
        return gm(**complete_inputs(batch)).float()

    return run


def readable(gm: fx.GraphModule) -> str:
    """One line per block: the graph as it reads in the model."""
    lines = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            lines.append(f"input  {n.name}")
        elif n.op == "call_module":
            args = ", ".join(a.name if isinstance(a, fx.Node) else repr(a) for a in n.args)
            info = n.meta.get("vlmopt", {})
            extra = "  # " + ", ".join(f"{k}={v}" for k, v in info.items() if k != "block") \
                if len(info) > 1 else ""
            lines.append(f"{n.name:<14} = {n.target}({args}){extra}")
        elif n.op == "output":
            lines.append(f"output {n.args[0].name}")
    return "\n".join(lines) + "\n"
