"""Leaf modules of the block graph. Each wraps (shares, never copies) one part of the HF model.

They call exactly the code transformers runs in the family's ``...ForConditionalGeneration.forward``
(LLaVA, Qwen-VL), in the same order and with the same arguments, which is what makes the identity
plan bit-exact. Which of them a family uses is its adapter's choice (vlmopt.frontend).
Passes never mutate these in place: they add new modules and rewire nodes.
"""

from __future__ import annotations

import torch
from torch import nn


class Vision(nn.Module):
    """pixel_values [B, 3, H, W] -> features of the layer the projector reads [B, Nv, Dv]."""

    def __init__(self, tower: nn.Module, feature_layer: int, drop_cls: bool):
        super().__init__()
        self.tower, self.feature_layer, self.drop_cls = tower, feature_layer, drop_cls

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[self.feature_layer]  # [B, 1 + Nv, Dv]
        return feats[:, 1:] if self.drop_cls else feats


class QwenVision(nn.Module):
    """Qwen-VL tower + patch merger: (patches [N, C*tp*p*p], grid_thw [n, 3]) -> LLM embeddings
    of every image's tokens, concatenated in prompt order [Nv_total, D]; with deepstack
    (Qwen3-VL) also each deepstack merger's features [Nv_total, D], as a tuple."""

    def __init__(self, tower: nn.Module, n_deepstack: int = 0):
        super().__init__()
        self.tower, self.n_deepstack = tower, n_deepstack

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        out = self.tower(pixel_values.type(self.tower.dtype), grid_thw=image_grid_thw,
                         return_dict=True)
        if not self.n_deepstack:
            return out.pooler_output
        return (out.pooler_output, *out.deepstack_features)


class Identity(nn.Module):
    """The project node of a family whose projector lives inside the vision tower (Qwen-VL)."""

    recompute = True  # cheaper to recompute than to keep (search.evaluator)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


class Project(nn.Module):
    """Visual features [B, Nv, Dv] -> LLM embeddings [B, Nv, D]."""

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.projector = projector

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.projector(feats)


class Embed(nn.Module):
    recompute = True  # cheaper to recompute than to keep (search.evaluator)

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)  # [B, T, D]


class Merge(nn.Module):
    """Scatter image embeddings into the image-token slots; also returns the visual mask. With
    ``text_rows`` (a vision node that returns some rows that are not image features, e.g.
    AnyRes' newline embeddings) those slots are left out of the visual mask."""

    recompute = True  # cheaper to recompute than to keep (search.evaluator)

    def __init__(self, image_token_id: int):
        super().__init__()
        self.image_token_id = image_token_id

    def forward(self, tok: torch.Tensor, img: torch.Tensor, input_ids: torch.Tensor,
                text_rows: torch.Tensor | None = None):
        visual = input_ids == self.image_token_id  # [B, T]
        slots = visual.unsqueeze(-1).expand_as(tok)  # [B, T, D]
        # NOTE: same op as HF (masked_scatter of the flattened image features): a pure copy
        hidden = tok.masked_scatter(slots, img.reshape(-1, img.shape[-1]).to(tok.dtype))
        if text_rows is not None:  # rows of ``img`` that are not image features (AnyRes
            # newlines) fill image-token slots but stay text for every token pass
            visual = visual.masked_scatter(visual, ~text_rows.reshape(-1))
        return hidden, visual


class CausalMask(nn.Module):
    """The 4-D mask HF builds for this attention implementation (None when SDPA can use
    is_causal). Rebuilt after every change of T: kept tokens stay sorted, so index-causal holds.
    """

    recompute = True  # cheaper to recompute than to keep (search.evaluator)

    def __init__(self, text_config):
        super().__init__()
        self.config = text_config

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor):
        from transformers.masking_utils import create_causal_mask

        # NOTE: an explicit 2-D mask is always passed; with None, HF reads gapped position ids
        # (left after a token drop) as packed sequences and builds a block-diagonal mask.
        # M-RoPE ids [3, B, T] are not text positions: HF's VL models pass None here.
        return create_causal_mask(config=self.config, inputs_embeds=hidden,
                                  attention_mask=attention_mask, cache=None,
                                  position_ids=position_ids if position_ids.dim() == 2 else None)


class Rope(nn.Module):
    """Rotary (cos, sin) [B, T, hd] from the position ids that flow with the tokens."""

    recompute = True  # cheaper to recompute than to keep (search.evaluator)

    def __init__(self, rotary: nn.Module):
        super().__init__()
        self.rotary = rotary

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self.rotary(hidden, position_ids=position_ids)


