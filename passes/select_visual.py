"""select_visual: merge -> layer_0  becomes  merge -> select -> keep-top-k -> layer_0.

Ensures: from layer 0 on, each sample carries exactly ``keep`` visual tokens (static count);
text tokens are never touched; kept tokens keep their ORIGINAL position ids and order by default
(``positions="original"``, vlmopt's variant), or are renumbered 0.. as the official DivPrune and
VisionZip code does (``positions="contiguous"``, the presets' default); the causal mask and
RoPE are rebuilt. The projector runs on all Nv visual features (the cost model's count).
Requires: a captured LLaVA graph with no token change before layer 0; ``keep`` <= Nv.

Methods (shared/methods.md sections 3, 4, 6, 10, 13):
  visionzip: dominant = top-(keep - contextual) patches by the CLS attention (summed over
      heads) of the ViT layer producing the projector's features; ``contextual`` merged tokens
      (target + mean of the remaining patches assigned to it by head-mean key cosine) formed
      before the projector, in their target's slot (``cls`` "patches": LightCompress's
      counting) or, with CLS first, in the official order (``cls`` "official", ``visionzip``).
      CLS-free towers (SigLIP, Qwen-VL): ``score`` "received" - the attention each token
      receives, mean over heads and queries (vlmopt.ir.received; tile towers, Idefics3 and
      InternVL: per pixel-shuffle group, vlmopt.ir.received_tiles).
  divprune: greedy max-min diversity on cosine distance of the post-projector embeddings,
      starting from the most isolated token. Tokens already chosen are excluded explicitly, so
      exact duplicates still yield ``keep`` distinct tokens (LightCompress's can keep fewer).
  kcenter: ToDRE's first stage - greedy k-center on the same distance: divprune's greedy
      loop started at the token closest to the mean embedding (the sets overlap only partly).
  pool: LLaVolta-style g x g average pooling of the embedding grid (keep = g * g), each pooled
      token in the slot of the patch nearest its window's centre. random: a position hash.
  vispruner: VisPruner (Theia-4869/VisPruner at aefa01a; rule in vlmopt/ir/vispruner.py):
      int(keep * important_ratio) patches by CLS attention of the feature layer's ViT layer
      (CLS-free towers: received attention of the last ViT layer, its SigLIP code's rule),
      the rest by dropping, in rounds of up to 8, the even-position tokens most similar (vision
      feature cosine) to an odd-position one. PyTorch only (a growing loop; export raises).
  mmtok: MMTok (Ironieser/MMTok at d1522cd; rule and deviations in vlmopt/ir/mmtok.py): greedy
      maximum coverage of the prompt's text tokens (text -> visual-embedding cosine) and of all
      vision features before the projector (vision -> vision), softmax-normalised, weighted
      1 : alpha; ``keep`` steps, one ONNX Loop (Qwen-VL: merge-group means of the last block).
  vtc_cls: VTC-CLS (THU-MIG/VTC-CLS at e41ac9b; vlmopt/ir/vtc_cls.py): top-``keep`` patches by
      the head-mean CLS attention summed over ViT layers ``start_layer`` .. the feature layer.
      CLS towers only (its code has no CLS-free variant): refused on others.
  vscan: VScan's first stage (Tencent/SelfEvolvingAgent at a82450e, VScan/; rule in
      vlmopt/ir/vscan.py): half of ``keep`` by CLS attention of ViT layer ``shallow_layer``
      inside ``window`` x ``window`` windows, the rest by the feature layer's CLS attention;
      every other token merged into its most cosine-similar retained one (projected space).
      CLS towers with a fixed grid only; its stage 2 is drop_tokens (vlmopt.ir.vscan.preset).
  cdpruner: CDPruner (Theia-4869/CDPruner at 9541616; rule and deviations in
      vlmopt/ir/cdpruner.py): greedy MAP of a conditional DPP whose kernel is the visual
      embeddings' cosine scaled by their (min-max normalised) relevance to the prompt's text;
      ``keep`` steps, exported as one ONNX Loop; CLS-free towers too (LLM-space only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import fx

from vlmopt.ir import select, tokens
from vlmopt.ir import select_wiring as wire
from vlmopt.ir.capture import decoder_nodes
from vlmopt.ir.rewrite import add_module, check_positions, insert_token_change, set_visual_budget
from vlmopt.passreg import PassResult, register_pass

METHODS = ("none", "visionzip", "divprune", "kcenter", "pool", "random", "vispruner", "mmtok",
           "vtc_cls", "vscan", "cdpruner")
SCORES = ("auto", "cls", "received")
CLS = ("patches", "official")


@dataclass(frozen=True)
class Config:
    method: str = "none"  # "none" = identity
    # visual tokens entering the LLM; ignored with method "none". A float in (0, 1] is a
    # fraction of the image's visual tokens (dynamic resolution: rounded half up, at least 1)
    keep: int | float = 0
    contextual: int = 0  # visionzip only: how many of ``keep`` are merged contextual tokens
    seed: int = 0  # random only
    # "original": kept tokens keep their position ids (vlmopt's default); "contiguous": the
    # shortened sequence is numbered 0.. as the official DivPrune / VisionZip code does
    positions: str = "original"
    # vispruner only: the share of ``keep`` chosen by CLS attention (the official default 0.5)
    important_ratio: float = 0.5
    # mmtok only: weight of the vision-coverage term and the two softmax temperatures
    # (official LLaVA defaults; its Qwen2.5-VL port uses tv_temperature 0.01)
    alpha: float = 0.5
    tv_temperature: float = 0.02
    vv_temperature: float = 0.2
    # vtc_cls only: first ViT layer of the CLS-attention ensemble (official default 16 of 24;
    # negative counts from the end, as a Python slice)
    start_layer: int = 16
    # visionzip / vispruner / vtc_cls: "cls" ranks by the [CLS] query's attention, "received"
    # by the attention tokens receive (their CLS-free variant; VTC-CLS has none), "auto" by
    # "cls" where the tower has a [CLS] the LLM does not read (the stats name the choice)
    score: str = "auto"
    # visionzip: "patches" - CLS is no LLM token (LightCompress's counting); "official" - it is
    # the first of the keep - contextual dominant tokens, in the official order (``visionzip``)
    cls: str = "patches"
    layer: int | None = None  # visionzip: hidden_states index read; None: the projector's
    # vscan only: the ViT layer of the local scan and the window side (official 5 and 6)
    shallow_layer: int = 5
    window: int = 6
    # cdpruner only: negate the text relevance before normalising (the official formula)
    negate_relevance: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"field 'method' must be one of {METHODS}, got {self.method!r}")
        check_positions(self.positions)
        self._check_score()
        for name, lo, low_ok, hi in (("important_ratio", 0, True, 1), ("alpha", 0, True, None),
                                     ("tv_temperature", 0, False, None),
                                     ("vv_temperature", 0, False, None)):
            r = getattr(self, name)
            if (not isinstance(r, (int, float)) or isinstance(r, bool) or not math.isfinite(r)
                    or r < lo or (r == lo and not low_ok) or (hi is not None and r > hi)):
                span = f"[{lo}, {hi}]" if hi is not None else (f">= {lo}" if low_ok
                                                               else f"> {lo}")
                raise ValueError(f"field {name!r} must be {span}, got {r!r}")
        for name in ("start_layer", "shallow_layer", "window"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or (name == "window" and v < 1):
                raise ValueError(f"field {name!r} must be an integer"
                                 + (" >= 1" if name == "window" else "") + f", got {v!r}")
        if not isinstance(self.negate_relevance, bool):
            raise ValueError(f"field 'negate_relevance' must be true or false, "
                             f"got {self.negate_relevance!r}")
        if isinstance(self.keep, float):
            if not 0 < self.keep <= 1:
                raise ValueError(f"field 'keep' fraction must lie in (0, 1], got {self.keep}")
            if self.method == "pool" or self.contextual:
                raise ValueError(f"field 'keep': method {self.method!r} with contextual "
                                 "tokens takes a count, not a fraction" if self.contextual
                                 else "field 'keep': method 'pool' takes a count, not a "
                                 "fraction")
            return
        for name in ("keep", "contextual", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"field {name!r} must be an integer, got {v!r}")
        if self.keep < (0 if self.method == "none" else 1):
            raise ValueError(f"field 'keep' must be >= {int(self.method != 'none')} for method "
                             f"{self.method!r}, got {self.keep}")
        if not 0 <= self.contextual <= self.keep:
            raise ValueError(f"field 'contextual' must lie in [0, keep={self.keep}], "
                             f"got {self.contextual}")
        if self.contextual and self.method != "visionzip":
            raise ValueError("field 'contextual' is for method 'visionzip' only")
        if self.method == "pool" and math.isqrt(self.keep) ** 2 != self.keep:
            raise ValueError(f"field 'keep' must be a square g * g for method 'pool', "
                             f"got {self.keep}")
        if self.cls == "official" and self.keep - self.contextual < 1:
            raise ValueError(f"field 'cls': 'official' counts CLS among the keep - contextual "
                             f"= {self.keep - self.contextual} dominant tokens; needs >= 1")

    def _check_score(self):
        ranked = ("visionzip", "vispruner", "vtc_cls")
        for name, allowed in (("score", SCORES), ("cls", CLS)):
            v = getattr(self, name)
            if v not in allowed:
                raise ValueError(f"field {name!r} must be one of {allowed}, got {v!r}")
        if self.score != "auto" and self.method not in ranked:
            raise ValueError(f"field 'score' is for methods {ranked} only")
        if self.layer is not None and (self.method != "visionzip" or isinstance(self.layer, bool)
                                       or not isinstance(self.layer, int)):
            raise ValueError(f"field 'layer' is an integer for method 'visionzip' only, got "
                             f"{self.layer!r}")
        if self.method == "vtc_cls" and self.score == "received":
            raise ValueError("field 'score': VTC-CLS defines no received-attention variant "
                             "(its code ranks by CLS attention only)")
        if self.cls == "official" and (self.method != "visionzip" or self.score == "received"):
            raise ValueError("field 'cls' is for method 'visionzip' only, ranked by a CLS token")
        if self.cls == "official" and (self.positions != "contiguous"
                                       or isinstance(self.keep, float)):
            raise ValueError("field 'cls': 'official' needs positions 'contiguous' and a count "
                             "keep (CLS has no patch position; the official code renumbers)")


# The search space (what a strategy may vary) lives beside the defaults.
SEARCH_SPACE = {"method": list(METHODS[1:]), "keep": "visual tokens kept, 1..Nv (pool: g*g)",
                "contextual": "visionzip: 0..keep (paper: keep * 10 / 64)"}


def visionzip(dominant: int, contextual: int, positions: str = "contiguous",
              cls: str = "official", score: str = "auto", layer: int | None = None) -> Config:
    """VisionZip(dominant, contextual), e.g. (54, 10) for 64 LLM tokens, as the official code
    runs it (dvlab-research/VisionZip at 3151f6d): ``visionzip(model, 54, 10)`` keeps CLS plus
    the top-53 patches by CLS attention (visionzip/main.py passes dominant - 1;
    visionzip/clip_encoder.py prepends index 0) and feeds [CLS, dominant patches in index
    order, contextual tokens] to the projector and the LLM, which visionzip/llava_arch.py
    rebuilds with ``position_ids=None`` (contiguous positions). It reads
    ``hidden_states[-2]`` and ``attentions[-2]`` (hard-coded: LLaVA-1.5's feature layer);
    vlmopt reads the projector's feature layer, the same there (``layer=-2`` forces the
    literal read elsewhere). ``cls="patches"``: LightCompress's counting
    (llmc/compression/token_reduction/visionzip.py: 54 patches, CLS dropped by strategy
    "default") in vlmopt's layout (contextual tokens in their target's slot), which also takes
    ``positions="original"``. CLS-free towers: ``cls="patches"``, ranked by received attention
    (``Config.score``)."""
    return Config(method="visionzip", keep=dominant + contextual, contextual=contextual,
                  positions=positions, cls=cls, score=score, layer=layer)


def divprune(keep: int, positions: str = "contiguous") -> Config:
    """DivPrune keeping ``keep`` tokens. The official LLaVA path (vbdi/divprune at 799e2d9,
    LLaVA/llava/model/llava_arch.py) returns ``position_ids=None`` with the pruned sequence, so
    positions are contiguous: the default here; ``"original"`` is vlmopt's variant."""
    return Config(method="divprune", keep=keep, positions=positions)


