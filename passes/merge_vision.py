"""merge_vision: vision -> project -> merge  becomes
tome_vision -> project -> anchor slots -> merge -> keep-top-k -> layer_0.

ToMe (facebookresearch/ToMe at af95e4b; rule and deviations in vlmopt/ir/tome.py): the vision
tower runs layer by layer up to the feature layer, and each layer merges ``r`` of its tokens
(bipartite soft matching on the head-mean keys, size-weighted averages, proportional attention),
so the tower itself gets cheaper; the projector runs on the N' merged tokens, each written into
the prompt slot of its anchor patch, and the LLM sees exactly those N' visual tokens.

Ensures: from layer 0 on, each sample carries exactly N' = Nv - sum(r) visual tokens (static);
text tokens are never touched; the kept slots are sorted (causal mask and RoPE rebuilt);
positions renumbered 0.. (``"contiguous"``, the preset's default) or the anchors' own.
Requires: a fixed-grid CLIP tower whose CLS is dropped (LLaVA); runs before any other token
pass (passreg.ORDER). Qwen-VL is refused: its 2x2 patch merger needs every patch of the grid.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from torch import fx

from vlmopt.ir import tokens
from vlmopt.ir.capture import decoder_nodes, node_by_block
from vlmopt.ir.rewrite import add_module, check_positions, insert_token_change, set_visual_budget
from vlmopt.ir.select import SlotScores
from vlmopt.passreg import PassResult, register_pass


@dataclass(frozen=True)
class Config:
    # merges per ViT layer: one int for every layer that runs (ToMe's constant r), or a list
    # (layer 0 first; missing layers merge nothing); 0 = identity. Each is capped at half the
    # tokens then (ToMe's rule).
    r: int | list[int] = 0
    # instead of r: the visual tokens the LLM should receive (r spread over the layers)
    keep: int = 0
    prop_attn: bool = True  # proportional attention (official default off the shelf)
    positions: str = "original"

    def __post_init__(self):
        check_positions(self.positions)
        rs = self.r if isinstance(self.r, list) else [self.r]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rs):
            raise ValueError(f"field 'r' must be a non-negative integer or a list of them, "
                             f"got {self.r!r}")
        if not isinstance(self.keep, int) or isinstance(self.keep, bool) or self.keep < 0:
            raise ValueError(f"field 'keep' must be a non-negative integer, got {self.keep!r}")
        if self.keep and any(rs):
            raise ValueError("fields 'r' and 'keep' exclude each other; give one")
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"field 'prop_attn' must be true or false, got {self.prop_attn!r}")


def tome(r: int | list[int] = 0, keep: int = 0, prop_attn: bool = True,
         positions: str = "contiguous") -> Config:
    """ToMe with ``r`` merges per ViT layer (or a ``keep`` target). The official code
    (facebookresearch/ToMe at af95e4b, ``tome/patch/timm.py`` ``apply_patch``) defaults to
    proportional attention for off-the-shelf models; it has no LLM, and LLaVA rebuilds its
    sequence from the tower's output, so positions are contiguous by default here."""
    return Config(r=r, keep=keep, prop_attn=prop_attn, positions=positions)


def schedule(config: Config, n_layers: int, n_visual: int) -> list[int]:
    """The effective merges per layer that runs (vlmopt.ir.tome)."""
    from vlmopt.ir.tome import effective_r, spread

    if config.keep:
        if config.keep > n_visual:
            raise ValueError(f"field 'keep'={config.keep} but the tower has {n_visual} patches")
        rs = spread(n_visual - config.keep, n_layers, 1 + n_visual, 1)
        if rs is None:
            least = n_visual - sum(effective_r([n_visual] * n_layers, 1 + n_visual, 1))
            raise ValueError(f"field 'keep'={config.keep} is out of ToMe's reach: {n_layers} "
                             f"ViT layers merging at most half their tokens each leave at "
                             f"least {least}")
        return rs
    rs = config.r if isinstance(config.r, list) else [config.r] * n_layers
    if len(rs) > n_layers:
        raise ValueError(f"field 'r' has {len(rs)} entries but only {n_layers} ViT layers run "
                         "up to the feature layer")
    return effective_r(rs + [0] * (n_layers - len(rs)), 1 + n_visual, 1)


@register_pass("merge_vision", Config)
def run(gm: fx.GraphModule, config: Config) -> PassResult:
    from vlmopt.ir.tome import AnchorSlots, ToMeVision

    decs = decoder_nodes(gm)
    nv = decs[0].meta["vlmopt"]["n_visual"]
    vis, proj = node_by_block(gm, "vision"), node_by_block(gm, "project")
    stats: dict = {"r": config.r, "keep": config.keep, "n_visual_in": nv}
    if config.r in (0, []) and not config.keep:
        return PassResult(gm, False, {**stats, "n_visual_out": nv})
    old = gm.get_submodule(vis.target)
    if nv is None or not hasattr(old, "feature_layer"):
        raise ValueError(f"merge_vision: node {vis.name!r}: ToMe needs a fixed-grid CLIP tower "
                         "(LLaVA); this model's patch merger (Qwen-VL) needs every patch")
    f = old.feature_layer % (len(getattr(old.tower, "vision_model", old.tower).encoder.layers)
                             + 1)
    try:
        rs = schedule(config, f, nv)
        mod = ToMeVision(old.tower, old.feature_layer, old.drop_cls, rs, config.prop_attn)
    except ValueError as e:
        raise ValueError(f"merge_vision: node {vis.name!r}: {e}") from None
    n_out = nv - sum(rs)
    stats.update(r_per_layer=rs, n_visual_out=n_out)
    if n_out == nv:
        stats["skipped"] = "no merge runs (r caps at 0)"
        return PassResult(gm, False, stats)
    vis.target = add_module(gm, "vision_tome", mod)
    vis.meta["vlmopt"]["tome"] = {"r": rs, "n_out": n_out, "layers": f}
    gm.meta["vlmopt"]["tome"] = True  # select_visual refuses to rewire this tower
    g = gm.graph
    with g.inserting_after(vis):
        anchors = g.call_function(operator.getitem, (vis, 1))
        feats = g.call_function(operator.getitem, (vis, 0))
    proj.args = (feats,)
    slots_mod = add_module(gm, "tome_slots", AnchorSlots(nv))
    with g.inserting_after(proj):
        sl = g.call_module(slots_mod, (proj, anchors))
        sl.meta["vlmopt"] = {"block": "select", "select_op": "anchor_slots"}
    with g.inserting_after(sl):
        kept = g.call_function(operator.getitem, (sl, 1))
        grid = g.call_function(operator.getitem, (sl, 0))
    proj.replace_all_uses_with(grid, delete_user_cb=lambda n: n is not sl)
    scorer = add_module(gm, "tome_scores", SlotScores())
    keeper = add_module(gm, "keep_visual", tokens.KeepTopK(nv, n_out))

    def build(g, st):
        s = g.call_module(scorer, (kept, st.visual))
        s.meta["vlmopt"] = {"block": "select", "select_op": "slots"}
        d = g.call_module(keeper, (s, st.hidden, st.pos, st.visual, st.amask))
        d.meta["vlmopt"] = {"block": "drop", "keep": n_out}
        return tuple(g.call_function(operator.getitem, (d, i)) for i in range(5))

    insert_token_change(gm, 0, build, config.positions)
    g.eliminate_dead_code()
    gm.recompile()
    for d in decoder_nodes(gm):
        set_visual_budget(d, n_out)
    return PassResult(gm, True, stats)
