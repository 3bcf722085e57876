"""The presets follow the official code's position handling (positions="contiguous" for
PyramidDrop, DivPrune and VisionZip; FastV keeps the original ids), checked against independent
re-implementations of the official rules on plain transformers modules (written here from the
papers and the official repositories, not with the passes' helpers):

- PyramidDrop (Cooperx521/PyramidDrop at 6444f30, llava/model/modeling_llama_pdrop.py): at each
  stage layer, the last instruction token's head-mean attention (that layer's q/k, RoPE at the
  current positions) ranks the visual tokens; the top int(N * ratio) stay, in order, and the
  position ids are rebuilt as 0..len-1.
- DivPrune (vbdi/divprune at 799e2d9, LLaVA/llava/model/llava_arch.py): the first token is the
  one whose nearest neighbour (cosine distance) is farthest, then greedy max-min distance to the
  chosen set; the language model runs on the pruned sequence with position_ids=None.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import single_sample, tiny_model_and_batch
from vlmopt.passes import drop_tokens as dt
from vlmopt.passes import select_visual as sv

from vlmopt.ir.capture import capture
from vlmopt.pipeline import run_passes


@pytest.fixture(scope="module")
def four_layer():
    model, batch = tiny_model_and_batch(n_layers=4, seed=3)
    model.set_attn_implementation("eager")
    return model, batch


def _merged_embeds(model, one):
    """LLaVA's input embeddings with the image features written into the image tokens."""
    lm = model.model
    with torch.no_grad():
        emb = lm.get_input_embeddings()(one["input_ids"]).clone()
        feats = lm.get_image_features(pixel_values=one["pixel_values"]).pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
        vis = one["input_ids"][0] == model.config.image_token_id
        emb[0, vis] = feats.reshape(-1, emb.shape[-1]).to(emb.dtype)
    return emb, vis


