"""quantize: nn.Linear W -> QuantLinear(codes, scales; weight = codes * scales), per-layer bits.

Weight-only, symmetric, per-group (vlmopt.ir.quant): each group of ``group_size`` input columns
of a row shares one scale. PyTorch evaluates the dequantized weights (fake quantization); the
emitter lowers every QuantLinear to ONNX Runtime's MatMulNBits (or Q/DQ) from its codes, scales,
``bits`` and ``group_size``.

Ensures: the selected linears - a decoder layer's q/k/v/o and MLP projections (low-rank Q/K
factors included: this pass runs last), and, only when named, the LM head ("head") and the
projector ("project") - become QuantLinears; nothing else changes (norms, embeddings, vision
tower, unselected linears are the same objects). Shared modules are never mutated: the node's
module is copied (frozen layers too) and the node retargeted. Node meta records ``bits``
({linear path: bits}) and ``group_size`` for the cost model.

Selectors (``bits``: name -> 2..8, or 0 = keep float). A linear is known by its full name
``layer_3.self_attn.q_proj`` (factors: ``layer_3.self_attn.q_proj.0`` / ``.1``),
``layer_3.mlp.down_proj``, ``project.linear_1``, ``head``. Most specific first: its full name,
the projection it factorizes, its node ("layer_3", "project"); then the first "re:" regex that
fully matches its full name; then "_default", which covers decoder layers only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import fx, nn

from vlmopt.ir.capture import decoder_nodes
from vlmopt.ir.quant import BITS, QuantLinear
from vlmopt.ir.weights import check_all_match, check_selectors, resolve, retarget
from vlmopt.passreg import PassResult, register_pass

_NAME = re.compile(r"^(layer_\d+|project|head)(\.[A-Za-z0-9_.]+)?$")
GROUP_SIZES = (16, 32, 64, 128, 256)


def _bits_ok(v) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and (v == 0 or v in BITS)
    return None if ok else f"bits must be 0 (float) or one of {BITS}"


@dataclass(frozen=True)
class Config:
    bits: dict = field(default_factory=dict)  # selector -> bits; {} = identity
    group_size: int = 64  # input columns per scale

    def __post_init__(self):
        check_selectors("bits", self.bits, _NAME.match, _bits_ok)
        if self.group_size not in GROUP_SIZES or isinstance(self.group_size, bool):
            raise ValueError(f"field 'group_size' must be one of {GROUP_SIZES}, "
                             f"got {self.group_size!r}")


# The search space lives beside the defaults: bits per layer (and per Q/K factor).
SEARCH_SPACE = {"bits": [8, 4], "group_size": [32, 64, 128]}


def uniform(bits: int, group_size: int = 64, head: bool = False,
            project: bool = False) -> Config:
    """Every decoder linear at ``bits``; the LM head / projector too when asked."""
    sel = {"_default": bits}
    sel.update({"head": bits} if head else {})
    sel.update({"project": bits} if project else {})
    return Config(bits=sel, group_size=group_size)


def units(gm: fx.GraphModule) -> list[tuple[fx.Node, str, str]]:
    """(node, unit name, path prefix inside the node's module) of every quantizable node."""
    out = [(n, f"layer_{n.meta['vlmopt']['layer']}", "layer.") for n in decoder_nodes(gm)]
    for n in gm.graph.nodes:
        block = n.meta.get("vlmopt", {}).get("block")
        if n.op == "call_module" and block in ("project", "head"):
            out.append((n, block, ""))
    return out


def linears(gm: fx.GraphModule) -> dict[str, tuple[fx.Node, str, nn.Linear]]:
    """{full name: (node, path in the node's module, linear)} in graph order."""
    out = {}
    for node, unit, prefix in units(gm):
        for path, m in gm.get_submodule(node.target).named_modules():
            if isinstance(m, nn.Linear) and path.startswith(prefix):
                rel = path[len(prefix):]
                full = unit if unit == "head" else f"{unit}.{rel.removeprefix('projector.')}"
                out[full] = (node, path, m)
    return out


def bits_for(config: Config, full: str) -> int | None:
    unit, _, rest = full.partition(".")
    exact = [full]
    if re.search(r"\.\d+$", full):  # a low-rank factor: also known by its projection
        exact.append(full.rsplit(".", 1)[0])
    exact.append(unit)
    return resolve(config.bits, exact, full, default=unit.startswith("layer_"))


@register_pass("quantize", Config)
def run(gm: fx.GraphModule, config: Config) -> PassResult:
    stats: dict = {"bits": {}, "group_size": config.group_size, "skipped": []}
    if not config.bits:
        return PassResult(gm, False, stats)
    lins = linears(gm)
    names = set(lins) | {f.split(".")[0] for f in lins} | {  # + projections with factors
        f.rsplit(".", 1)[0] for f in lins if re.search(r"\.\d+$", f)}
    regex = {k: v for k, v in config.bits.items() if k.startswith("re:")}
    check_all_match("quantize", "bits", regex, lins)  # NOTE: regexes match full names only
    check_all_match("quantize", "bits", {k: v for k, v in config.bits.items()
                                         if k not in regex}, names)
    per_node: dict[fx.Node, dict[str, nn.Module]] = {}
    for full, (node, path, lin) in lins.items():
        b = bits_for(config, full)
        if not b:
            continue
        if isinstance(lin, QuantLinear):
            stats["skipped"].append(f"{full}: already quantized")
            continue
        per_node.setdefault(node, {})[path] = QuantLinear.from_linear(lin, b,
                                                                       config.group_size)
        info = node.meta["vlmopt"]
        rel = path.removeprefix("layer.").removeprefix("projector.")
        info.setdefault("bits", {})[rel] = b
        info["group_size"] = config.group_size
        stats["bits"][full] = b
    for node, repl in per_node.items():
        retarget(gm, node, repl, "quant")
    gm.recompile()
    gm.delete_all_unused_submodules()
    return PassResult(gm, bool(stats["bits"]), stats)


# ------------------------------------------------------------ CASP-style mixed precision


def _groups(gm: fx.GraphModule) -> dict[str, list[tuple[str, nn.Linear]]]:
    """Allocation groups: per decoder layer, its Q and K (with their low-rank factors) each
    alone - CASP spends extra bits there - and the rest of the layer."""
    out: dict[str, list] = {}
    for full, (_, _, lin) in linears(gm).items():
        unit = full.split(".")[0]
        if not unit.startswith("layer_"):
            continue
        m = re.match(r"^(layer_\d+\.self_attn\.[qk]_proj)", full)
        out.setdefault(m.group(1) if m else unit, []).append((full, lin))
    return out


def config_bytes(gm: fx.GraphModule, config: Config, scale_bytes: int | None = None) -> int:
    """Bytes of every decoder-layer linear weight under ``config`` (codes + scales; float
    weights at their element size) - the quantity ``allocate_bits`` budgets."""
    from vlmopt.cost import matrix_bytes

    total = 0
    for full, (_, _, lin) in linears(gm).items():
        if full.startswith("layer_"):
            el = lin.weight.element_size()
            total += matrix_bytes(lin.out_features, lin.in_features, bits_for(config, full) or 0,
                                  config.group_size, scale_bytes or el, el)
    return total


def allocate_bits(gm: fx.GraphModule, sensitivity: dict[str, float], size_budget_bytes: int,
                  *, choices: tuple[int, ...] = (4, 8), group_size: int = 64,
                  qk_boost: float = 2.0, scale_bytes: int | None = None) -> Config:
    """Bits per decoder layer (and per Q/K projection) that minimise the modelled distortion
    sum_g w_g n_g 2^(-2 b_g) with the decoder linears' bytes (``config_bytes``) within
    ``size_budget_bytes``: rate-distortion allocation (shared/methods.md 8.3), solved greedily -
    start every group at min(choices), then repeatedly raise the group with the largest
    distortion drop per added byte that still fits.

    ``gm``: the graph to quantize (after lowrank_qk, so factors are priced at their size);
    ``sensitivity``: {"layer_i": w >= 0} for every decoder layer, e.g. the output KL when that
    layer alone is quantized to min(choices), or Layer Contribution; Q/K groups get
    ``qk_boost`` x their layer's (CASP gives all Q/K factors the higher width).
    """
    from vlmopt.cost import matrix_bytes

    choices = tuple(sorted(set(choices)))
    if not choices or any(b not in BITS for b in choices):
        raise ValueError(f"allocate_bits: choices must be among {BITS}, got {choices}")
    groups = _groups(gm)
    layers = sorted({g.split(".")[0] for g in groups}, key=lambda s: int(s[6:]))
    missing = [name for name in layers if name not in sensitivity]
    if missing:
        raise ValueError(f"allocate_bits: no sensitivity for {', '.join(missing)}")

    def size(g: str, b: int) -> int:
        return sum(matrix_bytes(lin.out_features, lin.in_features, b, group_size,
                                scale_bytes or lin.weight.element_size(),
                                lin.weight.element_size()) for _, lin in groups[g])

    weight = {g: float(sensitivity[g.split(".")[0]]) * (qk_boost if "." in g else 1.0)
              * sum(lin.weight.numel() for _, lin in groups[g]) for g in groups}
    level = dict.fromkeys(groups, 0)  # index into choices
    used = sum(size(g, choices[0]) for g in groups)
    if used > size_budget_bytes:
        raise ValueError(f"allocate_bits: {choices[0]} bits everywhere already needs {used} "
                         f"bytes > budget {size_budget_bytes}")
    while True:
        best, best_gain = None, 0.0
        for g, i in level.items():
            if i + 1 == len(choices):
                continue
            b0, b1 = choices[i], choices[i + 1]
            extra = size(g, b1) - size(g, b0)
            if used + extra > size_budget_bytes:
                continue
            gain = weight[g] * (2.0 ** (-2 * b0) - 2.0 ** (-2 * b1)) / max(extra, 1)
            if best is None or gain > best_gain:
                best, best_gain = g, gain
        if best is None:
            break
        used += size(best, choices[level[best] + 1]) - size(best, choices[level[best]])
        level[best] += 1
    bits: dict[str, int] = {}
    for name in layers:
        bits[name] = choices[level[name]] if name in level else choices[0]
    for g, i in level.items():
        if "." in g and choices[i] != bits[g.split(".")[0]]:
            bits[g] = choices[i]
    return Config(bits=bits, group_size=group_size)
