"""lowrank_qk: q_proj/k_proj W [d_out, d_in] -> Linear(d_in -> r) then Linear(r -> d_out) (CASP).

Activation-aware (whitened) SVD, shared/methods.md section 8.2: with G = E[x x^T] of the
layer's normed input (input_layernorm output) over calibration tokens, visual and text, and
S S^T = G + damp * mean(diag G) * I (Cholesky), W ~= U_r sqrt(Sigma_r) . sqrt(Sigma_r) V_r^T
S^{-1} where U Sigma V^T = svd(W S): the rank-r W' with least error on those activations.

Ensures: only the chosen layers' q_proj/k_proj change (v_proj, o_proj, norms, MLP and every other
layer are the same module objects); each becomes a ``LowRankLinear`` whose factors are shaped
like the weight they replace (a verifier invariant), bias (Qwen2) on the second factor; the
node's meta records ``q_rank``/``k_rank`` for the cost model. Shared modules are never mutated:
the layer is copied (frozen ShortV layers too - this pass runs after freeze_visual) and the
node retargeted. Token counts, positions and KV shapes are unchanged.

Weighting (``weighting``): "modality" (default) takes G = (G_visual + G_text) / 2, each
modality's own second moment, instead of the published all-token mean ("token"), in which the
~14x more numerous visual tokens drown the text tokens whose queries decide the answer; see
vlmopt.calib_stats.whitening_covariance for why and what it costs on the built-in model.

Calibration (``whiten``): the config names the data (``calib``, ``calib_samples``), never a
file of statistics, so ``vlmopt apply plan.json MODEL`` recomputes the same covariances from the
plan alone; they come from vlmopt.calib_stats (the ORIGINAL model's activations, cached per
model fingerprint and data). ``whiten=false`` is the plain SVD and needs no data.

NOTE: token-drop scorers (drop_tokens) hold the original layer, so their q.k scores stay dense.
Selectors (``q_rank``, ``k_rank``: rank; ``q_ratio``, ``k_ratio``: fraction of the weight's
parameters kept, r = floor(ratio d_out d_in / (d_out + d_in))): exact layer name ("layer_3"),
"re:" regex, "_default". A projection uses a rank or a ratio field, not both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import fx

from vlmopt.calib_stats import WEIGHTINGS, covariances_for_graph, whitening_covariance
from vlmopt.ir.capture import decoder_nodes
from vlmopt.ir.lowrank import LowRankLinear, factorize, rank_for_ratio
from vlmopt.ir.weights import check_all_match, check_selectors, resolve, retarget
from vlmopt.passreg import PassResult, register_pass

_LAYER = re.compile(r"^layer_\d+$")
PROJ = {"q": "q_proj", "k": "k_proj"}


def _rank_ok(v) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
    return None if ok else "a rank must be an integer >= 1"


def _ratio_ok(v) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1
    return None if ok else "a parameter ratio must be a number in (0, 1]"


@dataclass(frozen=True)
class Config:
    q_rank: dict = field(default_factory=dict)  # selector -> rank of W_q; {} = dense
    k_rank: dict = field(default_factory=dict)
    q_ratio: dict = field(default_factory=dict)  # selector -> fraction of W_q's params kept
    k_ratio: dict = field(default_factory=dict)
    whiten: bool = True  # activation-aware SVD; False = plain SVD (no calibration data)
    calib: str = "builtin:synthvqa-calib"  # dataset spec the covariances are computed on
    calib_samples: int = 32  # its first N records
    damp: float = 0.01  # Cholesky damping, relative to the mean diagonal of G
    weighting: str = "modality"  # G over tokens: "modality" (visual/text halves) or "token"

    def __post_init__(self):
        for p in PROJ:
            check_selectors(f"{p}_rank", getattr(self, f"{p}_rank"), _LAYER.match, _rank_ok)
            check_selectors(f"{p}_ratio", getattr(self, f"{p}_ratio"), _LAYER.match, _ratio_ok)
            if getattr(self, f"{p}_rank") and getattr(self, f"{p}_ratio"):
                raise ValueError(f"field '{p}_ratio': set {p}_rank or {p}_ratio, not both")
        if not isinstance(self.whiten, bool):
            raise ValueError(f"field 'whiten' must be true or false, got {self.whiten!r}")
        if not isinstance(self.calib, str) or not self.calib:
            raise ValueError("field 'calib' must name a dataset (path or builtin:...)")
        n = self.calib_samples
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"field 'calib_samples' must be an integer >= 1, got {n!r}")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) \
                or not 0 <= self.damp < 1:
            raise ValueError(f"field 'damp' must be a number in [0, 1), got {self.damp!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"field 'weighting' must be one of {', '.join(WEIGHTINGS)}, "
                             f"got {self.weighting!r}")

    @property
    def is_identity(self) -> bool:
        return not (self.q_rank or self.k_rank or self.q_ratio or self.k_ratio)


# The search space lives beside the defaults: the parameter fraction kept per projection
# (CASP keeps 25% of W_q/W_k for LLaVA-1.5-7B, 50% for LLaVA-NeXT-Video).
SEARCH_SPACE = {"q_ratio": [0.125, 0.25, 0.5, 0.75], "k_ratio": [0.125, 0.25, 0.5, 0.75]}


def casp(ratio: float = 0.25, layers: str = "_default", **kw) -> Config:
    """CASP's setting: W_q and W_k of ``layers`` (a selector) keep ``ratio`` of their params."""
    return Config(q_ratio={layers: ratio}, k_ratio={layers: ratio}, **kw)


