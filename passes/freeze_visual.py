"""freeze_visual: layer_i -> frozen_i, a ShortV layer in which visual tokens get no update.

Ensures: in each chosen layer, visual hidden states pass through unchanged and text tokens get
exactly the dense layer's update (visual tokens still serve as keys and values); token counts,
positions and the KV cache are unchanged. Requires: the final visual count of each chosen layer
(so it runs after drop_tokens), and a layer choice - usually by Layer Contribution
(``vlmopt analyze``, shared/methods.md section 7).

Selectors: exact layer names ("layer_5") or regexes ("re:layer_[5-7]").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import fx

from vlmopt.ir.capture import decoder_nodes
from vlmopt.ir.frozen import FrozenDecoder
from vlmopt.ir.rewrite import add_module
from vlmopt.ir.weights import check_regex
from vlmopt.passreg import PassResult, register_pass

_LAYER = re.compile(r"^layer_\d+$")


@dataclass(frozen=True)
class Config:
    layers: list = field(default_factory=list)  # selectors; [] = identity

    def __post_init__(self):
        if not isinstance(self.layers, (list, tuple)):
            raise ValueError("field 'layers' must be a list of layer names or 're:' patterns")
        for s in self.layers:
            if not isinstance(s, str):
                raise ValueError(f"field 'layers': {s!r} is not a string")
            if s.startswith("re:"):
                check_regex("layers", s)
            elif not _LAYER.match(s):
                raise ValueError(f"field 'layers': {s!r} is not a layer name like 'layer_3'")


# The search space lives beside the defaults: which layers to freeze (ranked by LC).
SEARCH_SPACE = {"layers": "subset of decoder layers, lowest Layer Contribution first"}


def select(names: list[str], selectors: list[str]) -> list[str]:
    chosen = []
    for s in selectors:
        hits = [n for n in names if (re.fullmatch(s[3:], n) if s.startswith("re:") else n == s)]
        if not hits:
            raise ValueError(f"freeze_visual: selector {s!r} matches no layer")
        chosen += [h for h in hits if h not in chosen]
    return chosen


@register_pass("freeze_visual", Config)
def run(gm: fx.GraphModule, config: Config) -> PassResult:
    decs = {n.target: n for n in decoder_nodes(gm)}
    chosen = select(list(decs), list(config.layers))
    for name in chosen:
        node = decs[name]
        info = node.meta["vlmopt"]
        if info.get("frozen"):
            continue
        dense = gm.get_submodule(node.target)
        node.target = add_module(gm, f"frozen_{info['layer']}",
                                 FrozenDecoder(dense.layer, info["layer"], info["n_visual"]))
        info["frozen"] = True
    gm.recompile()
    gm.delete_all_unused_submodules()
    return PassResult(gm, bool(chosen), {"frozen": chosen})
