"""Graph wiring of the select_visual pass: per method, the nodes that turn the vision / project
outputs into per-patch scores (the leaf modules live in vlmopt.ir.select, .received,
.vispruner, .vtc_cls and .mmtok). Each function rewires ``gm`` in place and returns the node the
pass's scorer reads."""

from __future__ import annotations

import operator

from torch import fx, nn

from vlmopt.ir import select
from vlmopt.ir.capture import node_by_block
from vlmopt.ir.rewrite import add_module


def tag(node: fx.Node, **info) -> fx.Node:
    node.meta["vlmopt"] = {"block": "select", **info}
    return node


def getitems(g: fx.Graph, node: fx.Node, n: int) -> list[fx.Node]:
    return [g.call_function(operator.getitem, (node, i)) for i in range(n)]


def _swap_vision(gm: fx.GraphModule, method: str, make, name: str, hint: str = ""):
    """Replace the vision node's module by ``make(old)``; a ValueError from ``make`` (no CLS)
    becomes one naming the node and the method. Returns (vision node, project node)."""
    vis, proj = node_by_block(gm, "vision"), node_by_block(gm, "project")
    old = gm.get_submodule(vis.target)
    try:
        if not hasattr(old, "feature_layer"):  # a tower without a CLS-style feature layer
            raise ValueError("this vision tower has no [CLS] token")
        mod = make(old)
    except ValueError as e:
        if str(e).startswith("field "):  # a config field the tower cannot serve
            raise ValueError(f"select_visual: node {vis.name!r}: {e}") from None
        raise ValueError(f"select_visual: node {vis.name!r}: {method} needs a CLS token whose "
                         f"attention ranks the patches ({e}){hint}") from None
    vis.target = add_module(gm, name, mod)
    vis.meta["vlmopt"]["select_op"] = "cls_attention"
    return vis, proj


def tower_has_cls(gm: fx.GraphModule) -> bool:
    """Whether the vision node's tower has a [CLS] token that the LLM does not read (its
    attention can rank the patches): the adapter's ``has_cls``, read from the graph."""
    old = gm.get_submodule(node_by_block(gm, "vision").target)
    return (hasattr(old, "feature_layer") and bool(old.drop_cls)
            and select.has_cls(old.tower))


def resolve_score(gm: fx.GraphModule, config) -> str:
    """The ``score`` a select_visual ``config`` of a CLS-ranked method resolves to on this
    graph's tower ("auto": "cls" where it has a [CLS] the LLM does not read, else
    "received"); one ValueError naming the node and the field where it cannot run."""
    has_cls = tower_has_cls(gm)
    score = config.score if config.score != "auto" else (
        "cls" if has_cls or config.method == "vtc_cls" else "received")
    if (score == "cls" or config.cls == "official") and not has_cls:
        field = "score" if config.cls == "patches" else "cls"
        name = {"visionzip": "VisionZip", "vispruner": "VisPruner"}.get(config.method, "VTC-CLS")
        alt = ("VTC-CLS defines no variant without it" if config.method == "vtc_cls" else
               "score 'received' with cls 'patches' ranks by the attention tokens receive")
        raise ValueError(f"select_visual: node {node_by_block(gm, 'vision').name!r}: {name} "
                         f"needs a CLS token that the LLM does not read (field {field!r} is "
                         f"{getattr(config, field)!r}); this vision tower has none: {alt}")
    return score


def with_cls_attention(gm: fx.GraphModule, method: str, hint: str = "",
                       cls_feature: bool = False, layer: int | None = None):
    """The vision node also returns the CLS attention and head-mean keys of the layer feeding
    the projector (select.VisionClsAttention; with ``cls_feature`` also CLS's features;
    ``layer``: features and attention of ``hidden_states[layer]`` instead); returns (vision
    node, project node)."""
    return _swap_vision(gm, method, lambda old: select.VisionClsAttention(
        old.tower, _layer(old, layer), old.drop_cls, cls_feature), "vision_cls", hint)


