"""capture: a loaded VLM -> a torch.fx GraphModule at block granularity.

    pixel_values -> vision -> project --------------------.
    input_ids ----> embed ------------------------------> merge -> mask, rope -> layer_0 -> ...
                                          ... -> layer_{L-1} -> norm -> head -> logits [B, V]

The graph is built node by node (not traced): HF layers are leaves. Values flowing along the
decoder chain: hidden [B, T, D], position_ids [B, T], visual_mask [B, T] (bool) and the 2-D
padding mask [B, T]; the 4-D causal mask and rotary (cos, sin) are recomputed from them after
every change of T. Inputs: input_ids, pixel_values, attention_mask, position_ids, plus what the
family's adapter adds (``image_grid_thw`` for Qwen-VL; position ids are then M-RoPE [3, B, T]).
Qwen3-VL's deepstack adds ``deepstack_i`` nodes after the first decoder layers; they read the
``slots`` value (each token's slot in the merged sequence) so their features follow kept tokens.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx, nn

from vlmopt.frontend.load import LoadedModel, adapter_for
from vlmopt.ir import blocks

INPUTS = ("input_ids", "pixel_values", "attention_mask", "position_ids")
# inputs some families add (vlmopt.frontend adapters): Qwen-VL grids, Idefics3 pixel mask,
# AnyRes image sizes
EXTRA_INPUTS = ("image_grid_thw", "pixel_attention_mask", "image_sizes")


def _tag(node: fx.Node, block: str, **info) -> fx.Node:
    node.meta["vlmopt"] = {"block": block, **info}
    return node


def capture(model: LoadedModel | nn.Module) -> fx.GraphModule:
    """Block graph of a VLM (any registered family); with no pass applied it reproduces HF's
    logits bit for bit."""
    hf = model.model if isinstance(model, LoadedModel) else model
    a = adapter_for(hf)
    root = nn.Module()
    root.vision = a.vision_block()
    root.project = a.project_block()
    root.embed = blocks.Embed(a.embed)
    root.merge = blocks.Merge(a.image_token_id)
    root.causal_mask = blocks.CausalMask(a.text_config)
    root.rope = blocks.Rope(a.rotary)
    for i, layer in enumerate(a.layers):
        setattr(root, f"layer_{i}", blocks.Decoder(layer, i))
    root.norm = blocks.Norm(a.norm)
    root.head = blocks.Head(a.lm_head)
    n_ds = a.deepstack_layers()
    if n_ds:
        root.deepstack_features = blocks.DeepstackFeatures()
        for i in range(n_ds):
            setattr(root, f"deepstack_{i}", blocks.Deepstack())

    n_vis = a.fixed_n_visual()
    names = INPUTS + a.extra_inputs
    g = fx.Graph()
    ph = {n: g.placeholder(n) for n in names}
    ids, pix, amask, pos = (ph[n] for n in INPUTS)
    vis_args = (pix, *(ph[n] for n in a.extra_inputs))
    feats = _tag(g.call_module("vision", vis_args), "vision")
    ds_feats = []
    if n_ds:  # Qwen3-VL: (embeddings, *deepstack features)
        ds_feats = [g.call_function(operator.getitem, (feats, i + 1)) for i in range(n_ds)]
        feats = g.call_function(operator.getitem, (feats, 0))
    text_rows = ()
    if a.vision_text_rows:  # (features, rows that stay text), e.g. AnyRes' newlines
        text_rows = (g.call_function(operator.getitem, (feats, 1)),)
        feats = g.call_function(operator.getitem, (feats, 0))
    img = _tag(g.call_module("project", (feats,)), "project")
    tok = _tag(g.call_module("embed", (ids,)), "embed")
    merged = _tag(g.call_module("merge", (tok, img, ids, *text_rows)), "merge")
    hidden = g.call_function(operator.getitem, (merged, 0))
    visual = g.call_function(operator.getitem, (merged, 1))
    hidden.name, visual.name = "hidden", "visual_mask"
    mask = _tag(g.call_module("causal_mask", (hidden, amask, pos)), "mask")
    rope = _tag(g.call_module("rope", (hidden, pos)), "rope")
    if n_ds:
        slots = _tag(g.call_function(slot_ids, (ids,)), "slots")
        ds_feats = [_tag(g.call_module("deepstack_features", (tok, f, visual)), "deepstack_in",
                         index=i) for i, f in enumerate(ds_feats)]
    for i in range(len(a.layers)):
        hidden = _tag(g.call_module(f"layer_{i}", (hidden, mask, rope, pos, visual, amask)),
                      "decoder", layer=i, n_visual=n_vis)
        if i < n_ds:
            hidden = _tag(g.call_module(f"deepstack_{i}", (hidden, visual, slots, ds_feats[i])),
                          "deepstack", layer=i)
    out = _tag(g.call_module("norm", (hidden,)), "norm")
    logits = _tag(g.call_module("head", (out,)), "head")
    g.output(logits)
    gm = fx.GraphModule(root, g, class_name="VlmoptGraph")
    gm.meta["vlmopt"] = {
        "family": a.family,
        "model_type": hf.config.model_type,
        "inputs": list(names),
        "position_rows": a.position_rows,
        "n_layers": len(a.layers),
        "image_token_id": a.image_token_id,
        "n_visual": n_vis,
        "image_size": a.image_size(),
        "passes": [],
    }
    if n_vis is None:  # dynamic resolution: the reference input for shape checks
        gm.meta["vlmopt"]["vision_example"] = a.vision_example()
        gm.meta["vlmopt"]["layout"] = a.layout_spec()  # what the export's layout inputs need
    if isinstance(model, LoadedModel):  # lets a pass rebuild calibration statistics from a plan
        gm.meta["vlmopt"]["source"] = {"path": str(model.path), "name": model.name,
                                       "fingerprint": model.fingerprint}
    return gm


def slot_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """Each token's slot in the merged sequence [B, T] (followed through token changes)."""
    B, T = input_ids.shape
    return torch.arange(T, device=input_ids.device).expand(B, T)


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
    if pos is None and "image_grid_thw" in batch:
        raise ValueError("M-RoPE position ids must come with the batch (inputs.encode)")
    if pos is None:
        pos = (amask.cumsum(-1) - 1).clamp(min=0)
    out = {"input_ids": ids, "pixel_values": batch["pixel_values"],
           "attention_mask": amask, "position_ids": pos}
    for k in EXTRA_INPUTS:  # family inputs (Qwen-VL's image grids, Idefics3's pixel mask)
        if k in batch:
            out[k] = batch[k]
    pix = out["pixel_values"]
    if pix.dim() == 5 and "pixel_attention_mask" not in out and "image_sizes" not in out:
        # Idefics3 tiles: none of it is padding
        out["pixel_attention_mask"] = torch.ones(pix.shape[:2] + pix.shape[3:], dtype=torch.long)
    return out


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