def _causal(T, dtype):
    return torch.full((T, T), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _last_token_attention(layer, h, cos, sin, cfg):
    """Head-mean attention row of the last token in ``layer`` (eager, from its input)."""
    attn = layer.self_attn
    hd = cfg.hidden_size // cfg.num_attention_heads
    x = layer.input_layernorm(h)
    T = x.shape[1]
    q = attn.q_proj(x).view(1, T, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, T, -1, hd).transpose(1, 2)
    q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    att = (q[:, :, -1:] @ k.transpose(-1, -2) / math.sqrt(hd)).softmax(-1)  # [1, H, 1, T]
    return att[0, :, 0].mean(0)


def _official_pdrop(model, one, stages: dict[int, int]):
    """Final-token logits and the kept original indices after each stage."""
    text = model.model.language_model
    cfg = model.config.text_config
    h, vis = _merged_embeds(model, one)
    orig = torch.arange(h.shape[1])
    kept_sets = {}
    with torch.no_grad():
        for i, layer in enumerate(text.layers):
            pos = torch.arange(h.shape[1])[None]  # rebuilt 0..len-1, as the official code
            cos, sin = text.rotary_emb(h, pos)
            if i in stages:
                score = _last_token_attention(layer, h, cos, sin, cfg)
                score = score.masked_fill(~vis, float("-inf"))
                top = score.topk(stages[i]).indices
                keep = torch.sort(torch.cat([torch.nonzero(~vis)[:, 0], top])).values
                h, vis, orig = h[:, keep], vis[keep], orig[keep]
                kept_sets[i] = set(orig[vis].tolist())
                pos = torch.arange(h.shape[1])[None]
                cos, sin = text.rotary_emb(h, pos)
            out = layer(h, attention_mask=_causal(h.shape[1], h.dtype), position_ids=pos,
                        position_embeddings=(cos, sin))
            h = out[0] if isinstance(out, tuple) else out
        return model.lm_head(text.norm(h))[0, -1], kept_sets


def test_pdrop_preset_is_the_official_rule_with_contiguous_positions(four_layer):
    model, batch = four_layer
    one = single_sample(batch, 2)  # the official code runs one unpadded sample
    n = int((one["input_ids"] == model.config.image_token_id).sum())
    cfg = dt.pdrop([1, 2, 3], [0.5, 0.25, 0.125], n)
    assert cfg.positions == "contiguous"
    gm, _ = run_passes(capture(model), [("drop_tokens", cfg)], example=batch)
    ref, kept = _official_pdrop(model, one, {1: n // 2, 2: n // 4, 3: n // 8})
    with torch.no_grad():
        got = gm(**one)[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # and the original-positions variant is a different model from stage 2 on
    var, _ = run_passes(capture(model), [("drop_tokens", dt.pdrop(
        [1, 2, 3], [0.5, 0.25, 0.125], n, positions="original"))])
    with torch.no_grad():
        assert not torch.allclose(var(**one)[0], ref, atol=1e-5)


def _official_divprune(feats: torch.Tensor, keep: int) -> list[int]:
    x = feats / feats.norm(dim=1, keepdim=True)
    dist = 1.0 - x @ x.t()
    chosen: list[int] = []
    for i in range(keep):
        if i == 0:
            score = dist.topk(2, dim=0, largest=False).values[1]  # nearest other token
        else:
            score = dist[chosen].min(dim=0).values
        chosen.append(int(score.argmax()))
    return sorted(chosen)


def test_divprune_preset_is_the_official_rule_on_the_pruned_sequence(four_layer):
    model, batch = four_layer
    one = single_sample(batch, 0)
    cfg = sv.divprune(24)
    assert cfg.positions == "contiguous"
    gm, _ = run_passes(capture(model), [("select_visual", cfg)], example=batch)
    emb, vis = _merged_embeds(model, one)
    vis_idx = torch.nonzero(vis)[:, 0]
    chosen = vis_idx[_official_divprune(emb[0, vis].double(), 24)]
    keep = torch.sort(torch.cat([torch.nonzero(~vis)[:, 0], chosen])).values
    with torch.no_grad():  # the language model on the pruned sequence, position_ids=None
        out = model.model.language_model(inputs_embeds=emb[:, keep])
        ref = model.lm_head(out.last_hidden_state)[0, -1]
        got = gm(**one)[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_fastv_preset_keeps_original_positions():
    assert dt.fastv(2, 0.5, 576).positions == "original"
    assert sv.visionzip(54, 10).positions == "contiguous"


def test_contiguous_positions_are_refused_on_m_rope():
    from helpers import build_tiny_qwen

    with pytest.raises(ValueError, match="contiguous.*M-RoPE"):
        cfg = dt.Config(keep={"layer_1": 0.5}, positions="contiguous")
        run_passes(capture(build_tiny_qwen("qwen2_5_vl")), [("drop_tokens", cfg)], verify=False)


def test_bad_positions_value_is_rejected():
    with pytest.raises(ValueError, match="positions"):
        dt.Config(keep={"layer_1": 3}, positions="renumbered")
    with pytest.raises(ValueError, match="positions"):
        sv.Config("divprune", 3, positions="")


def test_contiguous_positions_export_with_parity(loaded_tiny, synth_data, tmp_path):
    """The official-convention presets run in the ONNX package too (prefill renumbers, decode
    continues after the original prompt), with parity checked by emit."""
    from artifacts import plan_json

    from vlmopt.api import apply_plan
    from vlmopt.data.dataset import load_records
    from vlmopt.emit import emit

    lm = loaded_tiny
    gm = apply_plan(lm, plan_json(lm, [
        {"name": "select_visual", "config": {"method": "visionzip", "keep": 60,
                                             "contextual": 8, "positions": "contiguous"}},
        {"name": "drop_tokens", "config": {"keep": {"layer_1": 30}, "score_at": "next",
                                           "positions": "contiguous"}}]))
    manifest = emit(lm, gm, tmp_path, load_records(str(synth_data))[:3], parity_samples=3)
    assert manifest["parity"]["max_abs_logit_diff"] <= manifest["parity"]["atol"]