def _layer(vision: nn.Module, layer: int | None) -> int:
    """The hidden_states index a selection reads: ``layer``, or the projector's."""
    if layer is None:
        return vision.feature_layer
    n = len(select.vision_layers(vision.tower)) + 1
    if not -n <= layer < n:
        raise ValueError(f"field 'layer' must index the tower's {n} hidden states "
                         f"({-n}..{n - 1}), got {layer}")
    return layer


def with_received_attention(gm: fx.GraphModule, method: str, last: bool = False,
                            layer: int | None = None):
    """CLS-free fixed-grid towers: the vision node also returns the attention each visual
    token receives and the head-mean keys (vlmopt.ir.received.VisionReceived) of the layer
    feeding the projector, or (``last``) of the last ViT layer; returns (vision, project)."""
    from vlmopt.ir.received import VisionReceived

    vis, proj = node_by_block(gm, "vision"), node_by_block(gm, "project")
    old = gm.get_submodule(vis.target)
    try:
        mod = VisionReceived(old.tower, _layer(old, layer), old.drop_cls, -1 if last else None)
    except ValueError as e:
        raise ValueError(f"select_visual: node {vis.name!r}: {method}: {e}") from None
    vis.target = add_module(gm, "vision_received", mod)
    vis.meta["vlmopt"]["select_op"] = "received_attention"
    return vis, proj


def vispruner_scores(gm: fx.GraphModule, nv: int, keep: int, ratio: float,
                     score: str = "cls") -> fx.Node:
    """Per-patch kept flags [B, Nv] of VisPruner (vlmopt.ir.vispruner); ``score``
    "received": its SigLIP variant (the last ViT layer's received attention)."""
    from vlmopt.ir.vispruner import VisPrunerSelect

    vis, proj = (with_cls_attention(gm, "VisPruner") if score == "cls" else
                 with_received_attention(gm, "VisPruner", last=True))
    name = add_module(gm, "vispruner", VisPrunerSelect(nv, keep, ratio))
    g = gm.graph
    with g.inserting_before(proj):
        feats, cls, _ = getitems(g, vis, 3)
        kept = tag(g.call_module(name, (feats, cls)), select_op="duplicates",
                   n_residual=nv - int(keep * ratio))
    proj.args = (feats,)
    return kept


def visionzip_scores(gm: fx.GraphModule, nv: int, keep: int, contextual: int,
                     score: str = "cls", official: bool = False, layer: int | None = None
                     ) -> fx.Node:
    """vision -> project becomes vision(+CLS or received attention) -> contextual merge ->
    project; returns the node of per-patch kept scores [B, Nv]. ``official``: CLS is the first
    of the ``keep - contextual`` dominant tokens, in the official layout
    (select.ContextualMerge ``cls_first``); ``layer``: the ViT output read (None: the
    projector's feature layer)."""
    if score == "cls":
        vis, proj = with_cls_attention(gm, "VisionZip", "; score 'received' ranks by the "
                                       "attention tokens receive", official, layer)
    else:
        vis, proj = with_received_attention(gm, "VisionZip", layer=layer)
    dominant = keep - contextual - int(official)
    merger = select.ContextualMerge(nv, dominant, contextual, cls_first=official)
    name = add_module(gm, "visionzip", merger)
    g = gm.graph
    with g.inserting_before(proj):
        z = g.call_module(name, tuple(getitems(g, vis, 3 + int(official))))
        tag(z, select_op="contextual_merge", contextual=contextual, n_merge=merger.n_merge,
            reordered=official)  # official: rows are [CLS, dominant, contextual], not patches
        feats, kept = getitems(g, z, 2)
    proj.args = (feats,)
    return kept


