"""Analytic cost model for VLM prefill and decode (FLOPs, KV-cache bytes, weight bytes).

Family-agnostic: the decoder formulas read ``ModelShapes``, which the family adapter builds
(``Adapter.model_shapes``). A CLIP ViT + MLP projector (LLaVA) is priced here; a tower of
another shape comes with its own ``Tower`` (``vlmopt.cost_vision`` for Qwen-VL).

FLOPs are 2 per multiply-accumulate and count exactly the ops ``torch.utils.flop_counter`` counts:
matmuls (linear/mm/bmm/addmm, bias adds excluded), the ViT patch-embedding convolution and
scaled-dot-product attention over the FULL n x n score matrix (no causal halving). Norms,
activations, RoPE, softmax and embedding lookups cost nothing here, as in ``FlopCounterMode``.

``measure_prefill_flops`` cross-checks the formulas: it runs the real Hugging Face forward under
``FlopCounterMode`` with fake parameters (``FakeTensorMode``), so a config-only 7B model is
measured in seconds without allocating its weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass, field, replace

import torch

log = logging.getLogger(__name__)

_HALF = {torch.float16, torch.bfloat16}
_GATED_DECODERS = {"llama", "qwen2", "mistral", "qwen2_vl_text", "qwen2_5_vl_text",
                   "qwen3_vl_text"}


class Tower:
    """The cost of a vision tower that is not a CLIP ViT + MLP projector (an adapter supplies
    it): dynamic resolution, its own merger, its own parameter count. ``grids``: one (t, h, w)
    per image of a sample, in patches."""

    def n_llm_tokens(self, grids) -> int:
        raise NotImplementedError

    def breakdown(self, grids) -> dict[str, int]:
        """FLOPs: "vision" (the tower) and "merger" (into the LLM; the projector's place)."""
        raise NotImplementedError

    def param_bytes(self, bytes_per_el: int) -> tuple[int, int]:
        """(vision, project) parameter bytes."""
        raise NotImplementedError

    def select_flops(self, op: str, grids) -> int | None:
        """A select_visual scorer's extra FLOPs on this tower (None: not one it runs)."""
        return None

    def n_text_tokens(self, grids) -> int:
        """Image-token slots these images fill with rows that are not image features (AnyRes
        newlines): text to the token passes, and not in a caller's count of text tokens."""
        return 0


def _dtype_bytes(dtype) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    return 2 if dtype in _HALF else 4


@dataclass(frozen=True)
class ModelShapes:
    """Every dimension the cost formulas need (built by the family adapter's ``model_shapes``;
    ``from_llava_config`` reads a LLaVA-style config: CLIP ViT, MLP projector, decoder)."""

    # vision tower (CLIP ViT)
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    n_vision_tokens: int  # tokens inside the ViT: patches (+1 CLS when has_cls)
    has_cls: bool
    # projector: Linear(proj_in -> d), act, Linear(d -> d)
    n_feature_layers: int
    proj_in: int  # vision_hidden * n_feature_layers
    projector_bias: bool
    # text decoder
    d: int
    m: int
    n_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    n_visual: int  # visual tokens entering the LLM per image (CLS dropped for "default")
    ffn_mats: int = 3  # SwiGLU: gate, up, down
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tied_embeddings: bool = False
    bytes_per_el: int = 2
    # a tower priced by its own Tower (dynamic resolution) for these images; None: CLIP ViT
    tower: Tower | None = field(default=None, compare=False, hash=False, repr=False)
    grids: tuple = ()  # one (t, h, w) per image of a sample, in patches before the merge
    qk_norm: bool = False  # per-head q/k RMSNorm (Qwen3)
    # SigLIP ViT: no CLS, no pre-norm, a biased patch conv, and (vision_use_head) an attention-
    # pooling head that HF runs on every image although LLaVA reads hidden_states only
    siglip: bool = False
    vision_head: bool = False
    # image-token slots holding no image feature (AnyRes newlines): never selected or dropped,
    # added to the caller's text tokens (which count the prompt's non-image tokens)
    n_image_text: int = 0

    @property
    def d_q(self) -> int:
        return self.heads * self.head_dim

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def dynamic(self) -> bool:
        """Visual-token counts follow the image (the tower prices itself per grid)."""
        return self.tower is not None

    def at_grids(self, grids) -> ModelShapes:
        """The same model with one sample's images of these (t, h, w) patch grids."""
        if self.tower is None:
            raise ValueError("a fixed-resolution model has no image grids")
        grids = tuple(tuple(int(x) for x in g) for g in grids)
        return replace(self, grids=grids, n_visual=self.tower.n_llm_tokens(list(grids)),
                       n_image_text=self.tower.n_text_tokens(list(grids)))

    @classmethod
    def from_llava_config(cls, config, *, bytes_per_el: int | None = None) -> ModelShapes:
        vc, tc = config.vision_config, config.text_config
        siglip = vc.model_type == "siglip_vision_model"
        if vc.model_type != "clip_vision_model" and not siglip:
            log.warning("vision tower %s: modelled as a CLIP ViT (extra heads are not counted)",
                        vc.model_type)
        has_cls = vc.model_type == "clip_vision_model"
        n_patches = (vc.image_size // vc.patch_size) ** 2
        layer = config.vision_feature_layer
        n_feat = 1 if isinstance(layer, int) else len(layer)
        # "default" drops the first token, CLS or not (HF does, on a SigLIP tower too)
        drop_first = config.vision_feature_select_strategy == "default"
        heads = tc.num_attention_heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
        qwen2 = tc.model_type == "qwen2"
        attn_bias = bool(getattr(tc, "attention_bias", False))
        if bytes_per_el is None:
            dtype = getattr(tc, "dtype", None) or getattr(config, "dtype", None)
            bytes_per_el = _dtype_bytes(dtype)
        if tc.model_type not in _GATED_DECODERS:
            log.warning("decoder %s: assumed LLaMA-like (gated 3-matrix MLP)", tc.model_type)
        return cls(
            vision_hidden=vc.hidden_size, vision_intermediate=vc.intermediate_size,
            vision_layers=vc.num_hidden_layers, vision_heads=vc.num_attention_heads,
            image_size=vc.image_size, patch_size=vc.patch_size,
            num_channels=getattr(vc, "num_channels", 3),
            n_vision_tokens=n_patches + int(has_cls), has_cls=has_cls,
            n_feature_layers=n_feat, proj_in=vc.hidden_size * n_feat,
            projector_bias=bool(getattr(config, "multimodal_projector_bias", True)),
            d=tc.hidden_size, m=tc.intermediate_size, n_layers=tc.num_hidden_layers,
            heads=heads, kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=head_dim, vocab=tc.vocab_size,
            n_visual=n_patches + int(has_cls) - int(drop_first),
            siglip=siglip, vision_head=siglip and bool(getattr(vc, "vision_use_head", True)),
            qkv_bias=qwen2 or attn_bias, o_bias=attn_bias and not qwen2,
            mlp_bias=bool(getattr(tc, "mlp_bias", False)),
            tied_embeddings=bool(getattr(tc, "tie_word_embeddings", False)
                                 or getattr(config, "tie_word_embeddings", False)),
            bytes_per_el=bytes_per_el,
        )


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer as the optimized graph runs it (per sample)."""

    n_tokens: int  # tokens entering this layer
    n_visual: int  # of which visual
    frozen_visual: bool = False  # ShortV: visual tokens get only K/V; queries/O/FFN text-only
    q_rank: int | None = None  # low-rank W_q: d -> r -> d_q; None = dense
    k_rank: int | None = None  # low-rank W_k: d -> r -> d_kv
    # weight-only quantization: ((linear path in the HF layer, bits), ...), e.g.
    # (("self_attn.q_proj.0", 4), ("mlp.down_proj", 8)); a factor also takes its projection's
    # entry; unlisted linears stay float. Changes bytes, not FLOPs.
    bits: tuple = ()
    group_size: int = 0

    def __post_init__(self):
        if not 0 <= self.n_visual <= self.n_tokens:
            raise ValueError(f"n_visual={self.n_visual} must lie in [0, n_tokens={self.n_tokens}]")


def _proj_macs(n: int, d_in: int, d_out: int, rank: int | None) -> int:
    # x[n, d_in] @ W[d_in, d_out], or x @ A[d_in, r] @ B[r, d_out] when low-rank
    return n * d_in * d_out if rank is None else n * (d_in * rank + rank * d_out)


def layer_flops(s: ModelShapes, spec: LayerSpec) -> int:
    """FLOPs of one decoder layer at batch 1."""
    n = spec.n_tokens
    nq = n - spec.n_visual if spec.frozen_visual else n  # tokens that get queries, O and FFN
    macs = (_proj_macs(nq, s.d, s.d_q, spec.q_rank)  # q: [nq, d] -> [nq, d_q]
            + _proj_macs(n, s.d, s.d_kv, spec.k_rank)  # k: [n, d] -> [n, d_kv]
            + n * s.d * s.d_kv  # v: [n, d] -> [n, d_kv]
            + 2 * s.heads * nq * n * s.head_dim  # QK^T [h, nq, n] and A.V [h, nq, hd]
            + nq * s.d_q * s.d  # o: [nq, d_q] -> [nq, d]
            + s.ffn_mats * nq * s.d * s.m)  # gate/up [nq, m], down [nq, d]
    return 2 * macs


def decoder_bytes_per_el(config) -> int:
    """Bytes per parameter of a checkpoint's decoder (its declared dtype; fp32 when none)."""
    tc = config.text_config
    return _dtype_bytes(getattr(tc, "dtype", None) or getattr(config, "dtype", None))


def vision_flops(s: ModelShapes) -> int:
    """FLOPs of the whole CLIP tower for one image, as HF runs it (every encoder layer); for a
    tower with its own ``Tower``, the tower without its merger for the sample's image grids."""
    if s.tower is not None:
        return s.tower.breakdown(list(s.grids))["vision"]
    h, n = s.vision_hidden, s.n_vision_tokens
    conv = s.n_patches * h * s.num_channels * s.patch_size ** 2  # patch_embedding conv
    per_layer = (4 * n * h * h  # q, k, v, o: [n, h] -> [n, h]
                 + 2 * n * n * h  # QK^T and A.V over all heads
                 + 2 * n * h * s.vision_intermediate)  # fc1, fc2
    # SigLIP's pooling head: one probe query (q, out_proj, MLP on 1 row), k/v of n tokens
    head = (2 * h * h + 2 * n * h * h + 2 * n * h + 2 * h * s.vision_intermediate
            if s.vision_head else 0)
    return 2 * (conv + s.vision_layers * per_layer + head)  # post_layernorm: no matmul


def tome_vision_flops(s: ModelShapes, rs: list[int]) -> int:
    """A CLIP tower run by ToMe (vlmopt.ir.tome): only the ``len(rs)`` layers up to the feature
    layer, layer i's attention at its n_i tokens, its matching (the [ceil(n/2), hd] x
    [hd, floor(n/2)] cosine of head-mean keys) and its MLP after the ``rs[i]`` merges."""
    h, n = s.vision_hidden, s.n_vision_tokens
    hd = h // s.vision_heads
    macs = s.n_patches * h * s.num_channels * s.patch_size ** 2  # patch_embedding conv
    for r in rs:
        macs += 4 * n * h * h + 2 * n * n * h  # q, k, v, o; QK^T and A.V
        if r:
            macs += ((n + 1) // 2) * (n // 2) * hd
        n -= r
        macs += 2 * n * h * s.vision_intermediate  # fc1, fc2 on the merged tokens
    return 2 * macs


def projector_flops(s: ModelShapes, n_tokens: int) -> int:
    if s.tower is not None:  # the tower's own merger (Qwen-VL: patch + deepstack mergers)
        return s.tower.breakdown(list(s.grids))["merger"]
    # [n, proj_in] -> [n, d] -> [n, d]
    return 2 * n_tokens * (s.proj_in * s.d + s.d * s.d)


def head_flops(s: ModelShapes) -> int:
    return 2 * s.d * s.vocab  # LM head on the last position only (logits_to_keep=1)


def baseline_layers(s: ModelShapes, n_text: int) -> list[LayerSpec]:
    """The identity plan: every layer sees all n_text (+ newline) + n_visual tokens."""
    return [LayerSpec(n_text + s.n_image_text + s.n_visual, s.n_visual)
            for _ in range(s.n_layers)]


def prefill_flops(s: ModelShapes, layers: list[LayerSpec], *, n_visual_in: int | None = None,
                  batch: int = 1) -> dict[str, int]:
    """Per-node prefill FLOPs (one image per sample): vision, project, layer_i, head, total."""
    if len(layers) != s.n_layers:
        raise ValueError(f"{len(layers)} layer specs for a {s.n_layers}-layer decoder")
    n_in = s.n_visual if n_visual_in is None else n_visual_in
    out = {"vision": vision_flops(s), "project": projector_flops(s, n_in)}
    for i, spec in enumerate(layers):
        out[f"layer_{i}"] = layer_flops(s, spec)
    out["head"] = head_flops(s)
    out = {k: batch * v for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def decode_flops_per_token(s: ModelShapes, kv_lengths: list[int],
                           layers: list[LayerSpec] | None = None) -> int:
    """FLOPs to generate one token given each layer's KV length before it (batch 1).

    The new token is text, so frozen layers run in full; low ranks in ``layers`` apply.
    """
    if len(kv_lengths) != s.n_layers:
        raise ValueError(f"{len(kv_lengths)} KV lengths for a {s.n_layers}-layer decoder")
    total = head_flops(s)
    for i, kv in enumerate(kv_lengths):
        spec = layers[i] if layers else None
        q_rank = spec.q_rank if spec else None
        k_rank = spec.k_rank if spec else None
        macs = (_proj_macs(1, s.d, s.d_q, q_rank) + _proj_macs(1, s.d, s.d_kv, k_rank)
                + s.d * s.d_kv + s.d_q * s.d + s.ffn_mats * s.d * s.m
                + 2 * s.heads * (kv + 1) * s.head_dim)  # attends to the cache plus itself
        total += 2 * macs
    return total


def kv_cache_bytes(s: ModelShapes, kv_lengths: list[int],
                   bytes_per_el: int | None = None) -> list[int]:
    """Per layer: K and V, each [kv_len, kv_heads, head_dim]."""
    b = s.bytes_per_el if bytes_per_el is None else bytes_per_el
    return [2 * kv * s.kv_heads * s.head_dim * b for kv in kv_lengths]


def matrix_bytes(d_out: int, d_in: int, bits: int, group_size: int, scale_bytes: int,
                 float_bytes: int) -> int:
    """One weight matrix: float (bits 0), or per row ceil(d_in / g) groups, each g codes of
    ``bits`` packed into whole bytes plus one scale (ONNX Runtime MatMulNBits' layout)."""
    if not bits:
        return d_out * d_in * float_bytes
    return d_out * math.ceil(d_in / group_size) * (math.ceil(group_size * bits / 8) + scale_bytes)


def layer_matrices(s: ModelShapes, spec: LayerSpec) -> list[tuple[str, int, int]]:
    """(path in the HF layer, d_out, d_in) of every weight matrix of one decoder layer."""
    out = []
    for name, d_out, rank in (("q_proj", s.d_q, spec.q_rank), ("k_proj", s.d_kv, spec.k_rank)):
        if rank is None:
            out.append((f"self_attn.{name}", d_out, s.d))
        else:  # Linear(d -> r) then Linear(r -> d_out)
            out += [(f"self_attn.{name}.0", rank, s.d), (f"self_attn.{name}.1", d_out, rank)]
    out += [("self_attn.v_proj", s.d_kv, s.d), ("self_attn.o_proj", s.d, s.d_q)]
    mlp = ["gate_proj", "up_proj"][3 - s.ffn_mats:] if s.ffn_mats <= 3 else []
    out += [(f"mlp.{m}", s.m, s.d) for m in mlp] + [("mlp.down_proj", s.d, s.m)]
    return out


def _bits_of(bits: dict, path: str) -> int:
    return bits.get(path, bits.get(path.rsplit(".", 1)[0], 0) if path[-1].isdigit() else 0)


def weight_bytes(s: ModelShapes, layers: list[LayerSpec] | None = None,
                 bytes_per_el: int | None = None, *, node_bits: dict | None = None,
                 group_size: int = 0) -> dict[str, int]:
    """Parameter bytes per node: vision, project, embed, layer_i, head (+ norm), total.

    Low ranks in ``layers`` shrink W_q/W_k; their ``bits`` store the layer's linears as codes
    plus one scale (``bytes_per_el``) per group. ``node_bits``: {"head": {"lm_head": b},
    "project": {"linear_1": b, "linear_2": b}} for a quantized LM head / projector. A tied LM
    head shares the embedding's storage: its entry is 0 and only its final norm is counted
    (decode still reads the matrix once per token) - unless it is quantized (its own codes).
    """
    b = s.bytes_per_el if bytes_per_el is None else bytes_per_el
    node_bits = node_bits or {}
    h, i = s.vision_hidden, s.vision_intermediate
    vision = (s.num_channels * s.patch_size ** 2 * h + h * int(s.siglip)  # patch conv
              + h * int(s.has_cls) + s.n_vision_tokens * h  # class + position embeddings
              + 2 * h * (2 - int(s.siglip))  # (CLIP's pre_layrnorm), post_layernorm
              + s.vision_layers * (4 * (h * h + h) + 2 * 2 * h + 2 * h * i + i + h)
              # SigLIP head: probe, in/out projections, layernorm, MLP
              + int(s.vision_head) * (h + 4 * (h * h + h) + 2 * h + 2 * h * i + i + h))
    pb = node_bits.get("project", {})
    out = {"vision": b * vision, "embed": b * s.vocab * s.d,
           "project": (matrix_bytes(s.d, s.proj_in, pb.get("linear_1", 0), group_size, b, b)
                       + matrix_bytes(s.d, s.d, pb.get("linear_2", 0), group_size, b, b)
                       + b * 2 * s.d * int(s.projector_bias))}
    if s.tower is not None:  # the tower's own count (its merger included)
        out["vision"], out["project"] = s.tower.param_bytes(b)
    for li in range(s.n_layers):
        spec = layers[li] if layers else LayerSpec(0, 0)
        bits = dict(spec.bits)
        out[f"layer_{li}"] = b * (
            2 * s.d  # 2 RMSNorms
            + 2 * s.head_dim * int(s.qk_norm)  # per-head q/k RMSNorm (Qwen3)
            + (s.d_q + 2 * s.d_kv) * int(s.qkv_bias) + s.d * int(s.o_bias)
            + ((s.ffn_mats - 1) * s.m + s.d) * int(s.mlp_bias)) + sum(
            matrix_bytes(d_out, d_in, _bits_of(bits, path), spec.group_size, b, b)
            for path, d_out, d_in in layer_matrices(s, spec))
    hb = node_bits.get("head", {}).get("lm_head", 0)
    out["head"] = b * s.d + (matrix_bytes(s.vocab, s.d, hb, group_size, b, b)
                             if hb or not s.tied_embeddings else 0)  # + final norm
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------- measurement (FlopCounterMode)

_aten = torch.ops.aten
# SDPA kernels FlopCounterMode (torch 2.13) has no formula for: CPU flash (the CPU default, whose
# FLOPs would otherwise silently vanish) and the backend-overridable fused op. The math path is
# CompositeImplicit and decomposes into counted bmm's.
_UNCOUNTED_SDPA = [name for name in ("_scaled_dot_product_flash_attention_for_cpu",
                                     "_scaled_dot_product_fused_attention_overrideable")
                   if hasattr(_aten, name)]


def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)  # same as torch's sdpa_flop


def register_sdpa_flop_formulas() -> None:
    """Register ``_sdpa_flop`` for the SDPA kernels torch lacks formulas for (idempotent)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    missing = [getattr(_aten, n) for n in _UNCOUNTED_SDPA if getattr(_aten, n) not in flop_registry]
    if missing:
        register_flop_formula(missing)(_sdpa_flop)


@contextlib.contextmanager
def fake_weights(model: torch.nn.Module):
    """Temporarily replace every parameter and buffer with a fake tensor of the same shape.

    Swaps per unique module object, so a module shared by several graph nodes (a scorer reading
    a decoder layer's projections) is swapped and restored exactly once. Ties stay tied.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    saved: list[tuple[dict, str, torch.Tensor]] = []
    fakes: dict[int, torch.Tensor] = {}
    try:
        with mode:
            for mod in {id(m): m for m in model.modules()}.values():
                for store in (mod._parameters, mod._buffers):
                    for name, t in list(store.items()):
                        if t is None:
                            continue
                        if id(t) not in fakes:
                            fakes[id(t)] = torch.empty_strided(t.shape, t.stride(),
                                                               dtype=t.dtype, device="cpu")
                        saved.append((store, name, t))
                        store[name] = fakes[id(t)]
        yield
    finally:
        for store, name, t in reversed(saved):
            store[name] = t


def measure_prefill_breakdown(model: torch.nn.Module, batch: dict, *,
                              fake: bool = True) -> dict[str, int]:
    """FlopCounterMode FLOPs of one prefill forward, per node (keys as ``prefill_flops``).

    ``model``: a LlavaForConditionalGeneration with real, meta or fake parameters; real and meta
    ones are swapped for fake tensors (``fake_weights``), so nothing is computed
    or allocated. ``batch``: input_ids, pixel_values, attention_mask... as real tensors (the
    image-token count check needs real input_ids). "other" holds FLOPs outside the named nodes.
    ``fake=False`` runs the real weights (small models whose forward indexes by a data-dependent
    mask, e.g. Qwen3-VL's deepstack, which fake tensors cannot do).
    """
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils.flop_counter import FlopCounterMode

    register_sdpa_flop_formulas()
    kwargs = dict(batch, logits_to_keep=1, use_cache=False)
    first = next(model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        if isinstance(first, FakeTensor) or not fake:
            model(**kwargs)
        else:
            with fake_weights(model):  # real inputs meet fake weights
                model(**kwargs)
    out: dict[str, int] = {}
    for mod, counts in fc.get_flop_counts().items():
        n = sum(counts.values())
        if mod.endswith((".vision_tower", ".visual", ".vision_model")):
            out["vision"] = n
        elif mod.endswith((".multi_modal_projector", ".connector")):
            out["project"] = n
        elif mod.endswith(".lm_head"):
            out["head"] = n
        elif m := re.search(r"\.(?:language|text)_model\.layers\.(\d+)$", mod):
            out[f"layer_{m.group(1)}"] = n
    total = fc.get_total_flops()
    out["other"] = total - sum(out.values())
    out["total"] = total
    return out


def measure_prefill_flops(model: torch.nn.Module, batch: dict) -> int:
    """Total FlopCounterMode FLOPs of ``model(**batch, logits_to_keep=1, use_cache=False)``."""
    return measure_prefill_breakdown(model, batch)["total"]


def fake_llava(config) -> torch.nn.Module:
    """A LlavaForConditionalGeneration with fake parameters: real shapes, no memory (7B: ~2 s)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import LlavaForConditionalGeneration

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = LlavaForConditionalGeneration(config)
    return model.eval()


def score_flops(s: ModelShapes, n_tokens: int, mode: str, n_pivots: int = 0) -> int:
    """An explicit attention scorer (vlmopt.ir.tokens.AttnScore) over ``n_tokens`` tokens:
    q for the query rows, k for every token, and q·k^T. mode "last" = one query row.
    mode "dart" (vlmopt.ir.dart): k for every token and one cosine row per pivot."""
    if mode == "random":
        return 0
    if mode == "dart":
        return 2 * (n_tokens * s.d * s.d_kv + n_pivots * n_tokens * s.d)
    n_q = 1 if mode == "last" else n_tokens
    macs = n_q * s.d * s.d_q + n_tokens * s.d * s.d_kv + s.heads * n_q * n_tokens * s.head_dim
    return 2 * macs


def select_flops(s: ModelShapes, info: dict, n_text: int = 0) -> int:
    """The matmuls a select_visual node adds (vlmopt.ir.select), per sample; ``info`` is the
    node's meta. cls_attention: the CLS query row and every key of one ViT layer (of each of
    ``n_cls_layers``, VTC-CLS), and q.k^T; received_attention (a fixed-grid CLS-free tower):
    every query row of one ViT layer; contextual_merge: key cosine [M, C] and the group
    sums [C, Dv]; diversity: the Nv x Nv cosine matrix; coverage (MMTok): the cosine of every
    one of the ``n_text`` + Nv rows with the Nv visual embeddings, and the Nv x Nv cosine of
    the vision features; dpp (CDPruner): the same text/visual cosine rows and the Nv x Nv
    cosine of the visual embeddings (its greedy steps are products and sums, no matmul).
    Pooling, hashing and scattering count nothing."""
    op = info.get("select_op")
    h = s.vision_hidden
    hd = h // s.vision_heads
    if op == "cls_attention":
        n = s.n_vision_tokens
        return 2 * (h * h + n * h * h + s.vision_heads * n * hd) * info.get("n_cls_layers", 1)
    if op == "received_attention" and s.tower is None:  # every query row of one ViT layer
        n = s.n_vision_tokens
        return 2 * (2 * n * h * h + n * n * h)  # q and k of n tokens, q.k^T of all heads
    if op == "coverage":
        nv = info["n_visual"]
        return 2 * ((n_text + nv) * nv * s.d + nv * nv * h)
    if op == "dpp":
        nv = info["n_visual"]
        return 2 * ((n_text + nv) * nv * s.d + nv * nv * s.d)
    if op == "contextual_merge":
        return 2 * info["n_merge"] * info["contextual"] * (hd + h)
    if op == "diversity":
        return 2 * info["n_visual"] ** 2 * s.d
    if op == "vscan_merge":  # VScan: cosine [M, K] and group sums [K, D] (vlmopt.ir.vscan)
        return 4 * (info["n_visual"] - info["n_kept"]) * info["n_kept"] * s.d
    if s.tower is not None:  # e.g. received_attention on a CLS-free tower
        return s.tower.select_flops(op, list(s.grids)) or 0
    return 0


def measure_graph_breakdown(gm: torch.nn.Module, batch: dict) -> dict[str, int]:
    """FlopCounterMode FLOPs of one run of a vlmopt block graph, per graph node (by name).

    Parameters are swapped for fake tensors as in ``measure_prefill_breakdown``; each node's
    FLOPs are the counter's growth while that node runs, so shared submodules cannot confuse
    the attribution. Nodes that count nothing are left out.
    """
    from torch.fx import Interpreter
    from torch.utils.flop_counter import FlopCounterMode

    register_sdpa_flop_formulas()
    out: dict[str, int] = {}

    class _Count(Interpreter):
        def run_node(self, n):
            before = fc.get_total_flops()
            res = super().run_node(n)
            if fc.get_total_flops() > before:
                out[n.name] = fc.get_total_flops() - before
            return res

    names = gm.meta["vlmopt"]["inputs"]
    with torch.no_grad(), FlopCounterMode(display=False) as fc, fake_weights(gm):
        _Count(gm).run(*(batch[k] for k in names))
    out["total"] = fc.get_total_flops()
    return out