def mmtok(keep: int | float, alpha: float = 0.5, tv_temperature: float = 0.02,
          vv_temperature: float = 0.2, positions: str = "contiguous") -> Config:
    """MMTok keeping ``keep`` tokens (a fraction on dynamic-resolution models). Follows
    Ironieser/MMTok at d1522cd (mmtok/core/semantic_selector.py; defaults from
    mmtok/llava/llava_inject.py; its Qwen2.5-VL port uses tv_temperature 0.01, keeps 20% and
    the original M-RoPE ids: pass ``positions="original"`` there). Its LLaVA path rebuilds
    the sequence with ``position_ids=None`` (mmtok/llava/llava_arch_mmtok.py): contiguous
    positions, the default here. Text targets are the whole prompt (vlmopt.ir.mmtok)."""
    return Config(method="mmtok", keep=keep, alpha=alpha, tv_temperature=tv_temperature,
                  vv_temperature=vv_temperature, positions=positions)


def vtc_cls(keep: int, start_layer: int = 16, positions: str = "contiguous") -> Config:
    """VTC-CLS keeping ``keep`` patches by CLS attention summed over ViT layers ``start_layer``
    .. the feature layer. Follows THU-MIG/VTC-CLS at e41ac9b (llava/model/multimodal_encoder/
    clip_encoder.py ``cls_token_only``, llava/model/llava_arch.py ``encode_images``; ``--layer``
    default 16 in llava/eval/model_vqa_loader.py): contiguous positions (``position_ids=None``)."""
    return Config(method="vtc_cls", keep=keep, start_layer=start_layer, positions=positions)


