"""MMTok's selection (Ironieser/MMTok at d1522cd, "MMTok: Multimodal Coverage Maximization for
Efficient Inference of VLMs", arXiv 2508.18264): greedy maximum coverage of the text tokens and
of all original vision tokens.

Written from the official rule (no code copied; ``mmtok/core/semantic_selector.py``
``mm_coverage_selection`` and ``greedy_merged_jit_kernel``, ``mmtok/core/mmtok_core.py``,
``mmtok/llava/clip_encoder_mmtok.py``, ``mmtok/qwen/modeling_qwen2_5_vl_mmtok.py``). With every
vector L2-normalised (norm clamped at 1e-8) and float32:
  P [m, Nv] = softmax_j(cos(text_i, e_j) / tv_temperature) / m   text -> vision, where e are the
      visual tokens' LLM input embeddings (projector / merger output) and text the LLM input
      embeddings (``embed_tokens``) of m text tokens;
  Q [Nv, Nv] = softmax_j(cos(x_u, x_j) / vv_temperature) / Nv    vision -> vision, where x are the
      vision features before the projector: LLaVA the feature layer (``hidden_states[-2]``, CLS
      dropped), Qwen2.5-VL the last ViT block's output averaged over each 2x2 merge group,
      window order undone;
  C = [P; alpha * Q] [m + Nv, Nv]; f(S) = sum_r max_{s in S} C[r, s] (0 for S empty);
  ``keep`` greedy steps, each adding argmax_j sum_r max(0, C[r, j] - best_r) over unchosen j
  (first index on ties), best_r = max over the chosen of C[r, .]; kept in patch order.
Official defaults: alpha 0.5, vv_temperature 0.2, tv_temperature 0.02 (LLaVA,
``mmtok/llava/llava_inject.py``) or 0.01 (Qwen2.5-VL, ``mmtok/qwen/qwen2_5_vl_mmtok.py``).

Deviations (all forced by a graph that takes token ids, not strings):
  text: the official code embeds the question string, re-tokenised word by word without BOS
      (LLaVA: stopwords and the "Answer the question using a single word or phrase." suffix
      removed by ``text_processor.py``; Qwen: "Question: " + the question). Here the text
      targets are every attended non-visual token of the prompt as the model sees it (chat
      template, system prompt, BOS and stopwords included), read from the merge node's hidden
      states at the text slots (the same embedding table).
  agent: the optional VLM "agent" that enriches the text is left out.
  batch: the official code loops over samples with one text; here each row covers its own
      prompt (padding rows excluded, m per row).
  budget: a fraction rounds half up (vlmopt's ``keep_count``); the Qwen port floors
      ``int(ratio * n)``.

The ``keep`` steps are one ``torch.while_loop`` when exported (an ONNX Loop whose trip count is
computed in the graph, like DivPrune's in vlmopt.ir.select), so one artifact serves every image
size on dynamic-resolution models.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmopt.ir.received import undo_window_order
from vlmopt.ir.select import _visual, repeat_loop, to_slots
from vlmopt.ir.tokens import keep_count, visual_count


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def coverage_matrix(text: torch.Tensor, text_ok: torch.Tensor, embeds: torch.Tensor,
                    feats: torch.Tensor, alpha: float, tv_temperature: float,
                    vv_temperature: float) -> torch.Tensor:
    """C [B, T + Nv, Nv] from text rows [B, T, D] (``text_ok`` [B, T] marks the real text
    targets; other rows are zero and cover nothing), visual embeddings [B, Nv, D] and vision
    features [B, Nv, Dv]."""
    z, e, x = _unit(text.float()), _unit(embeds.float()), _unit(feats.float())
    m = text_ok.sum(-1).clamp(min=1).to(z.dtype)  # [B]
    P = torch.softmax(z @ e.transpose(1, 2) * (1.0 / tv_temperature), dim=-1)  # [B, T, Nv]
    P = P / m[:, None, None] * text_ok[..., None].to(z.dtype)
    Nv = x.shape[1]
    Q = torch.softmax(x @ x.transpose(1, 2) * (1.0 / vv_temperature), dim=-1) / Nv
    return torch.cat([P, Q * alpha], dim=1)


def coverage_step(chosen: torch.Tensor, best: torch.Tensor, C: torch.Tensor, pick=None):
    """One greedy pick: chosen [B, Nv] bool, best [B, R] (each target's best cover so far),
    C [B, R, Nv] -> (chosen, best) with the unchosen token of largest coverage gain added."""
    B, R, _ = C.shape
    gain = (C - best[..., None]).clamp_min(0).sum(1).masked_fill(chosen, float("-inf"))
    j = gain.argmax(-1) if pick is None else pick(gain)  # [B]
    chosen = chosen.scatter(1, j[:, None], True)
    best = torch.maximum(best, C.gather(2, j[:, None, None].expand(B, R, 1))[..., 0])
    return chosen, best


def coverage_loop(chosen: torch.Tensor, best: torch.Tensor, C: torch.Tensor, n):
    """``n`` (int or SymInt) greedy picks as one ``torch.while_loop`` (an ONNX Loop)."""
    return repeat_loop(lambda c, b: coverage_step(c, b, C), (chosen, best), n)


class CoverageScore(nn.Module):
    """(hidden [B, T, D], visual_mask, attention_mask, vision features [B, Nv, Dv] or, from a
    dynamic-resolution tower, [B * Nv, Dv] in prompt order) -> per-slot scores [B, T]: 1 on
    the ``keep`` visual slots MMTok's greedy coverage picks."""

    def __init__(self, n_visual: int | None, keep: int | float, alpha: float,
                 tv_temperature: float, vv_temperature: float):
        super().__init__()
        self.n_visual, self.keep, self.alpha = n_visual, keep, alpha
        self.tv_temperature, self.vv_temperature = tv_temperature, vv_temperature

    def forward(self, hidden, visual_mask, attention_mask, feats) -> torch.Tensor:
        chosen, _ = self._greedy(hidden, visual_mask, attention_mask, feats, margins=False)
        return to_slots(chosen.to(hidden.dtype), visual_mask)

    @torch.no_grad()
    def decision_margin(self, hidden, visual_mask, attention_mask, feats) -> torch.Tensor:
        """Per sample [B]: the smallest gap between the winning and the runner-up gain over
        every pick, relative to the winning gain (emit.decision_margins screens export-parity
        samples by it). Relative, because gains shrink toward 0 as coverage saturates (~1e-4 at
        the 40th pick on synth-llava) while their rounding error stays a few float32 ulps of
        the gain itself; PARITY_MARGIN (1e-5) is then ~100 ulps. All gains 0: exact ties that
        both runtimes break on the first index (inf)."""
        return self._greedy(hidden, visual_mask, attention_mask, feats, margins=True)[1]

    def _greedy(self, hidden, visual_mask, attention_mask, feats, margins: bool):
        nv = visual_count(visual_mask, self.n_visual)
        keep = keep_count(self.keep, nv)
        E = _visual(hidden, visual_mask, nv)[0]  # [B, Nv, D]
        B = E.shape[0]
        X = feats.reshape(B, nv, feats.shape[-1])  # [B, Nv, Dv], slot order
        text_ok = ~visual_mask & attention_mask.bool()  # [B, T]
        C = coverage_matrix(hidden, text_ok, E, X, self.alpha, self.tv_temperature,
                            self.vv_temperature)  # [B, T + Nv, Nv]
        chosen = torch.zeros(B, nv, dtype=torch.bool, device=C.device)
        best = torch.zeros(B, C.shape[1], dtype=C.dtype, device=C.device)
        gap = torch.full((B,), float("inf"), device=C.device) if margins else None
        if torch.compiler.is_exporting() and not margins:
            return coverage_loop(chosen, best, C, keep)[0], gap

        def pick(gain):  # argmax, and the running minimum gap to the runner-up
            nonlocal gap
            if margins and gain.shape[-1] > 1:
                top = gain.topk(2, dim=-1).values
                rel = torch.where(top[:, 0] > 0, (top[:, 0] - top[:, 1]) / top[:, 0],
                                  float("inf"))
                gap = torch.minimum(gap, rel)
            return gain.argmax(-1)

        for _ in range(keep):  # NOTE: sequential by nature
            chosen, best = coverage_step(chosen, best, C, pick)
        return chosen, gap


class QwenVisionPatches(nn.Module):
    """A dynamic-resolution tower as ``blocks.QwenVision`` (LLM embeddings[, *deepstack]), plus
    MMTok's vision features per LLM token: the last block's output averaged over each merge
    group, window order undone [Nv_total, Dv] (mmtok/qwen/modeling_qwen2_5_vl_mmtok.py)."""

    def __init__(self, tower: nn.Module, n_deepstack: int = 0):
        super().__init__()
        self.tower, self.n_deepstack = tower, n_deepstack

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        t = self.tower
        out = t(pixel_values.type(t.dtype), grid_thw=image_grid_thw, return_dict=True)
        h = out.last_hidden_state  # [N, Dv], window order on windowed towers
        unit = t.spatial_merge_size ** 2
        patches = h.reshape(h.shape[0] // unit, unit, -1).mean(1)
        patches = undo_window_order(t, patches, image_grid_thw)
        feats = (out.pooler_output, *out.deepstack_features) if self.n_deepstack else \
            (out.pooler_output,)
        return (*feats, patches)
