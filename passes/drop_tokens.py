"""drop_tokens: layer_{k-1} -> layer_k  becomes  layer_{k-1} -> score -> keep-top-k -> layer_k.

Ensures: from layer k on, each sample carries exactly ``keep[k]`` visual tokens (static counts,
non-increasing with depth); text tokens are never dropped; kept tokens keep their order and
their original position ids (``positions="original"``) or are renumbered 0.. after the cut
(``"contiguous"``, PyramidDrop's official code); the causal mask and RoPE are rebuilt for the
shorter sequence.
Requires: a captured LLaVA graph; counts not above what the previous passes left.

Scorers (shared/methods.md sections 2, 5, 9):
  last_query + score_at="previous": FastV - the last prompt token's head-mean attention in the
      layer before the cut (layer k-1, from its input), as in FastV's code;
  last_query + score_at="next": PyramidDrop - the same row recomputed with layer k's norm/q/k
      on the hidden states at the cut;
  text_mean: mean attention from every text token (text-guided);  random: a fixed hash of the
      original positions (the baseline);
  dart: DART (xqy1111111/DART at 5a19452; rule in vlmopt/ir/dart.py) - pivots by the L1 norm
      of layer k-1's post-RoPE keys (``pivot_image`` visual, ``pivot_text`` after the image),
      then per pivot the pool tokens least cosine-similar (final-normed hidden at the cut) to
      it; static counts (picks leave the pool), exportable; preset ``dart()``.
  sparsevlm: SparseVLM (Gumpest/SparseVLMs at 26a5f48; rule in vlmopt/ir/sparsevlm.py) - text
      raters chosen once on the LLM input (``raters``), then layer k-1's attention from the
      raters; ``recycle`` > 0 clusters that share of the pruned tokens (density-peak kNN) and
      appends the merged ones after the image (static count keep + C; fixed grids only);
      exportable; preset ``sparsevlm()``.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

from torch import fx

from vlmopt.ir import tokens
from vlmopt.ir.capture import decoder_nodes, node_by_block
from vlmopt.ir.rewrite import (
    ChainState,
    add_module,
    check_positions,
    insert_token_change,
    set_visual_budget,
)
from vlmopt.passreg import PassResult, register_pass

SCORERS = ("last_query", "text_mean", "random", "dart", "sparsevlm")
SCORE_AT = ("previous", "next")
_LAYER = re.compile(r"^layer_(\d+)$")


@dataclass(frozen=True)
class Config:
    # visual tokens kept from that layer on, e.g. {"layer_2": 98}; {} = identity. A float is a
    # fraction of the visual tokens that reach the layer (dynamic-resolution models: the count
    # follows each image's size, rounded half up, at least 1)
    keep: dict = field(default_factory=dict)
    scorer: str = "last_query"
    score_at: str = "previous"
    seed: int = 0
    # "original": kept tokens keep their position ids (vlmopt's default, FastV's official code);
    # "contiguous": renumbered 0.. after each cut (PyramidDrop's official code)
    positions: str = "original"
    # dart only: pivot tokens, visual ones and text ones after the image (official: 4 and 4)
    pivot_image: int = 4
    pivot_text: int = 4
    # sparsevlm only: where the raters come from ("after_image": the text after the image, as
    # the official code; "text": all the prompt's text) and the share of the pruned tokens
    # recycled into merged tokens (official 0.3; 0 = pruning only)
    raters: str = "after_image"
    recycle: float = 0.0

    def __post_init__(self):
        if not isinstance(self.keep, dict):
            raise ValueError("field 'keep' must map layer names to counts")
        last = None
        for name, n in sorted(self.keep.items(), key=lambda kv: _layer_index(kv[0])):
            i = _layer_index(name)
            if isinstance(n, float):  # a fraction of the visual tokens that reach the layer
                if not 0 < n <= 1:
                    raise ValueError(f"field 'keep': {name} fraction must lie in (0, 1], "
                                     f"got {n!r}")
                if i == 0 and self.score_at == "previous":
                    raise ValueError("field 'keep': layer_0 has no previous layer to score "
                                     "with; use score_at='next' or select_visual")
                continue
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"field 'keep': {name} must be a count >= 0 or a fraction "
                                 f"in (0, 1], got {n!r}")
            if i == 0 and self.score_at == "previous":
                raise ValueError("field 'keep': layer_0 has no previous layer to score with; "
                                 "use score_at='next' or select_visual")
            if last is not None and n > last:
                raise ValueError(f"field 'keep': counts must not increase with depth ({name})")
            last = n
        if self.scorer not in SCORERS:
            raise ValueError(f"field 'scorer' must be one of {SCORERS}, got {self.scorer!r}")
        if self.score_at not in SCORE_AT:
            raise ValueError(f"field 'score_at' must be one of {SCORE_AT}, got {self.score_at!r}")
        check_positions(self.positions)
        for f in ("pivot_image", "pivot_text"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"field '{f}' must be a count >= 0, got {v!r}")
        if self.pivot_image + self.pivot_text == 0:
            raise ValueError("field 'pivot_text': DART needs at least one pivot")
        _check_sparsevlm(self)
        if self.scorer == "dart":
            if self.score_at != "previous":
                raise ValueError("field 'score_at': dart ranks with layer k-1's keys and the "
                                 "hidden at the cut ('previous')")
            small = [n for n, c in self.keep.items() if isinstance(c, int) and c != 0
                     and c < self.pivot_image]
            if small:
                raise ValueError(f"field 'keep': {small[0]} keeps fewer tokens than "
                                 f"pivot_image={self.pivot_image}")


def _check_sparsevlm(c: Config) -> None:
    from vlmopt.ir.sparsevlm import RATERS

    if c.raters not in RATERS:
        raise ValueError(f"field 'raters' must be one of {RATERS}, got {c.raters!r}")
    r = c.recycle
    if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 <= r < 1:
        raise ValueError(f"field 'recycle' must lie in [0, 1), got {r!r}")
    if r and c.scorer != "sparsevlm":
        raise ValueError("field 'recycle' is for scorer 'sparsevlm' only")
    if c.scorer == "sparsevlm" and c.score_at != "previous":
        raise ValueError("field 'score_at': sparsevlm ranks with layer k-1's own attention "
                         "('previous')")
    if r and any(isinstance(n, float) for n in c.keep.values()):
        raise ValueError("field 'keep': recycling needs counts (a fixed visual grid), not "
                         "fractions")


def _layer_index(name: str) -> int:
    m = _LAYER.match(str(name))
    if not m:
        raise ValueError(f"field 'keep': {name!r} is not a layer name like 'layer_2'")
    return int(m.group(1))


# The search space lives beside the defaults: what a strategy may vary.
SEARCH_SPACE = {"keep": "non-increasing visual count per layer", "scorer": list(SCORERS)}


def fastv(k: int, r: float, n_visual: int, positions: str = "original") -> Config:
    """FastV(K, R): after K layers, keep round(N * (1 - R)) visual tokens. The official code
    (pkunlp-icler/FastV) keeps the kept tokens' own position ids (an independent
    re-implementation of it matched this pass's kept sets 50/50): ``positions="original"``."""
    return Config(keep={f"layer_{k}": round(n_visual * (1 - r))}, positions=positions)