def cdpruner(keep: int | float, negate_relevance: bool = True, positions: str = "contiguous"
             ) -> Config:
    """CDPruner keeping ``keep`` tokens (a fraction on dynamic-resolution models). Follows
    Theia-4869/CDPruner at 9541616 (llava/model/llava_arch.py ``encode_images``): the pruned
    sequence is rebuilt with ``position_ids=None``, so positions are contiguous: the default
    here (M-RoPE models need ``"original"``). Relevance is computed in the LLM's input space,
    not CLIP's (vlmopt.ir.cdpruner)."""
    return Config(method="cdpruner", keep=keep, negate_relevance=negate_relevance,
                  positions=positions)


def vispruner(keep: int, important_ratio: float = 0.5, positions: str = "contiguous"
              ) -> Config:
    """VisPruner keeping ``keep`` tokens, ``int(keep * important_ratio)`` of them by CLS
    attention. Follows Theia-4869/VisPruner at aefa01a (llava/model/llava_arch.py,
    ``encode_images`` and ``prepare_inputs_labels_for_multimodal``; important_ratio default
    0.5 from llava/eval/model_vqa_loader.py): the pruned sequence is rebuilt with
    ``position_ids=None``, so positions are contiguous: the default here. CLS-free towers rank
    by the last ViT layer's received attention (its SigLIP tower's rule, ``Config.score``)."""
    return Config(method="vispruner", keep=keep, positions=positions,
                  important_ratio=important_ratio)


