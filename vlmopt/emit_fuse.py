"""emit_fuse: an exported graph -> the same graph on ONNX Runtime's fused contrib operators.

    Pow/ReduceMean/Sqrt/Div/Mul (RMSNorm)            -> SimplifiedLayerNormalization
    Add (residual) + RMSNorm                         -> SkipSimplifiedLayerNormalization
    x*cos + rotate_half(x)*sin                       -> RotaryEmbedding (com.microsoft)
    MatMul/Softmax/MatMul over the K/V cache         -> GroupQueryAttention (dense layers;
                                                        MultiHeadAttention where GQA cannot hold)
    x * Sigmoid(x) (the MLP's SiLU)                  -> QuickGelu(alpha=1)
    the vision tower's attention and GELU            -> Attention / BiasGelu (library fusions)

The norms, the attention core and the vision tower's fusions are onnxscript's rewrite rules
(``onnxscript.rewriter.ort_fusions``, the rules written for dynamo-exported graphs); the three
rules here cover what vlmopt's export forms do differently from HF's own graphs:

- RoPE: the cos/sin of a token are a function of its (kept, possibly non-contiguous, possibly
  3-axis M-RoPE) position ids, so they are not a cache indexed by one position id. They are
  computed once per graph as before; the rule feeds ORT's RotaryEmbedding a per-token cache
  (``cos[b, s, :hd/2]`` flattened to row ``b*S + s``) with position ids ``b*S + s``. Exact for
  rotate-half RoPE, whose cos/sin repeat their first half (HF's ``cat(freqs, freqs)``).
- Attention: only a decoder layer's attention reads its K/V cache (a graph output: present.i.*),
  and vlmopt's prefill form of a dense layer is causal by construction; a vision tower's
  attention (not causal, windowed) stays on the library's MultiHeadAttention/Attention. The
  export forms' masks are boolean (causal & padding, a row always sees itself;
  decode: the per-layer padding mask of the cache). GroupQueryAttention applies the causal part
  itself and takes the rest as ``attention_bias``; ``seqlens_k`` is every row's full length, so
  left padding is masked by the bias, not by the lengths. K/V enter unrepeated, in the
  [B, KV, T, hd] cache layout GQA reads (``past_key``/``past_value``), which is the layout of
  the artifact's cache. A ShortV frozen layer (queries are a subset of the keys' rows) is not
  causal-aligned: it stays MultiHeadAttention with its explicit mask.

Nothing here changes which tokens a drop keeps: TopK/Gather stay as exported. Parity against
PyTorch is checked by the caller (vlmopt.emit) on the fused graphs.
"""

from __future__ import annotations

import collections
import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_FUSION = "ai.onnxruntime._fusion"
_MS = "com.microsoft"
_TWO_GB = 2 << 30
_ORT_DEFAULT_DOMAIN = ("SimplifiedLayerNormalization",)
FUSED_OPS = ("GroupQueryAttention", "MultiHeadAttention", "Attention", "RotaryEmbedding",
             "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
             "SkipLayerNormalization", "QuickGelu", "Gelu", "BiasGelu", "FastGelu")


def op_counts(path: Path) -> dict[str, int]:
    """Op type -> count over the graph at ``path`` (nested graphs included), most common first."""
    import onnx_ir as ir

    m = ir.load(str(path))
    c = collections.Counter(n.op_type for n in m.graph.all_nodes())
    return dict(c.most_common())


def check_graph(path: Path) -> None:
    """onnx.checker on the fused graph at ``path`` (small graphs). ONNX Runtime registers
    SimplifiedLayerNormalization in the default domain, which onnx's own schemas do not have:
    the checker sees those nodes under com.microsoft (as it sees every contrib op: structure
    and types around them checked, their own schema left to ONNX Runtime)."""
    import onnx

    m = onnx.load(str(path))
    for n in m.graph.node:
        if n.op_type in _ORT_DEFAULT_DOMAIN and n.domain in ("", "ai.onnx"):
            n.domain = _MS
    onnx.checker.check_model(m, full_check=False)


# ----------------------------------------------------------------------------- rules