def vtc_cls_scores(gm: fx.GraphModule, start_layer: int) -> fx.Node:
    """The vision node also returns VTC-CLS's CLS attention summed over its layer ensemble
    (vlmopt.ir.vtc_cls); returns that node [B, Nv]."""
    from vlmopt.ir.vtc_cls import VisionClsEnsemble

    hint = ("; VTC-CLS defines no variant without [CLS] (method 'visionzip' ranks by received "
            "attention there)")
    vis, proj = _swap_vision(gm, "VTC-CLS", lambda old: VisionClsEnsemble(
        old.tower, old.feature_layer, old.drop_cls, start_layer), "vision_vtc_cls", hint)
    mod = gm.get_submodule(vis.target)
    vis.meta["vlmopt"]["n_cls_layers"] = len(mod.layer_ids)
    g = gm.graph
    with g.inserting_before(proj):
        feats, cls = getitems(g, vis, 2)
    proj.args = (feats,)
    return cls


def _extra_vision_output(gm: fx.GraphModule, make, select_op: str) -> fx.Node:
    """Dynamic-resolution towers: the vision node's module becomes ``make(old)``, which returns
    the old outputs plus one more (None: this tower has no such form); returns the node of
    that extra output."""
    vis = node_by_block(gm, "vision")
    old = gm.get_submodule(vis.target)
    mod: nn.Module | None = make(old)
    if mod is None:
        raise ValueError(f"select_visual: node {vis.name!r}: {select_op.replace('_', ' ')} is "
                         f"not available on this family's vision tower "
                         f"({gm.meta['vlmopt'].get('family')}) yet; use divprune, kcenter or "
                         "random")
    vis.target = add_module(gm, f"vision_{select_op}", mod)
    vis.meta["vlmopt"]["select_op"] = select_op
    g = gm.graph
    with g.inserting_after(vis):
        n_ds = getattr(old, "n_deepstack", 0)
        extra = g.call_function(operator.getitem, (vis, n_ds + 1))
        if not n_ds:  # the node was one tensor: its users now read item 0
            feats = g.call_function(operator.getitem, (vis, 0))
            vis.replace_all_uses_with(feats, delete_user_cb=lambda n: n not in (feats, extra))
    return extra


def received_scores(gm: fx.GraphModule, layer: int | None = None) -> fx.Node:
    """Dynamic-resolution towers: the attention each LLM token receives [Nv_total] - Qwen-VL's
    last ViT block (vlmopt.ir.received), a tile tower's feature layer, averaged over each
    pixel-shuffle group (vlmopt.ir.received_tiles)."""
    from vlmopt.ir import received_tiles
    from vlmopt.ir.blocks import QwenVision
    from vlmopt.ir.received import QwenVisionReceived

    if layer is not None:
        raise ValueError(f"select_visual: node {node_by_block(gm, 'vision').name!r}: field "
                         "'layer': this tower's received attention is that of the layer "
                         "producing its features")

    def make(old):
        if isinstance(old, QwenVision):
            return QwenVisionReceived(old.tower, old.n_deepstack)
        return received_tiles.for_tower(old)

    return _extra_vision_output(gm, make, "received_attention")


def vision_features(gm: fx.GraphModule) -> fx.Node:
    """The node of the vision features before the projector, one row per LLM visual token:
    the vision node itself on towers whose projector is separate ([B, Nv, Dv]); on towers with
    the merger inside (Qwen-VL) a new output of merge-group means ([Nv_total, Dv],
    vlmopt.ir.mmtok.QwenVisionPatches)."""
    from vlmopt.ir.blocks import QwenVision, Vision
    from vlmopt.ir.mmtok import QwenVisionPatches

    vis = node_by_block(gm, "vision")
    if isinstance(gm.get_submodule(vis.target), Vision):
        return vis
    return _extra_vision_output(gm, lambda old: QwenVisionPatches(old.tower, old.n_deepstack)
                                if isinstance(old, QwenVision) else None, "patch_features")