@register_pass("select_visual", Config)
def run(gm: fx.GraphModule, config: Config) -> PassResult:
    decs = decoder_nodes(gm)
    nv = decs[0].meta["vlmopt"]["n_visual"]
    stats: dict = {"method": config.method, "keep": config.keep, "n_visual_in": nv}
    if config.method == "none":
        stats["keep"] = nv
        return PassResult(gm, False, stats)
    from vlmopt.frontend.family import adapter_of_graph

    why = adapter_of_graph(gm.meta["vlmopt"]).refused_select.get(config.method)
    if why:  # the family's tower cannot serve the method's scores
        raise ValueError(f"select_visual: node {decs[0].name!r}: method {config.method!r} on "
                         f"{gm.meta['vlmopt']['model_type']}: {why}")
    keep = config.keep
    if gm.meta["vlmopt"].get("tome"):
        raise ValueError(f"select_visual: node {decs[0].name!r}: the vision tower already "
                         "merges tokens (merge_vision); a selection after it is not supported")
    if nv is None and (config.method == "pool" or config.contextual):
        raise ValueError(f"select_visual: node {decs[0].name!r}: "
                         + ("method 'pool'" if config.method == "pool" else
                            "VisionZip's contextual tokens") + " need a fixed visual-token "
                         "grid; this model's count follows the image size (VisionZip with "
                         "contextual=0, divprune, kcenter, mmtok or random work)")
    if nv is not None and isinstance(keep, float):
        keep = tokens.keep_count(keep, nv)
        stats["keep"] = keep
    if nv is not None and keep > nv:
        raise ValueError(f"select_visual: node {decs[0].name!r}: keep={keep} but only "
                         f"{nv} visual tokens reach it")
    if keep == nv or (isinstance(keep, float) and keep == 1.0):
        stats["skipped"] = f"keep equals the {nv} visual tokens: nothing to select"
        return PassResult(gm, False, stats)
    patch_scores = vfeats = None
    m = config.method
    if m in ("visionzip", "vispruner", "vtc_cls"):
        stats["score"] = score = wire.resolve_score(gm, config)
    if m == "visionzip":
        stats["cls"] = config.cls
        patch_scores = (wire.received_scores(gm, config.layer) if nv is None else
                        wire.visionzip_scores(gm, nv, keep, config.contextual, score,
                                              config.cls == "official", config.layer))
    elif m == "vispruner":
        if nv is None:
            raise ValueError(f"select_visual: node {decs[0].name!r}: VisPruner needs a fixed "
                             "visual-token grid; this model's count follows the image size")
        patch_scores = wire.vispruner_scores(gm, nv, keep, config.important_ratio, score)
    elif m == "vtc_cls":
        patch_scores = wire.vtc_cls_scores(gm, config.start_layer)
    elif m == "vscan":
        from vlmopt.ir import vscan

        rows = vscan.vscan_rows(gm, config.shallow_layer)
        stats["keep_requested"] = keep
        keep = vscan.kept_count(nv, keep, config.window)  # the count the rule keeps
        stats["keep"] = keep
    elif m == "mmtok":
        vfeats = wire.vision_features(gm)
    if patch_scores is not None:
        scorer = add_module(gm, "select_slots", select.SlotScores())
    elif m == "random":
        scorer = add_module(gm, "select_random", tokens.HashScore(config.seed))
    elif m == "pool":
        scorer = add_module(gm, "select_pool", select.GridPool(nv, config.keep))
    elif m == "vscan":
        scorer = add_module(gm, "select_vscan", vscan.VScanSelect(nv, stats["keep_requested"],
                                                                  config.window))
    elif m == "cdpruner":
        from vlmopt.ir.cdpruner import DppScore

        scorer = add_module(gm, "select_cdpruner", DppScore(nv, keep, config.negate_relevance))
    elif m == "mmtok":
        from vlmopt.ir.mmtok import CoverageScore

        scorer = add_module(gm, "select_mmtok", CoverageScore(
            nv, keep, config.alpha, config.tv_temperature, config.vv_temperature))
    else:
        start = "isolated" if m == "divprune" else "mean"
        scorer = add_module(gm, f"select_{m}", select.DiversityScore(nv, keep, start))
    keeper = add_module(gm, "keep_visual", tokens.KeepTopK(nv, keep))

    def build(g, st):
        hidden = st.hidden
        if patch_scores is not None:
            s = wire.tag(g.call_module(scorer, (patch_scores, st.visual)), select_op="slots")
        elif m == "random":
            s = wire.tag(g.call_module(scorer, (st.pos,)), select_op="random")
        elif m == "pool":
            p = wire.tag(g.call_module(scorer, (st.hidden, st.visual)), select_op="pool")
            s, hidden = wire.getitems(g, p, 2)
        elif m == "vscan":
            p = wire.tag(g.call_module(scorer, (st.hidden, st.visual, rows)),
                         select_op="vscan_merge", n_visual=nv, n_kept=keep)
            s, hidden = wire.getitems(g, p, 2)
        elif m == "mmtok":
            s = wire.tag(g.call_module(scorer, (st.hidden, st.visual, st.amask, vfeats)),
                         select_op="coverage", n_visual=nv)
        elif m == "cdpruner":
            s = wire.tag(g.call_module(scorer, (st.hidden, st.visual, st.amask)),
                         select_op="dpp", n_visual=nv)
        else:
            s = wire.tag(g.call_module(scorer, (st.hidden, st.visual)), select_op="diversity",
                         n_visual=nv)
        d = g.call_module(keeper, (s, hidden, st.pos, st.visual, st.amask))
        d.meta["vlmopt"] = {"block": "drop", "keep": keep}
        return tuple(wire.getitems(g, d, 5))

    insert_token_change(gm, 0, build, config.positions)
    gm.graph.eliminate_dead_code()  # the uncut sequence's mask and rope now feed nothing
    gm.recompile()
    for d in decoder_nodes(gm):
        set_visual_budget(d, keep)
    return PassResult(gm, True, stats)