def _rules():
    import onnx_ir as ir
    from onnxscript.rewriter import _ir_utils, pattern

    class RotaryPerToken(pattern.RewriteRuleClassBase):
        """RotaryEmbedding(x [B, N, S, hd], cos, sin [B, 1, S, hd]) in onnxscript's fusion domain
        -> com.microsoft RotaryEmbedding over a per-token cos/sin cache."""

        def pattern(self, op, x, cos, sin):
            return op.RotaryEmbedding(x, cos, sin, _domain=_FUSION, _outputs=["out"])

        def check(self, context, x, cos, sin, out, **_):
            r = pattern.MatchResult()
            a = out.producer().attributes
            if a.get("interleaved") is not None and a["interleaved"].value != 0:
                return r.fail("interleaved RoPE")
            for v in (x, cos, sin):
                if v.shape is None or v.shape.rank() != 4:
                    return r.fail("not 4-D", v)
            hd = x.shape[3]
            if not isinstance(hd, int) or hd % 2 or cos.shape[1] != 1 or cos.shape[3] != hd \
                    or sin.shape[3] != hd or sin.shape[1] != 1:
                return r.fail("cos/sin are not [B, 1, S, head_dim]", cos)
            return r

        def rewrite(self, op, x, cos, sin, **_):
            half = x.shape[3] // 2
            # NOTE: one cache per cos value; CSE afterwards merges the layers' copies
            shape_bs = op.Concat(op.Shape(cos, start=0, end=1), op.Shape(cos, start=2, end=3),
                                 axis=0)  # [B, S]
            n = op.ReduceProd(shape_bs, keepdims=0)
            pos = op.Reshape(op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1)),
                             shape_bs)  # [B, S]: token b*S + s reads cache row b*S + s

            def cache(t):  # [B, 1, S, hd] -> [B*S, hd/2]
                c = [op.Constant(value_ints=[v]) for v in (0, half, 3)]
                return op.Reshape(op.Slice(t, *c), op.Constant(value_ints=[-1, half]))

            return op.RotaryEmbedding(x, pos, cache(cos), cache(sin), interleaved=0,
                                      _domain=_MS)

    def _unrepeat(key):
        """kv [B, KV, T, hd] if ``key`` is repeat_interleave(kv, G, dim=1), else ``key``."""
        r = key.producer()
        if r is None or r.op_type != "Reshape":
            return key, 1
        e = r.inputs[0].producer()
        if e is None or e.op_type != "Expand":
            return key, 1
        u = e.inputs[0].producer()
        if u is None or u.op_type != "Unsqueeze" or u.inputs[1] is None:
            return key, 1
        axes = _ir_utils.get_singleton_value(u.inputs[1])
        kv, ex = u.inputs[0], e.outputs[0]
        if axes != 2 or kv.shape is None or ex.shape is None or ex.shape.rank() != 5:
            return key, 1
        g = ex.shape[2]
        if not isinstance(g, int) or not isinstance(kv.shape[1], int) or \
                key.shape[1] != kv.shape[1] * g:
            return key, 1
        return kv, g

    def _is_output(v):
        graph = v.graph
        return graph is not None and (v in graph.outputs or any(
            u.op_type == "Identity" and u.outputs[0] in graph.outputs for u, _ in v.uses()))

    def _split_past(kv):
        """(past, new) if ``kv`` is Concat(past, new) along the sequence axis, else (None, kv)."""
        c = kv.producer()
        if c is not None and c.op_type == "Concat" and len(c.inputs) == 2:
            ax = c.attributes.get("axis")
            if ax is not None and ax.value in (2, -2):
                return c.inputs[0], c.inputs[1]
        return None, kv

    class SdpaToGqa(pattern.RewriteRuleClassBase):
        """SDPA(q [B, H, S, hd], repeat(K), repeat(V), mask) whose K/V are the layer's cache
        (Concat(past, new) or the prompt's own K/V) and whose queries are the new rows
        -> GroupQueryAttention(q, k_new, v_new, past_k, past_v, seqlens_k=T-1, T, bias)."""

        def pattern(self, op, query, key, value, mask):
            return op.SDPA(query, key, value, mask, key_format="BHSd", _domain=_FUSION,
                           _outputs=["out"])

        def check(self, context, query, key, value, mask, out, **_):
            r = pattern.MatchResult()
            for v in (query, key, value, mask):
                if v.shape is None or v.shape.rank() != 4:
                    return r.fail("not 4-D", v)
            k, gk = _unrepeat(key)
            v, gv = _unrepeat(value)
            if gk != gv or not isinstance(query.shape[1], int) or \
                    query.shape[1] != k.shape[1] * gk:
                return r.fail("K/V are not the cache repeated to the query heads", key)
            pk, nk = _split_past(k)
            pv, nv = _split_past(v)
            if (pk is None) != (pv is None):
                return r.fail("K and V caches differ in form", key)
            if not (_is_output(k) and _is_output(v)):
                # NOTE: only a decoder layer's attention reads its cache (a graph output); its
                # prefill form is causal by construction. A vision tower's is not causal.
                return r.fail("K/V are not the layer's cache (a graph output)", key)
            if nk.shape is None or nk.shape[2] != query.shape[2] or nv.shape is None:
                # NOTE: ShortV's frozen layer queries a subset of the rows: not causal-aligned
                return r.fail("queries are not the new key rows", query)
            if mask.shape[1] != 1:
                return r.fail("mask is per head", mask)
            self._parts = (pk, nk, pv, nv, int(k.shape[1]), int(query.shape[1]),
                           int(query.shape[3]))
            return r

        def rewrite(self, op, query, key, value, mask, out, **_):
            pk, nk, pv, nv, kv_heads, heads, hd = self._parts
            scale = out.producer().attributes.get("scale")

            def bsd(t):  # [B, N, S, hd] -> [B, S, N*hd]
                return op.Reshape(op.Transpose(t, perm=[0, 2, 1, 3]),
                                  op.Constant(value_ints=[0, 0, -1]))

            total = op.Squeeze(op.Shape(key, start=2, end=3))  # T, int64 scalar
            batch = op.Shape(query, start=0, end=1)
            seqlens = op.Cast(op.Expand(op.Sub(total, op.Constant(value_int=1)), batch),
                              to=ir.DataType.INT32)  # [B]: every row's full length - 1
            total = op.Cast(total, to=ir.DataType.INT32)
            bias = mask if mask.dtype == ir.DataType.FLOAT else op.Cast(mask,
                                                                        to=ir.DataType.FLOAT)
            attrs = {"num_heads": heads, "kv_num_heads": kv_heads}
            if scale is not None:
                attrs["scale"] = scale.value
            o, _, _ = op.GroupQueryAttention(
                bsd(query), bsd(nk), bsd(nv), pk, pv, seqlens, total, None, None, None, bias,
                **attrs, _domain=_MS, _outputs=3)
            return op.Transpose(op.Reshape(o, op.Constant(value_ints=[0, 0, heads, hd])),
                                perm=[0, 2, 1, 3])  # back to [B, H, S, hd]

    class SiluToQuickGelu(pattern.RewriteRuleClassBase):
        """x * Sigmoid(x) -> QuickGelu(x, alpha=1) (one kernel, no Sigmoid temporary)."""

        def pattern(self, op, x):
            return op.Mul(x, op.Sigmoid(x))

        def rewrite(self, op, x):
            return op.QuickGelu(x, alpha=1.0, _domain=_MS)

    return (pattern.RewriteRuleSet([RotaryPerToken.rule()]),
            pattern.RewriteRuleSet([SdpaToGqa.rule()]),
            pattern.RewriteRuleSet([SiluToQuickGelu.rule()], commute=True))