class Decoder(nn.Module):
    """One HF decoder layer on [B, T, D]. It is handed the whole chain state (visual mask and
    padding mask too) so that a pass can read the state at any layer from the node's args."""

    is_decoder_block = True

    def __init__(self, layer: nn.Module, index: int):
        super().__init__()
        self.layer, self.index = layer, index

    def forward(self, hidden, mask, rope, position_ids, visual_mask=None, attention_mask=None):
        # M-RoPE families hand their layers no text position ids (HF passes None)
        return self.layer(hidden, attention_mask=mask, position_embeddings=rope,
                          position_ids=position_ids if position_ids.dim() == 2 else None,
                          use_cache=False)


class Deepstack(nn.Module):
    """Qwen3-VL deepstack after a decoder layer: the visual tokens' hidden states plus the
    deepstack features of the same tokens. ``feats`` [B, T0, D] holds one row per slot of the
    merged sequence (zero on text); ``slots`` [B, T] says which slot each current token was, so
    the features follow the tokens a pass kept."""

    recompute = True  # cheaper to recompute than to keep (search.evaluator)

    def forward(self, hidden, visual_mask, slots, feats):
        f = feats.gather(1, slots[..., None].expand(-1, -1, feats.shape[-1]))  # [B, T, D]
        return torch.where(visual_mask[..., None], hidden + f.to(hidden.dtype), hidden)


class DeepstackFeatures(nn.Module):
    """Deepstack features [Nv_total, D] -> per slot of the merged sequence [B, T0, D]."""

    recompute = True  # cheaper to recompute than to keep (search.evaluator)

    def forward(self, tok: torch.Tensor, feats: torch.Tensor, visual_mask: torch.Tensor):
        slots = visual_mask.unsqueeze(-1).expand_as(tok)
        return torch.zeros_like(tok).masked_scatter(slots, feats.to(tok.dtype))


class Norm(nn.Module):
    recompute = True  # cheaper to recompute than to keep (search.evaluator)

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


class Head(nn.Module):
    """LM head on the last position only (the last prompt token is never dropped): [B, V]."""

    def __init__(self, lm_head: nn.Module):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden[:, -1:, :])[:, 0]


class TileVision(nn.Module):
    """Idefics3 / SmolVLM tower + connector: (pixel_values [B, n, 3, S, S], pixel_attention_mask
    [B, n, S, S]) -> LLM embeddings of every real tile's tokens in prompt order [Nv_total, D].

    The same ops, in the same order, as the model's ``get_image_features``: all-zero tiles are
    the processor's batch padding and are skipped (SmolVLM keeps the first tile if all are);
    under ``torch.export`` (batch 1, where the processor pads nothing) the skip is left out,
    because the number of real tiles is data-dependent."""

    def __init__(self, tower: nn.Module, connector: nn.Module, patch_size: int,
                 keep_one: bool = False):
        super().__init__()
        self.tower, self.connector = tower, connector
        self.patch_size, self.keep_one = patch_size, keep_one

    def tiles(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor):
        """The real tiles [n_real, 3, S, S] and their patch masks [n_real, S/p, S/p]."""
        B, n = pixel_values.shape[:2]
        pv = pixel_values.to(dtype=self.tower.dtype)
        pv = pv.view(B * n, *pv.shape[2:])
        pam = pixel_attention_mask.view(B * n, *pixel_attention_mask.shape[2:])
        if not torch.compiler.is_exporting():
            real = (pv == 0.0).sum(dim=(-1, -2, -3)) != pv.shape[1:].numel()
            if self.keep_one:
                real[0] |= ~torch.any(real)
            pv, pam = pv[real].contiguous(), pam[real].contiguous()
        p = self.patch_size
        sub = pam.unfold(dimension=1, size=p, step=p).unfold(dimension=2, size=p, step=p)
        return pv, (sub.sum(dim=(-1, -2)) > 0).bool()

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor):
        pv, patch_mask = self.tiles(pixel_values, pixel_attention_mask)
        out = self.tower(pixel_values=pv, patch_attention_mask=patch_mask, return_dict=True)
        feats = self.connector(out.last_hidden_state)  # [n_real, tokens_per_tile, D]
        return feats.reshape(-1, feats.shape[-1])


class InternVision(nn.Module):
    """InternVL tower + pixel shuffle + projector: pixel_values [N_tiles, 3, S, S] (every
    prompt's tiles, concatenated) -> LLM embeddings [N_tiles * tokens_per_tile, D]. The ops of
    the model's ``get_image_features``, in its order (the pixel shuffle is pure reshapes)."""

    def __init__(self, tower: nn.Module, projector: nn.Module, feature_layer: int,
                 drop_cls: bool, ratio: float):
        super().__init__()
        self.tower, self.projector = tower, projector
        self.feature_layer, self.drop_cls, self.ratio = feature_layer, drop_cls, ratio

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pv = pixel_values.to(dtype=self.tower.dtype)
        out = self.tower(pixel_values=pv, return_dict=True,
                         output_hidden_states=self.feature_layer != -1)
        feats = out.last_hidden_state if self.feature_layer == -1 else \
            out.hidden_states[self.feature_layer]
        if self.drop_cls:
            feats = feats[:, 1:, :]
        x = self.projector(intern_pixel_shuffle(feats, self.ratio))
        return x.reshape(-1, x.shape[-1])


