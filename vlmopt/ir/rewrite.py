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


POSITIONS = ("original", "contiguous")


def check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise ValueError(f"field 'positions' must be one of {POSITIONS}, got {positions!r}")


def insert_token_change(gm: fx.GraphModule, layer: int,
                        build: Callable[[fx.Graph, ChainState], tuple],
                        positions: str = "original") -> None:
    """Insert nodes before decoder ``layer`` that shorten the sequence.

    ``build(graph, state)`` returns new (hidden, pos, visual, amask) nodes, and the kept slot
    indices [B, T'] as a fifth when it has them; the causal mask and rotary embeddings are
    rebuilt from them, and every later decoder node is rewired. Later deepstack nodes (Qwen3-VL)
    follow the kept tokens through the indices; a build without them cannot cut before one.
    ``positions``: "original" - kept tokens keep their position ids; "contiguous" - they are
    renumbered 0.. as if the shortened sequence were the prompt (1-row positions only: M-RoPE
    rows encode the image grid, which renumbering would destroy). Decoding continues after the
    original prompt length either way, as ``generate`` on the official code does.
    """
    check_positions(positions)
    if positions == "contiguous" and gm.meta["vlmopt"].get("position_rows", 1) != 1:
        raise ValueError("positions 'contiguous' needs 1-row position ids; this model's "
                         "M-RoPE positions encode the image grid (use 'original')")
    decs = decoder_nodes(gm)
    target = decs[layer]
    old = ChainState.at(target)
    g = gm.graph
    later_ds = [n for n in g.nodes if n.meta.get("vlmopt", {}).get("block") == "deepstack"
                and n.meta["vlmopt"]["layer"] >= layer]
    with g.inserting_before(target):
        hidden, pos, visual, amask, *idx = build(g, old)
        if positions == "contiguous":
            from vlmopt.ir.tokens import contiguous_positions

            pos = g.call_function(contiguous_positions, (pos, amask))
        if later_ds:
            if not idx:
                raise ValueError(f"node {target.name!r}: this token change keeps no slot indices, "
                                 "so deepstack features cannot follow the kept tokens")
            slots = g.call_function(gather_slots, (later_ds[0].args[2], idx[0]))
            slots.name = f"slots_{layer}"
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
        # for the verifier: "exact" - positions are this cut's renumbering; "after" - a later
        # cut kept its tokens' (renumbered) positions
        if positions == "contiguous":
            d.meta["vlmopt"]["renumbered"] = "exact"
        elif d.meta["vlmopt"].get("renumbered"):
            d.meta["vlmopt"]["renumbered"] = "after"
    for d in later_ds:  # (hidden, visual, slots, feats)
        d.args = (d.args[0], swap.get(d.args[1], d.args[1]), slots, d.args[3])
    gm.recompile()


def gather_slots(slots, idx):
    """The merged-sequence slots of the kept tokens ``idx`` [B, T']."""
    return slots.gather(1, idx)


def set_visual_budget(node: fx.Node, keep: int | float) -> None:
    """Record a token change on a decoder node's meta: ``n_visual`` is the static count (None
    while it depends on the image size), ``visual_keeps`` every budget applied so far in order,
    so the count at any input size is ``visual_tokens(meta, n0)``."""
    info = node.meta["vlmopt"]
    from vlmopt.ir.tokens import keep_count

    info["visual_keeps"] = [*info.get("visual_keeps", []), keep]
    if isinstance(keep, int):
        info["n_visual"] = keep
    elif info["n_visual"] is not None:
        info["n_visual"] = keep_count(keep, info["n_visual"])


def visual_tokens(info: dict, n0: int) -> int:
    """Visual tokens reaching a decoder node (meta ``info``) for an image of ``n0`` tokens."""
    from vlmopt.ir.tokens import keep_count

    n = n0
    for keep in info.get("visual_keeps", []):
        n = keep if isinstance(keep, int) else keep_count(keep, n)
    return n