# ----------------------------------------------------------------------------- driver


def fuse_model(model) -> dict[str, int]:
    """Rewrite the ``onnx_ir`` model in place; returns the number of matches of each fusion.
    The order is onnxscript's ``fuse_xformers``, with vlmopt's RoPE rule in place of its
    position-id cache rule and vlmopt's GQA rule before the MultiHeadAttention fallback."""
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter._fusion_utils import apply_fusion_rules
    from onnxscript.rewriter.ort_fusions import _core as lib

    rope, gqa, silu = (apply_fusion_rules(r) for r in _rules())
    lib._pre_optimize(model)
    counts = {}
    steps = [("erf_gelu", lib.fuse_erfgelu), ("rms_normalization", lib.fuse_rms_normalization),
             ("skip_layer_normalization", lib.fuse_skip_layer_normalization),
             ("skip_rms_normalization", lib.fuse_skip_rms_normalization),
             ("rotary_embedding", lib.fuse_rotary_embedding), ("rotary_per_token_cache", rope)]
    for name, f in steps:
        counts[name] = f(model)
    common_passes.CommonSubexpressionEliminationPass()(model)
    counts["sdpa"] = lib.fuse_sdpa(model, apply_shape_inference=True)
    counts["group_query_attention"] = gqa(model)
    for name, f in (("mha1", lib.fuse_mha1), ("mha2", lib.fuse_mha2),
                    ("mha_scale", lib.fuse_mha_scale)):
        counts[name] = f(model)
    if counts["mha1"] or counts["mha2"]:  # the vision tower's packed QKV
        counts["mha_bias"] = lib.fuse_mha_bias(model)
        counts["attention"] = lib.fuse_attention(model)
    counts["gelu"] = lib.fuse_gelu(model)
    counts["bias_gelu"] = lib.fuse_bias_gelu(model)
    counts["sdpa_via_mha"] = lib.replace_sdpa_by_mha(model)
    counts["silu_quick_gelu"] = silu(model)
    optimize(model)  # NOTE: inlines unconsumed intermediate fusions, drops dead nodes
    common_passes.CommonSubexpressionEliminationPass()(model)
    common_passes.RemoveUnusedNodesPass()(model)
    leftover = [n.op_type for n in model.graph.all_nodes() if n.domain == _FUSION]
    if leftover:
        from vlmopt.errors import VlmoptError

        raise VlmoptError(f"emit: fusion left intermediate ops {sorted(set(leftover))}")
    return {k: int(v) for k, v in counts.items() if v}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir()
               if p == path or p.name.startswith(path.name + "."))


