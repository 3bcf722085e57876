"""Published figures of the methods, as their papers state them (cited in shared/methods.md), for
the method table's "published" column beside vlmopt's own measurements. Nothing here is a
vlmopt result: each entry is the paper's model, setting and figure, with its source, and is
shown as such. Keys are method names as the table writes them (budgets stripped), matched by
prefix."""

from __future__ import annotations

PUBLISHED: dict[str, list[tuple[str, str]]] = {  # method -> [(figure, source)]
    "FastV": [("LLaVA-1.5-7B: 90.6% of the original at 192 tokens, 73.7% at 64",
               "PyramidDrop's comparison tables; methods.md 2.5")],
    "PyramidDrop": [("LLaVA-1.5-7B: 96.8% at 1.78 of 3.82 TFLOPs; 87.6% at 64 tokens",
                     "PyramidDrop paper; methods.md 5.4")],
    "MMTok": [("LLaVA-1.5-7B: 87.7% with 4 vision tokens", "MMTok abstract; methods.md 6")],
    "DivPrune": [("LLaVA-1.5-7B at ~84% TFLOP cut (~90% tokens pruned): POPE F1 +0.18, COCO "
                  "CIDEr -12.7%", "DivPrune paper; methods.md 4.3")],
    "SparseVLM": [("LLaVA: -54% FLOPs at 97% accuracy (ICML version)",
                   "SparseVLM abstract; methods.md 6")],
    "CDPruner": [("LLaVA: -95% FLOPs at 94% accuracy", "CDPruner abstract; methods.md 6")],
}


def published(name: str) -> str:
    """The published figures for a table row's method ("" when the paper reports none on
    LLaVA-1.5)."""
    for key, figs in PUBLISHED.items():
        if name == key or name.startswith(key + " ") or name.startswith(key + ","):
            return "; ".join(f"{fig} ({src})" for fig, src in figs)
    return ""
