"""Graph surgery shared by passes: the chain state at a layer, and inserting a token change."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import fx, nn

from vlmopt.ir.capture import decoder_nodes


@dataclass
class ChainState:
    """The values entering a decoder layer (fx nodes)."""

    hidden: fx.Node
    mask: fx.Node
    rope: fx.Node
    pos: fx.Node
    visual: fx.Node
    amask: fx.Node

    @classmethod
    def at(cls, node: fx.Node) -> ChainState:
        return cls(*node.args[:6])


def add_module(gm: fx.GraphModule, name: str, module: nn.Module) -> str:
    base, i = name, 1
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.add_submodule(name, module)
    return name


def insert_token_change(gm: fx.GraphModule, layer: int,
                        build: Callable[[fx.Graph, ChainState], tuple]) -> None:
    """Insert nodes before decoder ``layer`` that shorten the sequence.

    ``build(graph, state)`` returns new (hidden, pos, visual, amask) nodes; the causal mask and
    rotary embeddings are rebuilt from them, and every later decoder node is rewired.
    """
    decs = decoder_nodes(gm)
    target = decs[layer]
    old = ChainState.at(target)
    g = gm.graph
    with g.inserting_before(target):
        hidden, pos, visual, amask = build(g, old)
        for node, base in ((hidden, "hidden"), (pos, "position_ids"), (visual, "visual_mask"),
                           (amask, "attention_mask")):
            node.name = f"{base}_{layer}"  # NOTE: unique: one token change per layer
        mask = g.call_module("causal_mask", (hidden, amask, pos))
        rope = g.call_module("rope", (hidden, pos))
        mask.meta["vlmopt"] = {"block": "mask"}
        rope.meta["vlmopt"] = {"block": "rope"}
    swap = {old.hidden: hidden, old.mask: mask, old.rope: rope, old.pos: pos,
            old.visual: visual, old.amask: amask}
    for d in decs[layer:]:
        d.args = tuple(swap.get(a, a) for a in d.args)
    gm.recompile()