def pdrop(layers: list[int], ratios: list[float], n_visual: int,
          positions: str = "contiguous") -> Config:
    """PyramidDrop: after each layer count r in ``layers``, keep int(N * ratio) of the N. The
    official code (Cooperx521/PyramidDrop at 6444f30, llava/model/modeling_llama_pdrop.py,
    ``pdrop_forward`` / ``pdrop_rank_drop``) rebuilds position ids as 0..len-1 after every
    stage: ``positions="contiguous"``, the
    default here; ``"original"`` is vlmopt's variant (kept tokens keep their ids)."""
    if len(layers) != len(ratios):
        raise ValueError("pdrop: layers and ratios differ in length")
    return Config(keep={f"layer_{r}": int(n_visual * q) for r, q in zip(layers, ratios)},
                  score_at="next", positions=positions)


def dart(k: int = 2, n_visual: int | None = None, budget: int | None = 128,
         reduction_ratio: float = 0.778, pivot_image: int = 4, pivot_text: int = 4,
         positions: str = "original") -> Config:
    """DART before layer ``k`` as the official code sizes it (xqy1111111/DART at 5a19452,
    llava/model/language_model/modeling_llama_self.py ``get_retained_image_token``; defaults
    from llava/eval/model_vqa_loader.py: K=2, max_num_trunction=128, 4 + 4 pivots):
    TOKEN_TOPK = floor(B / P) per pivot, B = ``budget`` or N * (1 - reduction_ratio),
    keep = pivot_image + P * TOKEN_TOPK (132 of 576 by default). The official code gathers the
    original position ids: ``positions="original"``, the default. ``n_visual`` None (dynamic
    resolution; the Qwen2.5-VL code sizes by the ratio): keep the fraction 1 - reduction_ratio
    of each image's tokens, rounded (within 4.5 tokens of the official count)."""
    P = pivot_image + pivot_text
    if n_visual is None:
        keep: int | float = float(1 - reduction_ratio)
    else:
        b = budget if budget is not None else n_visual * (1 - reduction_ratio)
        keep = min(n_visual, pivot_image + P * int(b // P))
    return Config(keep={f"layer_{k}": keep}, scorer="dart", pivot_image=pivot_image,
                  pivot_text=pivot_text, positions=positions)


def sparsevlm(budget: int = 192, n_visual: int | None = 576, n_layers: int = 32,
              recycle: float = 0.3, raters: str = "after_image",
              positions: str = "contiguous") -> Config:
    """SparseVLM as its official code runs LLaVA-1.5-7B (Gumpest/SparseVLMs at 26a5f48, v1.0:
    score.py ``sparse_token_dict``, modelling_sparse_llama.py): prune the output of layers 2,
    6, 15 to the ``budget`` row's counts (192: 300/200/110 of 576; 128, 96, 64 too), each at
    most one below what reaches it, recycling 30% of the pruned tokens; positions renumbered
    (``position_ids[:, :len]``): ``"contiguous"``. Other shapes scale the layers by
    n_layers / 32 and the counts by n_visual / 576 (vlmopt's). ``n_visual`` None (dynamic
    resolution): each stage keeps its official fraction of what reaches it, without recycling
    (which needs a fixed count; M-RoPE models also need ``positions="original"``)."""
    from vlmopt.ir.sparsevlm import official_schedule

    keep = official_schedule(budget, n_visual, n_layers, recycle)
    return Config(keep=keep, scorer="sparsevlm", raters=raters,
                  recycle=recycle if n_visual is not None else 0.0, positions=positions)


@register_pass("drop_tokens", Config)
def run(gm: fx.GraphModule, config: Config) -> PassResult:
    n_layers = gm.meta["vlmopt"]["n_layers"]
    stats: dict = {"keep": {}, "skipped": []}
    raters = None  # sparsevlm: the raters node, made at the first cut
    for name, keep in sorted(config.keep.items(), key=lambda kv: _layer_index(kv[0])):
        k = _layer_index(name)
        if k >= n_layers:
            raise ValueError(f"drop_tokens: {name} does not exist (model has {n_layers} layers)")
        decs = decoder_nodes(gm)
        cur = decs[k].meta["vlmopt"]["n_visual"]
        if cur is not None and isinstance(keep, float):  # a static count: resolve it now
            keep = tokens.keep_count(keep, cur)
        if cur is not None and keep > cur:
            raise ValueError(f"drop_tokens: {name} keeps {keep} but only {cur} visual tokens "
                             "reach it")
        if keep == cur or (isinstance(keep, float) and keep == 1.0):
            stats["skipped"].append(f"{name}: already {cur} visual tokens" if keep == cur
                                    else f"{name}: keeps every visual token")
            continue
        src = decs[k - 1] if config.score_at == "previous" else decs[k]
        hf_layer = gm.get_submodule(src.target).layer
        mode = {"last_query": "last", "text_mean": "text_mean"}.get(config.scorer, "random")
        if config.scorer == "random":
            scorer = add_module(gm, f"score_{k}", tokens.HashScore(config.seed))
        elif config.scorer == "sparsevlm":
            from vlmopt.ir import sparsevlm as svlm

            if raters is None:  # once, on the LLM input (decs[0] is untouched by cuts)
                raters = svlm.insert_raters(gm, config.raters)
            scorer = add_module(gm, f"score_{k}", svlm.RaterScore(hf_layer, cur))
            mode = "sparsevlm"
        elif config.scorer == "dart":
            from vlmopt.ir.dart import DartScore

            norm = gm.get_submodule(node_by_block(gm, "norm").target).norm
            scorer = add_module(gm, f"score_{k}", DartScore(
                hf_layer, norm, cur, keep, config.pivot_image, config.pivot_text))
            mode = "dart"
        else:
            scorer = add_module(gm, f"score_{k}", tokens.AttnScore(hf_layer, mode))
        merged = 0
        if config.recycle:
            from vlmopt.ir.sparsevlm import RecycleKeep

            if cur is None:
                raise ValueError(f"drop_tokens: node {decs[k].name!r}: SparseVLM's recycling "
                                 "needs a fixed visual-token count; this model's follows the "
                                 "image size (use recycle=0)")
            keeper = RecycleKeep(cur, keep, config.recycle)
            merged = keeper.n_merged
        else:
            keeper = tokens.KeepTopK(cur, keep)
        dropper = add_module(gm, f"drop_{k}", keeper)
        src_state = ChainState.at(src)

        def build(g, st, scorer=scorer, dropper=dropper, src_state=src_state, mode=mode,
                  src=src, keep=keep, keeper=keeper, merged=merged, raters=raters):
            if config.scorer == "random":
                s = g.call_module(scorer, (st.pos,))
            elif config.scorer == "sparsevlm":  # layer k-1's attention from the raters
                s = g.call_module(scorer, (src_state.hidden, src_state.rope, st.visual,
                                           st.amask, raters))
            elif config.scorer == "dart":  # layer k-1's keys, the hidden at the cut
                s = g.call_module(scorer, (src_state.hidden, src_state.rope, st.hidden,
                                           st.visual, st.amask))
            else:  # FastV scores layer k-1 from its own input; PDrop layer k from the cut
                s = g.call_module(scorer, (src_state.hidden, src_state.rope, st.visual,
                                           st.amask))
            s.meta["vlmopt"] = {"block": "score", "mode": "random" if config.scorer == "random"
                                else mode, "n_visual": src.meta["vlmopt"]["n_visual"],
                                "visual_keeps": list(src.meta["vlmopt"].get("visual_keeps", []))}
            if config.scorer == "dart":  # the cost model counts one cosine row per pivot
                s.meta["vlmopt"]["pivots"] = config.pivot_image + config.pivot_text
            d = g.call_module(dropper, (s, st.hidden, st.pos, st.visual, st.amask))
            d.meta["vlmopt"] = {"block": "drop", "keep": keep}
            if merged:  # the cost model counts the clustering's matmuls
                d.meta["vlmopt"].update(recycled=keeper.n_recycled, merged=merged)
            return tuple(g.call_function(operator.getitem, (d, i)) for i in range(5))

        insert_token_change(gm, k, build, config.positions)
        for d in decoder_nodes(gm)[k:]:
            set_visual_budget(d, keep + merged if merged else keep)
        stats["keep"][name] = keep
        if merged:
            stats.setdefault("merged", {})[name] = merged
    return PassResult(gm, bool(stats["keep"]), stats)
