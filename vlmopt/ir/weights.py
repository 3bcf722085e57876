"""Weight rewrites shared by the lowrank_qk and quantize passes.

- Selectors (shared/STYLE.md): a JSON dict from a name to a value, where a key is an exact name
  ("layer_3", "layer_3.self_attn.q_proj"), a regex ("re:layer_[0-3]", full match) or
  "_default". Resolution: the most specific exact name first, then the first matching regex in
  the dict's order, then "_default".
- Copy-on-write replacement of submodules: captured graphs (and their clones) share modules
  with the original model, so a pass never assigns into a shared module. It copies every module
  on the path to the replaced ones (``copy.copy`` + fresh child dicts) and shares the rest.
- Retargeting a decoder-like node to such a copy.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable

from torch import fx, nn

from vlmopt.ir.rewrite import add_module

DEFAULT = "_default"


def check_regex(where: str, key: str) -> None:
    """A 're:' selector must compile; the error names the field."""
    try:
        re.compile(key[3:])
    except re.error as e:
        raise ValueError(f"field '{where}': bad regex {key!r}: {e}") from None


def check_selectors(where: str, sel: object, name_ok: Callable[[str], bool],
                    value_ok: Callable[[object], str | None]) -> None:
    """Validate a selector dict; ``where`` names the field in every error (a ValueError)."""
    if not isinstance(sel, dict):
        raise ValueError(f"field '{where}' must be a dict of selector -> value")
    for key, v in sel.items():
        if not isinstance(key, str):
            raise ValueError(f"field '{where}': selector {key!r} is not a string")
        if key.startswith("re:"):
            check_regex(where, key)
        elif key != DEFAULT and not name_ok(key):
            raise ValueError(f"field '{where}': {key!r} is not a valid name, 're:' regex or "
                             f"'{DEFAULT}'")
        problem = value_ok(v)
        if problem:
            raise ValueError(f"field '{where}': {key}: {problem}, got {v!r}")


def resolve(sel: dict, exact: Iterable[str], full: str, *, default: bool = True):
    """The value ``sel`` gives to a thing known by the ``exact`` names (most specific first)
    whose full name is ``full``; None when nothing selects it."""
    for name in exact:
        if name in sel:
            return sel[name]
    for key, v in sel.items():
        if key.startswith("re:") and re.fullmatch(key[3:], full):
            return v
    return sel.get(DEFAULT) if default else None


def check_all_match(pass_name: str, field: str, sel: dict, names: Iterable[str]) -> None:
    """Every exact or regex selector must select something: a typo is an error, not a no-op."""
    names = list(names)
    for key in sel:
        if key == DEFAULT:
            continue
        hit = (any(re.fullmatch(key[3:], n) for n in names) if key.startswith("re:")
               else key in names)
        if not hit:
            raise ValueError(f"{pass_name}: field '{field}': selector {key!r} matches nothing")


def replace_submodules(root: nn.Module, repl: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``root`` with each dotted path in ``repl`` replaced. Modules on the paths are
    shallow-copied; every other module, parameter and buffer is shared, none is mutated."""
    new = copy.copy(root)
    # NOTE: copy.copy shares __dict__'s containers: give the copy its own before any assignment
    new._modules = dict(root._modules)
    new._parameters = dict(root._parameters)
    new._buffers = dict(root._buffers)
    groups: dict[str, dict[str, nn.Module]] = {}
    for path, mod in repl.items():
        head, _, rest = path.partition(".")
        if head not in root._modules:
            raise KeyError(f"{type(root).__name__} has no submodule {head!r}")
        if rest:
            groups.setdefault(head, {})[rest] = mod
        else:
            new._modules[head] = mod
    for head, sub in groups.items():
        new._modules[head] = replace_submodules(root._modules[head], sub)
    return new


def retarget(gm: fx.GraphModule, node: fx.Node, repl: dict[str, nn.Module], suffix: str) -> str:
    """Point ``node`` at a copy of its module with ``repl`` (paths relative to that module)
    swapped in; the copy is added to ``gm`` as ``<old target>_<suffix>``."""
    old = gm.get_submodule(node.target)
    name = add_module(gm, f"{node.target}_{suffix}", replace_submodules(old, repl))
    node.target = name
    return name
