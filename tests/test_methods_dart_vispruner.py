"""VisPruner's preset against an independent re-implementation of the official rule
(Theia-4869/VisPruner at aefa01a, llava/model/llava_arch.py ``encode_images``), written here
on plain transformers modules with HF eager attention, not with the pass's helpers.
"""

from __future__ import annotations

import pytest
import torch
from helpers import single_sample, tiny_model_and_batch
from vlmopt.passes import select_visual as sv

from vlmopt.ir.capture import capture
from vlmopt.pipeline import run_passes


@pytest.fixture(scope="module")
def two_vit_layers():
    model, batch = tiny_model_and_batch(n_layers=2, vision_layers=2, feature_layer=-2, seed=3)
    model.set_attn_implementation("eager")
    return model, batch


def _official_vispruner(model, pixel_values, T: int, ratio: float) -> list[int]:
    """The official steps: CLS row of the feature layer's attention (head mean), the
    int(T * ratio) best, then rounds dropping up to 8 of the even half most similar to the
    odd half, until T - int(T * ratio) remain."""
    tower = model.model.vision_tower
    sel = model.config.vision_feature_layer
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    feats = out.hidden_states[sel][0, 1:]  # [N, C]
    att = out.attentions[sel][0, :, 0, 1:].mean(0)  # [N]
    n_imp = int(T * ratio)
    n_div = T - n_imp
    order = att.argsort(descending=True)
    important, residual = order[:n_imp], order[n_imp:]
    x = feats / feats.norm(dim=-1, keepdim=True)
    while n_div > 0:
        R = residual.shape[0]
        r = min(8, R - n_div)
        if r <= 0:
            break
        assert R % 2 == 0, "the official code needs an even residual here"
        a, b = x[residual[::2]], x[residual[1::2]]
        scores = (a @ b.T).max(dim=-1).values
        distinct = scores.argsort(descending=True)[r:]
        residual = torch.cat([residual[::2][distinct], residual[1::2]])
    chosen = torch.cat([important, residual]) if n_div > 0 else important
    return sorted(chosen.tolist())


def _graph_kept(gm, one, n_visual):
    """The patch indices the graph keeps (the visual slots scored 1 by select_slots)."""
    found = {}
    mod = gm.get_submodule("vispruner")
    h = mod.register_forward_hook(lambda m, a, out: found.setdefault("kept", out))
    try:
        with torch.no_grad():
            gm(**one)
    finally:
        h.remove()
    kept = found["kept"][0]
    assert kept.shape[0] == n_visual
    return sorted(torch.nonzero(kept)[:, 0].tolist())


@pytest.mark.parametrize("keep", [16, 32])
def test_vispruner_kept_set_is_the_official_rule(two_vit_layers, keep):
    model, batch = two_vit_layers
    n = int((batch["input_ids"][0] == model.config.image_token_id).sum())
    gm, _ = run_passes(capture(model), [("select_visual", sv.vispruner(keep))], example=batch)
    for i in range(batch["input_ids"].shape[0]):
        one = single_sample(batch, i)
        want = _official_vispruner(model, one["pixel_values"], keep, 0.5)
        assert len(want) == keep
        assert _graph_kept(gm, one, n) == want, f"sample {i}"


def test_vispruner_runs_the_language_model_on_the_pruned_contiguous_sequence(two_vit_layers):
    model, batch = two_vit_layers
    one = single_sample(batch, 1)
    cfg = sv.vispruner(16)
    assert cfg.positions == "contiguous" and cfg.important_ratio == 0.5
    gm, _ = run_passes(capture(model), [("select_visual", cfg)], example=batch)
    ids = one["input_ids"][0]
    vis = ids == model.config.image_token_id
    lm = model.model
    with torch.no_grad():
        emb = lm.get_input_embeddings()(one["input_ids"]).clone()
        feats = lm.get_image_features(pixel_values=one["pixel_values"]).pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
        emb[0, vis] = feats.reshape(-1, emb.shape[-1]).to(emb.dtype)
        chosen = torch.nonzero(vis)[:, 0][_official_vispruner(model, one["pixel_values"], 16,
                                                               0.5)]
        keep = torch.sort(torch.cat([torch.nonzero(~vis)[:, 0], chosen])).values
        out = lm.language_model(inputs_embeds=emb[:, keep])  # position_ids=None
        ref = model.lm_head(out.last_hidden_state)[0, -1]
        got = gm(**one)[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_vispruner_config_rejects_a_bad_important_ratio():
    with pytest.raises(ValueError, match="important_ratio"):
        sv.Config("vispruner", 16, important_ratio=1.5)