def fuse_graph(path: Path) -> dict:
    """Fuse the graph at ``path`` in place (external data kept as external data when the graph
    is over 2 GB). Returns {"fusions": matches per rule, "ops_before"/"ops_after": op type
    counts}."""
    import onnx_ir as ir

    path = Path(path)
    big = _size(path) > _TWO_GB
    model = ir.load(str(path))
    before = dict(collections.Counter(n.op_type for n in model.graph.all_nodes()).most_common())
    counts = fuse_model(model)
    after = dict(collections.Counter(n.op_type for n in model.graph.all_nodes()).most_common())
    with tempfile.TemporaryDirectory(prefix="vlmopt-fuse-", dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        # NOTE: the loaded tensors still read the old external data: save first, then replace
        ir.save(model, str(out), external_data=f"{path.name}.data" if big else None)
        del model
        for p in list(path.parent.iterdir()):
            if p == path or (p.is_file() and p.name.startswith(path.name + ".")):
                p.unlink()
        for p in Path(tmp).iterdir():
            shutil.move(str(p), str(path.parent / p.name))
    log.info("fused %s: %s (%d -> %d nodes)", path.name, counts, sum(before.values()),
             sum(after.values()))
    return {"fusions": counts, "ops_before": before, "ops_after": after}


def fuse_artifact_graphs(onnx_dir: Path) -> dict:
    """Fuse prefill.onnx and decode.onnx; the manifest's ``fusion`` record."""
    import onnxscript

    graphs = {g: fuse_graph(Path(onnx_dir) / f"{g}.onnx") for g in ("prefill", "decode")}
    return {"enabled": True, "tool": f"onnxscript {onnxscript.__version__} ort_fusions + "
            "vlmopt.emit_fuse", "graphs": {g: {"fusions": r["fusions"],
                                              "nodes_before": sum(r["ops_before"].values()),
                                              "nodes_after": sum(r["ops_after"].values())}
                                          for g, r in graphs.items()},
            "fused_ops": {g: {k: v for k, v in r["ops_after"].items() if k in FUSED_OPS}
                          for g, r in graphs.items()}}