def ranks_for(config: Config, layer: str, shapes: dict[str, tuple[int, int]]) -> dict:
    """{"q": rank or None, "k": ...} for one layer; ``shapes``: {"q": (d_out, d_in), ...}."""
    out = {}
    for p, (d_out, d_in) in shapes.items():
        r = resolve(getattr(config, f"{p}_rank"), [layer], layer)
        ratio = resolve(getattr(config, f"{p}_ratio"), [layer], layer)
        if r is None and ratio is not None:
            r = rank_for_ratio(ratio, d_out, d_in)
        if r is not None and r > min(d_out, d_in):
            raise ValueError(f"lowrank_qk: {layer} {p}_rank {r} exceeds full rank "
                             f"{min(d_out, d_in)} of its {d_out}x{d_in} W_{p}")
        out[p] = r
    return out


@register_pass("lowrank_qk", Config)
def run(gm: fx.GraphModule, config: Config) -> PassResult:
    stats: dict = {"q_rank": {}, "k_rank": {}, "params_kept": {}, "skipped": []}
    if config.is_identity:
        return PassResult(gm, False, stats)
    decs = decoder_nodes(gm)
    names = [f"layer_{n.meta['vlmopt']['layer']}" for n in decs]
    for f in ("q_rank", "k_rank", "q_ratio", "k_ratio"):
        check_all_match("lowrank_qk", f, getattr(config, f), names)
    covs = None
    for node, name in zip(decs, names):
        attn = gm.get_submodule(node.target).layer.self_attn
        lins = {p: getattr(attn, proj) for p, proj in PROJ.items()}
        if any(isinstance(m, LowRankLinear) for m in lins.values()):
            stats["skipped"].append(f"{name}: already low-rank")
            continue
        ranks = ranks_for(config, name, {p: tuple(m.weight.shape) for p, m in lins.items()})
        if all(r is None for r in ranks.values()):
            continue
        cov = None
        if config.whiten and not lins["q"].weight.is_meta:
            if covs is None:  # NOTE: one lookup per run; the statistics are cached
                covs = covariances_for_graph(gm, config.calib, config.calib_samples,
                                             who="lowrank_qk")
            cov = whitening_covariance(covs, name, config.weighting)
        repl = {}
        for p, r in ranks.items():
            if r is None:
                continue
            repl[f"layer.self_attn.{PROJ[p]}"] = factorize(lins[p], r, cov, config.damp)
            d_out, d_in = lins[p].weight.shape
            node.meta["vlmopt"][f"{p}_rank"] = r
            stats[f"{p}_rank"][name] = r
            stats["params_kept"][f"{name}.{p}"] = round(r * (d_in + d_out) / (d_in * d_out), 4)
        retarget(gm, node, repl, "lowrank")
    gm.recompile()
    gm.delete_all_unused_submodules()
    changed = bool(stats["q_rank"] or stats["k_rank"])
    stats["whitened"] = bool(config.whiten and covs is not None)
    if stats["whitened"]:
        stats["weighting"] = config.weighting
    return PassResult(gm, changed, stats)