def intern_pixel_shuffle(feats: torch.Tensor, r: float) -> torch.Tensor:
    """InternVLModel.pixel_shuffle on a tile's patch rows: [n, side^2, c] -> [n, side^2 r^2,
    c / r^2] (pure reshapes, its order: [n, w, h, c] -> [n, w*r, h*r, c/r^2])."""
    n, side = feats.shape[0], int(feats.shape[1] ** 0.5)
    x = feats.reshape(n, side, side, -1)
    _, w, h, c = x.size()
    x = x.view(n, w, int(h * r), int(c / r)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * r), int(w * r), int(c / r ** 2)).permute(0, 2, 1, 3).contiguous()
    return x.reshape(n, -1, x.shape[-1])


class AnyResVision(nn.Module):
    """LLaVA-NeXT / LLaVA-OneVision tower + projector + AnyRes packing: (pixel_values [B, n, 3,
    S, S], image_sizes [B, 2]) -> (LLM embeddings of every image's tokens in prompt order
    [N_total, D], text_rows [N_total] bool: True on the ``image_newline`` rows).

    Eager: the same ops, in the same order, as the model's ``get_image_features`` (one image a
    sample; the base tile and the tiles its ``image_sizes`` selects; unpadding, OneVision's
    ``anyres_max_N`` bilinear downsampling and the newline rows by the model's own
    ``pack_image_features``). The newline rows come from ``layout_of`` (numpy,
    vlmopt.preprocess_anyres), checked against the packed lengths. ``export_forward`` is the
    batch-1 form ONNX gets: the same packing as a gather of layout inputs computed in numpy."""

    def __init__(self, tower: nn.Module, projector: nn.Module, image_newline: nn.Parameter,
                 config, pack, layout_of, onevision: bool):
        super().__init__()
        self.tower, self.projector, self.image_newline = tower, projector, image_newline
        self.config, self._pack, self._layout_of = config, pack, layout_of
        self.onevision = onevision
        self.feature_layer = config.vision_feature_layer
        self.drop_cls = config.vision_feature_select_strategy == "default"

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [N, 3, S, S] -> projected features of each tile [N, P, D]."""
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[self.feature_layer]  # [N, P (+1 CLS), Dv]
        return self.projector(feats[:, 1:] if self.drop_cls else feats)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.config
        sizes = image_sizes.tolist()
        n_tiles = [image_size_to_num_patches(image_size=s, patch_size=cfg.vision_config.image_size,
                                             grid_pinpoints=cfg.image_grid_pinpoints)
                   for s in sizes]
        pv = torch.cat([p[:n] for p, n in zip(pixel_values, n_tiles)], dim=0)
        feats = torch.split(self.features(pv), n_tiles, dim=0)
        if self.onevision:
            packed, _ = self._pack(self, feats, image_sizes, image_newline=self.image_newline,
                                   vision_aspect_ratio=cfg.vision_aspect_ratio)
        else:
            packed, _ = self._pack(self, feats, image_sizes,
                                   vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                   image_newline=self.image_newline)
        rows = []
        for (h, w), f in zip(sizes, packed):
            lay = self._layout_of(int(h), int(w))
            if lay.n_slots != f.shape[0]:
                raise ValueError(f"vision: image of {w}x{h} packs {f.shape[0]} features, the "
                                 f"AnyRes layout says {lay.n_slots}")
            r = torch.ones(lay.n_slots, dtype=torch.bool)
            r[torch.from_numpy(lay.visual)] = False
            rows.append(r)
        return torch.cat(packed, dim=0), torch.cat(rows).to(pixel_values.device)

    def export_forward(self, pixel_values: torch.Tensor, anyres_index: torch.Tensor,
                       anyres_weight: torch.Tensor, anyres_visual: torch.Tensor):
        """Batch 1: pixel_values [1, n, 3, S, S], index / weight [N, 4], visual [Nv] ->
        (embeddings [N, D], text_rows [N]) and the image-feature count Nv (a shape)."""
        f = self.features(pixel_values[0].to(self.tower.dtype))  # [n, P, D]
        table = torch.cat([f.reshape(-1, f.shape[-1]),
                           self.image_newline[None].to(f.dtype)])  # [n * P + 1, D]
        out = (table[anyres_index] * anyres_weight[..., None].to(f.dtype)).sum(1)  # [N, D]
        text = torch.ones(out.shape[0], dtype=torch.bool, device=out.device)
        text = text.index_fill(0, anyres_visual, False)
        return (out, text), anyres_visual.shape[0]
