"""CDPruner's conditional-DPP selection before the LLM (select_visual, method "cdpruner").

Follows the official code, Theia-4869/CDPruner at 9541616 (``llava/model/llava_arch.py``
``encode_images``, ``llava/model/multimodal_encoder/clip_encoder.py`` ``forward``,
``llava/eval/model_vqa_loader.py``); written from the rule, no code copied. Per image, with
every vector L2-normalised and the matrices in float32:
  S [Nv, Nv] = cos(e_i, e_j) of the visual tokens' LLM input embeddings (projector output);
  r [Nv] = -mean_t cos(x_j, q_t) (the official code negates the similarity, see below),
      min-max normalised: r = (r - min r + 1e-6) / (max r - min r);
  L = diag(r) S diag(r), the conditional DPP kernel;
  greedy MAP inference (Chen et al. 2018, "fast greedy MAP"): d = diag(L); ``keep`` times pick
      j = argmax d over unchosen tokens, e = (L[j] - sum_t c_t[j] c_t) / sqrt(d[j]), store c = e,
      d -= e^2; kept in patch order (the official ``sort(select_idx)``). Positions: the pruned
      sequence is rebuilt with ``position_ids=None`` (contiguous), the preset's default.

Deviations (each forced by what an HF checkpoint and a graph fed token ids hold, or stated):
  relevance space: the official relevance is CLIP's own image-text similarity: the feature
      layer's patches through CLIP's ``post_layernorm`` and ``visual_projection`` against the
      CLIP *text tower*'s embedding of the question (one 77-token segment per text embedding q_t,
      averaged over segments). An HF LLaVA checkpoint carries neither CLIP's text tower nor its
      visual projection, so here x are the LLM input embeddings of the visual tokens (the same
      as S's) and q_t the LLM input embeddings (``embed_tokens``) of every attended non-visual
      prompt token (chat template and BOS included; the official code strips "Answer the
      question using a single word or phrase." and embeds the bare question).
  sign: the official code negates the CLIP similarity (``(-relevance).mean``; its relevance
      visualisation does the same), which suits CLIP's patch features, whose text similarity
      is inverted. ``negate_relevance`` (default True: the official formula) keeps or drops it;
      whether LLM-space relevance wants it is an empirical question (see the tests / report).
  batch: min-max normalisation per image (the official ``relevance.min()`` spans the batch;
      its eval runs batch 1, where the two agree).
  spent kernels: once no unchosen token has a marginal gain above EPS (1e-10; the kernel's
      numerical rank is used up: more picks than independent embeddings, e.g. flat image
      regions), the official code goes on dividing by sqrt(d[j] <= 0) (NaN, then token 0 again).
      Here the greedy stops there, as the fast-map-dpp reference implementation it builds on
      does (laming-chen/fast-map-dpp at 6ab745c, dpp.py ``dpp``: it breaks once the next gain
      is below epsilon, 1e-10), and the remaining picks take the unchosen tokens of highest
      relevance (diag L), so ``keep`` distinct tokens are kept; before that point the picks are
      the official ones.
  the official ``theta`` option (``exp(alpha * relevance)``) is commented out there: not offered.

The loop's matmul-free step (products and sums) is one ``torch.while_loop`` when exported, an
ONNX Loop whose trip count follows the image's patch count, as MMTok's and DivPrune's.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmopt.ir.select import _visual, repeat_loop, to_slots
from vlmopt.ir.tokens import keep_count, visual_count

EPS = 1e-10  # a marginal gain below this: the kernel is spent (fast-map-dpp's epsilon)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def dpp_kernel(hidden: torch.Tensor, text_ok: torch.Tensor, embeds: torch.Tensor,
               negate: bool = True) -> torch.Tensor:
    """L [B, Nv, Nv] from prompt rows hidden [B, T, D] (``text_ok`` [B, T] marks the text
    targets) and visual embeddings [B, Nv, D]."""
    z, e = _unit(hidden.float()), _unit(embeds.float())
    ok = text_ok.to(z.dtype)  # [B, T]
    cos = torch.bmm(z, e.transpose(1, 2))  # [B, T, Nv]
    r = (cos * ok[..., None]).sum(1) / ok.sum(-1).clamp(min=1)[:, None]  # [B, Nv]
    if negate:
        r = -r
    lo, hi = r.amin(-1, keepdim=True), r.amax(-1, keepdim=True)
    r = (r - lo + 1e-6) / (hi - lo).clamp(min=1e-12)  # [B, Nv]
    S = torch.bmm(e, e.transpose(1, 2))  # [B, Nv, Nv]
    return r[:, :, None] * S * r[:, None, :]


def map_step(t, cis, d, chosen, L, diag, pick=None):
    """One fast-greedy-MAP pick. t [] int64 (picks so far), cis [K, B, Nv] (rows >= t zero),
    d [B, Nv] (marginal gains), chosen [B, Nv] bool, L [B, Nv, Nv], diag [B, Nv] = diag L.
    ``pick(score, best)`` -> indices replaces the argmax (decision margins)."""
    K, B, N = cis.shape
    score = d.masked_fill(chosen, float("-inf"))
    best = score.amax(-1, keepdim=True)  # [B, 1]
    spent = best < EPS  # [B, 1]: no gain left, fill by relevance
    score = torch.where(spent, diag.masked_fill(chosen, float("-inf")), score)
    j = score.argmax(-1) if pick is None else pick(score, best[:, 0])  # [B]
    Lj = L.gather(1, j[:, None, None].expand(B, 1, N))[:, 0]  # [B, Nv]
    cj = cis.gather(2, j[None, :, None].expand(K, B, 1))  # [K, B, 1]
    dj = d.gather(1, j[:, None])  # [B, 1]
    # NOTE: products and sums, not a matmul: rows >= t of cis are zero, so the sum over all K
    # rows is the official sum over the first t
    e = (Lj - (cj * cis).sum(0)) / dj.clamp(min=EPS).sqrt()  # [B, Nv]
    e = torch.where(spent, 0.0, e)
    row = (torch.arange(K, device=cis.device) == t)[:, None, None]  # [K, 1, 1]
    cis = torch.where(row, e[None], cis)
    return t + 1, cis, d - e * e, chosen.scatter(1, j[:, None], True)


def greedy_map(L: torch.Tensor, keep, pick=None, loop: bool = False) -> torch.Tensor:
    """The ``keep`` tokens of greedy MAP inference on kernels L [B, Nv, Nv]: chosen [B, Nv]."""
    B, N, _ = L.shape
    diag = torch.diagonal(L, dim1=1, dim2=2).clone()  # [B, Nv]; NOTE: no view of L (the Loop
    # body may not take aliased inputs)
    state = (torch.zeros((), dtype=torch.int64, device=L.device),
             torch.zeros(keep, B, N, dtype=L.dtype, device=L.device), diag.clone(),
             torch.zeros(B, N, dtype=torch.bool, device=L.device))
    if loop:
        return repeat_loop(lambda *s: map_step(*s, L, diag), state, keep)[3]
    for _ in range(keep):  # NOTE: sequential by nature
        state = map_step(*state, L, diag, pick)
    return state[3]


class DppScore(nn.Module):
    """(hidden [B, T, D], visual_mask, attention_mask) -> per-slot scores [B, T]: 1 on the
    ``keep`` visual slots CDPruner's conditional DPP picks."""

    symbolic_n_visual = True  # dynamic export sets n_visual to the symbolic count (export_graph)

    def __init__(self, n_visual: int | None, keep: int | float, negate_relevance: bool = True):
        super().__init__()
        self.n_visual, self.keep, self.negate = n_visual, keep, negate_relevance

    def forward(self, hidden, visual_mask, attention_mask) -> torch.Tensor:
        L, keep = self._kernel(hidden, visual_mask, attention_mask)
        chosen = greedy_map(L, keep, loop=torch.compiler.is_exporting())
        return to_slots(chosen.to(hidden.dtype), visual_mask)

    def _kernel(self, hidden, visual_mask, attention_mask):
        nv = visual_count(visual_mask, self.n_visual)
        E = _visual(hidden, visual_mask, nv)[0]  # [B, Nv, D], slot order
        text_ok = ~visual_mask & attention_mask.bool()  # [B, T]
        return dpp_kernel(hidden, text_ok, E, self.negate), keep_count(self.keep, nv)

    @torch.no_grad()
    def decision_margin(self, hidden, visual_mask, attention_mask) -> torch.Tensor:
        """Per sample [B]: over every pick, the smallest of the winner's lead over the
        runner-up and the winning gain itself, absolute (the kernel's diagonal peaks at ~1).
        Absolute, because the gains come from running subtractions ``d -= e^2`` whose rounding
        error stays a few ulps of the diagonal however small d gets: a pick whose gain is below
        PARITY_MARGIN (1e-5), including the stop at EPS, is decided by rounding."""
        L, keep = self._kernel(hidden, visual_mask, attention_mask)
        gap = torch.full((L.shape[0],), float("inf"), device=L.device)

        def pick(score, best):
            nonlocal gap
            if score.shape[-1] > 1:
                top = score.topk(2, dim=-1).values
                gap = torch.minimum(gap, torch.minimum(top[:, 0] - top[:, 1], best))
            return score.argmax(-1)

        greedy_map(L, keep, pick)
        return gap
