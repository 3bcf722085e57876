"""Analytic FLOPs and weight bytes of the Qwen-VL vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

Prices the whole Hugging Face vision module (``model.model.visual``) for a list of images'
``grid_thw`` (t, h, w in patches, before the merge): patch embedding, every block, the patch
merger that projects into the LLM and, for Qwen3-VL, the deepstack mergers. FLOPs follow
``vlmopt.cost``: 2 per multiply-accumulate, exactly what ``FlopCounterMode`` counts (linears
and the patch conv without bias adds; SDPA over the full score matrix of each chunk); norms,
activations, RoPE and the interpolated position embeddings of Qwen3-VL are free.

Attention is chunked as HF's SDPA path runs it: one chunk per frame (``cu_seqlens``: t chunks
of h*w patches per image) and, in Qwen2.5-VL's windowed blocks, one chunk per window of
``window_size`` px cut on the merged grid, so border windows are smaller.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmopt.cost import Tower

__all__ = ["QwenTower", "n_llm_tokens", "qwen_vision_breakdown", "qwen_vision_flops",
           "qwen_vision_param_bytes", "received_attention_flops"]

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class _Tower:
    """The dimensions of one Qwen vision tower, read from its vision config."""

    family: str  # "qwen2_vl", "qwen2_5_vl" or "qwen3_vl"
    d: int  # hidden size inside the tower
    m: int  # MLP intermediate size
    mlp_mats: int  # 2 (fc1, fc2) or 3 (gate, up, down: gated SiLU)
    depth: int
    patch_in: int  # C * temporal_patch * patch * patch: one patch's input features
    merge: int  # spatial merge size
    out: int  # merger output = LLM hidden size
    n_mergers: int  # mergers that run: the final one + deepstack ones at existing blocks
    n_deepstack: int = 0  # deepstack mergers built (one per listed index)
    window_blocks: int = 0  # Qwen2.5-VL: blocks with window attention
    window: int = 0  # Qwen2.5-VL: window side in merged cells

    @property
    def merged(self) -> int:
        return self.d * self.merge ** 2  # merger width: merge x merge patches concatenated


def _tower(vc) -> _Tower:
    vc = getattr(vc, "vision_config", vc)  # also accept the composite config
    mt = vc.model_type.removesuffix("_vision")
    if mt not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        raise ValueError(f"vision_config.model_type={vc.model_type!r}: not a Qwen-VL vision tower")
    patch_in = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    common = dict(depth=vc.depth, patch_in=patch_in, merge=vc.spatial_merge_size)
    if mt == "qwen2_vl":  # hidden_size is the LLM width here; the tower is embed_dim wide
        return _Tower(mt, vc.embed_dim, int(vc.embed_dim * vc.mlp_ratio), 2, out=vc.hidden_size,
                      n_mergers=1, **common)
    if mt == "qwen2_5_vl":
        window = vc.window_size // vc.spatial_merge_size // vc.patch_size
        if window < 1:
            raise ValueError(f"window_size={vc.window_size} is under one merged cell "
                             f"({vc.spatial_merge_size} x {vc.patch_size} px)")
        n_full = len({i for i in vc.fullatt_block_indexes if 0 <= i < vc.depth})
        return _Tower(mt, vc.hidden_size, vc.intermediate_size, 3, out=vc.out_hidden_size,
                      n_mergers=1, window_blocks=vc.depth - n_full, window=window, **common)
    # qwen3_vl. NOTE: HF builds one deepstack merger per listed index but runs it only after a
    # block that exists
    idx = vc.deepstack_visual_indexes
    n_run = len({i for i in idx if 0 <= i < vc.depth})
    return _Tower(mt, vc.hidden_size, vc.intermediate_size, 2, out=vc.out_hidden_size,
                  n_mergers=1 + n_run, n_deepstack=len(idx), **common)

def _check(s: _Tower, grids: list[Grid]) -> list[Grid]:
    out = []
    for g in grids:
        t, h, w = (int(x) for x in g)
        if min(t, h, w) < 1 or h % s.merge or w % s.merge:
            raise ValueError(f"grid {tuple(g)}: t, h, w must be positive and h, w multiples of "
                             f"spatial_merge_size={s.merge}")
        out.append((t, h, w))
    return out


def _sides(n: int, k: int) -> list[int]:
    """Window sides along one axis of n merged cells cut every k: full ones, then the rest."""
    return [k] * (n // k) + ([n % k] if n % k else [])


def _window_lengths(s: _Tower, t: int, h: int, w: int) -> list[int]:
    """Tokens of every attention window of one image (as HF's ``get_vision_window_index``)."""
    rows = _sides(h // s.merge, s.window)
    cols = _sides(w // s.merge, s.window)
    return [r * c * s.merge ** 2 for r in rows for c in cols] * t


def _attn_macs(s: _Tower, lengths: list[int]) -> int:
    # per chunk of n tokens: QK^T [heads, n, n] and A.V [heads, n, hd]; heads * hd = d, so the
    # head count drops out
    return sum(2 * n * n * s.d for n in lengths)


def qwen_vision_breakdown(vision_config, grids: list[Grid]) -> dict[str, int]:
    """FLOPs of the HF vision module for these images: "vision" (patch embedding and blocks),
    "merger" (the patch merger into the LLM, plus Qwen3-VL's deepstack mergers) and "total".

    ``vision_config``: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision config (or the composite
    config holding it). ``grids``: one (t, h, w) per image or video, in patches before the merge.
    """
    s = _tower(vision_config)
    grids = _check(s, grids)
    n = sum(t * h * w for t, h, w in grids)  # patches in the tower
    frames = [h * w for t, h, w in grids for _ in range(t)]  # full attention: one chunk a frame
    conv = n * s.patch_in * s.d  # patch conv: [n, C*tp*p*p] -> [n, d]
    per_block = (4 * n * s.d * s.d  # qkv [n, 3d] and proj [n, d]
                 + s.mlp_mats * n * s.d * s.m)  # fc1/fc2 or gate/up/down: [n, m] and [n, d]
    attn = (s.depth - s.window_blocks) * _attn_macs(s, frames)
    if s.window_blocks:
        windows = [x for t, h, w in grids for x in _window_lengths(s, t, h, w)]
        attn += s.window_blocks * _attn_macs(s, windows)
    vision = 2 * (conv + s.depth * per_block + attn)
    n_merged = n // s.merge ** 2
    # each merger: [n/merge^2, d*merge^2] -> [.., d*merge^2] -> [.., out]
    merger = 2 * s.n_mergers * n_merged * (s.merged * s.merged + s.merged * s.out)
    return {"vision": vision, "merger": merger, "total": vision + merger}


def qwen_vision_flops(vision_config, grids: list[Grid]) -> int:
    """FLOPs of the whole HF vision module (``model.model.visual``) for these images' grids."""
    return qwen_vision_breakdown(vision_config, grids)["total"]


def qwen_vision_param_bytes(vision_config, bytes_per_el: int) -> int:
    """Bytes of every parameter of the HF vision module at ``bytes_per_el`` each."""
    s = _tower(vision_config)
    vc = getattr(vision_config, "vision_config", vision_config)
    d, m, dm = s.d, s.m, s.merged
    norm = d if s.family == "qwen2_5_vl" else 2 * d  # RMSNorm: weight; LayerNorm: weight + bias
    block = (2 * norm
             + 3 * d * d + 3 * d + d * d + d  # qkv, proj (with biases)
             + (s.mlp_mats - 1) * (d * m + m) + m * d + d)  # fc1 (+ up) and fc2/down, biased
    merger_linears = dm * dm + dm + dm * s.out + s.out
    merger = norm + merger_linears  # final merger normalizes d-wide, before the shuffle
    n = s.patch_in * d + s.depth * block + merger
    if s.family == "qwen3_vl":
        n += d + vc.num_position_embeddings * d  # conv bias, learned position table
        n += s.n_deepstack * (2 * dm + merger_linears)  # deepstack: LayerNorm after shuffle
    return n * bytes_per_el


def received_attention_flops(vision_config, grids: list[Grid]) -> int:
    """VisionZip's score on a CLS-free tower (vlmopt.ir.received) for one sample's images: the
    last block's qkv [n, 3d] recomputed and q.k^T over all n patches with a block mask, as it
    runs (at batch 1, the export's batch)."""
    s = _tower(vision_config)
    n = sum(t * h * w for t, h, w in _check(s, grids))
    return 2 * (3 * n * s.d * s.d + n * n * s.d)


def n_llm_tokens(vision_config, grids: list[Grid]) -> int:
    """Visual tokens entering the LLM: t*h*w / merge**2 per image."""
    s = _tower(vision_config)
    return sum(t * h * w // s.merge ** 2 for t, h, w in _check(s, grids))


class QwenTower(Tower):
    """``vlmopt.cost.Tower`` for a Qwen-VL vision config: the functions above."""

    def __init__(self, vision_config):
        _tower(vision_config)  # refuses a config that is not a Qwen-VL tower
        self.vc = vision_config

    def n_llm_tokens(self, grids) -> int:
        return n_llm_tokens(self.vc, grids)

    def breakdown(self, grids) -> dict[str, int]:
        return qwen_vision_breakdown(self.vc, grids)

    def param_bytes(self, bytes_per_el: int) -> tuple[int, int]:
        return qwen_vision_param_bytes(self.vc, bytes_per_el), 0  # the merger is the tower's

    def select_flops(self, op: str, grids) -> int | None:
        # VisionZip's score on this CLS-free tower: the last block's qkv and q.k^T again
        return received_attention_flops(self.vc, grids) if op == "received_attention" else None


def _count_tiles(grids, side: int) -> int:
    """Tiles over one sample's images, each grid (n_tiles, side, side)."""
    n = 0
    for g in grids:
        t, h, w = (int(x) for x in g)
        if t < 1 or (h, w) != (side, side):
            raise ValueError(f"grid {tuple(g)}: expected (n_tiles >= 1, {side}, {side})")
        n += t
    return n


class TileTower(Tower):
    """``vlmopt.cost.Tower`` of Idefics3 / SmolVLM: a SigLIP-like ViT run once per S x S tile,
    then the connector (pixel shuffle by ``scale`` and one linear without bias) into the LLM.
    ``grids``: one (n_tiles, S/p, S/p) per image. FLOPs as FlopCounterMode counts them: the
    patch conv and the linears without bias adds, SDPA over each tile's full score matrix (the
    pixel mask masks, it does not shorten); norms, GELU and position embeddings are free."""

    def __init__(self, d: int, m: int, depth: int, patch: int, channels: int, side: int,
                 scale: int, out: int, num_positions: int):
        self.d, self.m, self.depth, self.patch, self.channels = d, m, depth, patch, channels
        self.side, self.scale, self.out, self.num_positions = side, scale, out, num_positions

    @classmethod
    def from_config(cls, config) -> TileTower:
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        scale = int(config.scale_factor)
        if side % scale:
            raise ValueError(f"vision_config: {side} patches a side do not pixel-shuffle by "
                             f"scale_factor={scale}")
        return cls(vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers, vc.patch_size,
                   vc.num_channels, side, scale, config.text_config.hidden_size, side * side)

    def _tiles(self, grids) -> int:
        return _count_tiles(grids, self.side)

    def n_llm_tokens(self, grids) -> int:
        return self._tiles(grids) * (self.side // self.scale) ** 2

    def breakdown(self, grids) -> dict[str, int]:
        tiles, n, d = self._tiles(grids), self.side ** 2, self.d
        conv = n * d * self.channels * self.patch ** 2
        layer = 4 * n * d * d + 2 * n * n * d + 2 * n * d * self.m
        vision = 2 * tiles * (conv + self.depth * layer)
        merger = 2 * self.n_llm_tokens(grids) * d * self.scale ** 2 * self.out
        return {"vision": vision, "merger": merger, "total": vision + merger}

    def param_bytes(self, bytes_per_el: int) -> tuple[int, int]:
        d, m = self.d, self.m
        layer = 4 * (d * d + d) + 2 * 2 * d + (d * m + m) + (m * d + d)  # attn, 2 LN, MLP
        vision = (d * self.channels * self.patch ** 2 + d + self.num_positions * d
                  + self.depth * layer + 2 * d)  # conv, positions, layers, post-LN
        return vision * bytes_per_el, d * self.scale ** 2 * self.out * bytes_per_el

    def select_flops(self, op: str, grids) -> int | None:
        # VisionZip's received attention (vlmopt.ir.received_tiles): the last layer's q and k
        # again for every tile's patches, and each head's q.k^T
        if op != "received_attention":
            return None
        n = self.side ** 2
        return 2 * self._tiles(grids) * (2 * n * self.d * self.d + n * n * self.d)


class InternTower(Tower):
    """``vlmopt.cost.Tower`` of InternVL: InternViT (CLS + patches) once per S x S tile, then the
    CLS dropped, pixel shuffle by ``downsample_ratio`` and the LayerNorm + 2-linear projector.
    ``grids``: one (n_tiles, S/p, S/p) per image. FLOPs as FlopCounterMode counts them (linears
    and the patch conv without bias adds, SDPA over each tile's CLS + patches; norms, GELU,
    layer scales free)."""

    def __init__(self, vc, ratio: float, out: int, drop_cls: bool):
        self.d, self.m, self.depth = vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers
        self.patch = vc.patch_size if isinstance(vc.patch_size, int) else vc.patch_size[0]
        size = vc.image_size if isinstance(vc.image_size, int) else vc.image_size[0]
        self.side, self.channels, self.out = size // self.patch, vc.num_channels, out
        self.per_tile = int(self.side ** 2 * ratio ** 2)
        self.proj_in = int(self.d / ratio ** 2)
        self.drop_cls = drop_cls
        self.bias = bool(vc.attention_bias)
        self.norm = 2 if vc.norm_type == "layer_norm" else 1  # parameters per channel
        self.qk_norm = bool(vc.use_qk_norm)
        self.mask_token = bool(vc.use_mask_token)
        self.abs_pos = bool(vc.use_absolute_position_embeddings)
        self.final_norm = not vc.use_mean_pooling

    @classmethod
    def from_config(cls, config) -> InternTower:
        return cls(config.vision_config, float(config.downsample_ratio),
                   config.text_config.hidden_size,
                   config.vision_feature_select_strategy == "default")

    def _tiles(self, grids) -> int:
        return _count_tiles(grids, self.side)

    def n_llm_tokens(self, grids) -> int:
        return self._tiles(grids) * self.per_tile

    def breakdown(self, grids) -> dict[str, int]:
        tiles, d = self._tiles(grids), self.d
        n = self.side ** 2 + 1  # CLS + patches inside the ViT
        conv = self.side ** 2 * d * self.channels * self.patch ** 2
        layer = 4 * n * d * d + 2 * n * n * d + 2 * n * d * self.m
        vision = 2 * tiles * (conv + self.depth * layer)
        t = self.n_llm_tokens(grids)
        merger = 2 * t * (self.proj_in * self.out + self.out * self.out)
        return {"vision": vision, "merger": merger, "total": vision + merger}

    def param_bytes(self, bytes_per_el: int) -> tuple[int, int]:
        d, m = self.d, self.m
        layer = (3 * d * d + 3 * d * self.bias + d * d + d  # q, k, v (+bias), projection
                 + 2 * d * self.qk_norm  # RMSNorm weights on q, k
                 + 2 * self.norm * d + 2 * d  # layernorm before / after, lambda_1 / lambda_2
                 + (d * m + m) + (m * d + d))  # MLP
        emb = (d + d * self.mask_token + d * self.channels * self.patch ** 2 + d
               + (self.side ** 2 + 1) * d * self.abs_pos)  # CLS, mask, conv, positions
        vision = emb + self.depth * layer + 2 * d * self.final_norm
        project = 2 * self.proj_in + (self.proj_in * self.out + self.out) + self.out ** 2 \
            + self.out
        return vision * bytes_per_el, project * bytes_per_el

    def select_flops(self, op: str, grids) -> int | None:
        # VisionZip's received attention (vlmopt.ir.received_tiles): q and k of the feature
        # layer again over each tile's CLS + patches, and each head's q.k^T
        if op != "received_attention":
            return None
        n = self.side ** 2 + 1
        return 2 * self._tiles(grids) * (2 * n * self.d * self.d + n * n * self.d)


class AnyResTower(Tower):
    """``vlmopt.cost.Tower`` of LLaVA-NeXT / LLaVA-OneVision: a CLIP (NeXT: CLS, feature layer
    -2, CLS dropped) or SigLIP (OneVision: no CLS, strategy "full") ViT run once per S x S tile,
    the MLP projector on every tile's P = (S/p)^2 features, then the AnyRes packing (unpadding,
    OneVision's bilinear downsampling, newline rows), which FlopCounterMode counts as nothing.
    ``grids``: one (n_tiles, rows, cols) per image: the tiles the tower runs (base included)
    and the packed feature grid after unpadding and downsampling; the image gives P + rows *
    cols visual tokens and ``rows`` newline tokens (``n_text_tokens``: text to the passes)."""

    def __init__(self, d: int, m: int, depth: int, patch: int, channels: int, side: int,
                 has_cls: bool, proj_in: int, out: int, proj_bias: bool):
        self.d, self.m, self.depth, self.patch, self.channels = d, m, depth, patch, channels
        self.side, self.has_cls, self.proj_in, self.out = side, has_cls, proj_in, out
        self.proj_bias = proj_bias

    @classmethod
    def from_config(cls, config) -> AnyResTower:
        vc = config.vision_config
        mt = vc.model_type
        if mt not in ("clip_vision_model", "siglip_vision_model"):
            raise ValueError(f"vision_config.model_type={mt!r}: AnyRes is priced for CLIP and "
                             "SigLIP towers")
        if mt == "siglip_vision_model" and getattr(vc, "vision_use_head", False):
            raise ValueError("vision_config.vision_use_head: the SigLIP pooling head is not "
                             "priced (AnyRes checkpoints build the tower without it)")
        layer = config.vision_feature_layer
        n_feat = 1 if isinstance(layer, int) else len(layer)
        return cls(vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers, vc.patch_size,
                   vc.num_channels, vc.image_size // vc.patch_size,
                   mt == "clip_vision_model", vc.hidden_size * n_feat,
                   config.text_config.hidden_size,
                   bool(getattr(config, "multimodal_projector_bias", True)))

    def _check(self, grids) -> list[tuple[int, int, int]]:
        out = []
        for g in grids:
            t, r, c = (int(x) for x in g)
            if t < 1 or r < 1 or c < 1:
                raise ValueError(f"grid {tuple(g)}: expected (n_tiles, rows, cols) >= 1")
            out.append((t, r, c))
        return out

    def n_llm_tokens(self, grids) -> int:
        return sum(self.side ** 2 + r * c for _, r, c in self._check(grids))

    def n_text_tokens(self, grids) -> int:
        return sum(r for _, r, _ in self._check(grids))

    def breakdown(self, grids) -> dict[str, int]:
        tiles = sum(t for t, _, _ in self._check(grids))
        P, d = self.side ** 2, self.d
        n = P + int(self.has_cls)  # tokens inside the ViT
        conv = P * d * self.channels * self.patch ** 2
        layer = 4 * n * d * d + 2 * n * n * d + 2 * n * d * self.m
        vision = 2 * tiles * (conv + self.depth * layer)
        merger = 2 * tiles * P * (self.proj_in * self.out + self.out * self.out)
        return {"vision": vision, "merger": merger, "total": vision + merger}

    def param_bytes(self, bytes_per_el: int) -> tuple[int, int]:
        d, m, P = self.d, self.m, self.side ** 2
        layer = 4 * (d * d + d) + 2 * 2 * d + (d * m + m) + (m * d + d)  # attn, 2 LN, MLP
        conv = d * self.channels * self.patch ** 2
        if self.has_cls:  # CLIP: conv without bias, class + P+1 positions, pre- and post-LN
            emb = conv + d + (P + 1) * d + 2 * 2 * d
        else:  # SigLIP: conv with bias, P positions, post-LN
            emb = conv + d + P * d + 2 * d
        vision = emb + self.depth * layer
        proj = self.proj_in * self.out + self.out * self.out + 2 * self.out * int(self.proj_bias)
        return vision * bytes_per_el, (proj + self.out) * bytes_per_el  # + image_newline [D]
