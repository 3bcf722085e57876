"""The pass registry and the canonical pass order: what a pass module imports to register itself.

A pass is a module in ``passes/`` with a frozen ``Config`` dataclass (defaults = identity) and a
``run(graph, config) -> PassResult``, registered by one explicit line::

    @register_pass("drop_tokens", Config)
    def run(gm, config): ...

This module imports no pass; ``vlmopt.pipeline`` (the pass manager) imports them all, so the
import graph stays one-way: pipeline -> passes -> passreg.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx

# The canonical order, read top to bottom. A plan lists a subset of these, in this order.
ORDER = [
    "merge_vision",  # inside the vision tower (ToMe): first, on the tower as captured
    "select_visual",  # after the projector: the LLM sees fewer visual tokens from layer 0
    "drop_tokens",  # between decoder layers: counts are of the tokens select_visual left
    "freeze_visual",  # ShortV: a frozen layer's cost depends on the counts the drops leave it
    "lowrank_qk",  # replaces W_q/W_k inside attention; the scorers above read the dense ones
    "quantize",  # last: quantizes whatever linears exist by now, low-rank factors included
]


@dataclass
class PassResult:
    graph: fx.GraphModule
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassInfo:
    name: str
    config: type
    run: Callable[[fx.GraphModule, Any], PassResult]


_REGISTRY: dict[str, PassInfo] = {}


def register_pass(name: str, config_cls: type):
    if name not in ORDER:
        raise ValueError(f"pass {name!r} has no place in passreg.ORDER")

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} registered twice")
        _REGISTRY[name] = PassInfo(name, config_cls, fn)
        return fn

    return deco
