"""Published methods at the same FLOPs as the searched plan: each method's one free knob (how
many tokens it keeps) is set to the largest value that fits the target, so every row of the
report's comparison spends (at most) the same budget.

PyramidDrop, VisionZip and DivPrune come twice where the model has 1-row positions: as their
official code runs them (positions renumbered 0.. after the cut; the plain name) and as vlmopt's
variant that keeps each token's original position id (", original positions"). VisionZip also
comes with LightCompress's counting (", patches only": CLS is no LLM token) beside the official
one (CLS counted among the dominant tokens; dvlab-research/VisionZip at 3151f6d), and on a
CLS-free tower (SigLIP) as its received-attention variant only. FastV's official
code keeps the original ids. M-RoPE models (Qwen-VL), which the official codes do not cover and
whose positions encode the image grid, get one row each, with the original positions."""

from __future__ import annotations

import math

from vlmopt.search.space import Candidate, Space, snap


def at_target(space: Space, target: float, scope: str) -> list[tuple[str, Candidate | None]]:
    """(name, candidate) per baseline; candidate None when the method cannot reach the target
    (e.g. FastV keeps every token in its first K layers)."""
    N, L = space.n_visual, space.n_layers
    out: list[tuple[str, Candidate | None]] = []
    one_row = space.lm.adapter.position_rows == 1

    def both(name: str) -> list[tuple[str, str]]:
        """(row name, positions): the official convention and vlmopt's variant."""
        if not one_row:
            return [(name, "original")]
        return [(name, "contiguous"), (f"{name}, original positions", "original")]

    official = both("")[0][1]  # the positions the official code uses on this model

    # FastV: keep everything for K layers (K=2 by default), then c tokens; K=1 if K=2 cannot fit
    for K in sorted({min(2, L - 1), 1}, reverse=True):
        def fastv(c, K=K):
            return Candidate(tuple([N] * K + [int(c)] * (L - K)))

        c = space.fit(fastv, 0, N, target, scope, integer=True)
        if c is not None or K == 1:
            out.append((f"FastV K={K}", None if c is None else fastv(c)))
            break

    # PyramidDrop: stages at 1/4, 1/2, 3/4 depth (8/16/24 of 32), N * lambda^stage; with the
    # first stage moved to layer 1 if the default cannot fit
    default = sorted({min(L - 1, max(1, round(L * f))) for f in (0.25, 0.5, 0.75)})
    for stages in (default, sorted({1, *default[1:]})):
        def pdrop(lam, stages=stages, positions=official):
            counts, s = [], 0
            for layer in range(L):
                s += layer in stages
                counts.append(int(N * lam ** s))
            return Candidate(snap(counts, N, "none"), score_at="next", positions=positions)

        lam = space.fit(pdrop, 0.0, 1.0, target, scope)
        if lam is not None or stages[0] == 1:
            name = "PyramidDrop" if stages == default else "PyramidDrop (stage 1 at layer 1)"
            for row, positions in both(name):
                out.append((row, None if lam is None else pdrop(lam, positions=positions)))
            break

    for name, method in (("VisionZip", "visionzip"), ("DivPrune", "divprune"),
                         ("random", "random"), ("downsampling", "pool")):
        if space.dynamic and method in ("visionzip", "pool"):
            continue  # they need a fixed grid for the contextual merge / pooling

        def select(c, method=method, positions="original", cls="patches"):
            return Candidate(snap([int(c)] * L, N, method), method, positions=positions, cls=cls)

        rows = [(r, p, "patches") for r, p in both(name)] if method == "divprune" else \
            [(name, "original", "patches")]
        if method == "visionzip":
            rows = _visionzip_rows(space, both)
        if method == "pool":
            g = space.fit(lambda x: select(x * x), 1, math.isqrt(N), target, scope, integer=True)
            out.append((name, None if g is None else select(g * g)))
            continue
        fitted: dict = {}  # one fit per CLS counting (its merge FLOPs differ by one token)
        for row, positions, cls in rows:
            if cls not in fitted:
                fitted[cls] = space.fit(lambda x, p=positions, k=cls: select(x, positions=p,
                                                                             cls=k),
                                        1, N, target, scope, integer=True)
            c = fitted[cls]
            out.append((row, None if c is None else select(c, positions=positions, cls=cls)))
    return out


def _visionzip_rows(space: Space, both) -> list[tuple[str, str, str]]:
    """(row, positions, cls) of VisionZip: on a tower with a [CLS] the LLM does not read, the
    official code's counting (CLS among the dominant tokens, its order, contiguous positions;
    the plain name), LightCompress's (patches only) and vlmopt's original positions; on a
    CLS-free tower the received-attention variant (the plan's ``score``: "received")."""
    if not space.has_cls:
        return [(r, p, "patches") for r, p in both("VisionZip (received attention)")]
    rows = [(r, p, "patches") for r, p in both("VisionZip")]
    if rows[0][1] == "contiguous":
        rows = [("VisionZip", "contiguous", "official"),
                ("VisionZip, patches only (LightCompress)", "contiguous", "patches"), *rows[1:]]
    return rows
