"""Calibration statistics: Layer Contribution (ShortV, shared/methods.md section 7.1).

LC(l) = KL(p_l || p): how much the answer distribution moves when, in layer l alone, visual
tokens get no update (p_l) versus the original model (p). This is the released code's
convention (KLDivLoss(log p, p_l), the modified distribution as the target), averaged over
calibration samples. Low LC = a layer whose visual update barely matters: a ShortV candidate.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx

from vlmopt import inputs
from vlmopt.data.dataset import Record, cache_dir
from vlmopt.evaluation import record_batches
from vlmopt.ir.capture import capture, complete_inputs, decoder_nodes
from vlmopt.pipeline import make_config, run_passes

log = logging.getLogger(__name__)


def _data_key(records: list[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.image}\x00{r.prompt}\n".encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def layer_contribution(lm, records: list[Record], *, batch_size: int = 16,
                       use_cache: bool = True, progress: Callable | None = None) -> list[float]:
    """LC per decoder layer (index = layer), cached per (model fingerprint, data)."""
    path = cache_dir() / "lc" / f"{lm.fingerprint.split(':')[-1]}-{_data_key(records)}.json"
    if use_cache and path.exists():
        return json.loads(path.read_text())["lc"]
    base = capture(lm)
    n_layers = len(decoder_nodes(base))
    frozen = [run_passes(base, [("freeze_visual",
                                 make_config("freeze_visual", {"layers": [f"layer_{i}"]}))],
                         verify=False)[0] for i in range(n_layers)]
    totals = [0.0] * n_layers
    for chunk in record_batches(records, batch_size, lm.processor):
        batch = complete_inputs(inputs.encode(lm.processor, [r.prompt for r in chunk],
                                              [r.load_image() for r in chunk]))
        logp = F.log_softmax(base(**batch).float(), -1)  # [B, V]
        for i, g in enumerate(frozen):
            logq = F.log_softmax(g(**batch).float(), -1)
            totals[i] += (logq.exp() * (logq - logp)).sum(-1).clamp(min=0).sum().item()
        if progress:
            progress(len(chunk))
    lc = [t / len(records) for t in totals]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": lm.name, "n": len(records), "lc": lc}))
    tmp.replace(path)
    return lc


def rank_layers(lc: list[float]) -> list[str]:
    """Layer names from least to most visual contribution (ShortV's replacement order)."""
    return [f"layer_{i}" for i in sorted(range(len(lc)), key=lambda i: lc[i])]


@torch.no_grad()
def quantization_sensitivity(gm: fx.GraphModule, batch: dict, *, bits: int = 4,
                             group_size: int = 64) -> dict[str, float]:
    """{"layer_i": KL(p_i || p)}: how far the answer distribution p of ``gm`` moves when decoder
    layer i alone is quantized to ``bits`` - the per-layer sensitivity that
    ``vlmopt.passes.quantize.allocate_bits`` takes. ``batch``: encoded calibration inputs."""
    batch = complete_inputs(batch)
    ref = F.log_softmax(gm(**batch).float(), -1)  # [B, V]
    out = {}
    for i in range(gm.meta["vlmopt"]["n_layers"]):
        conf = make_config("quantize", {"bits": {f"layer_{i}": bits}, "group_size": group_size})
        q, _ = run_passes(gm, [("quantize", conf)], verify=False)
        logq = F.log_softmax(q(**batch).float(), -1)
        out[f"layer_{i}"] = (logq.exp() * (logq - ref)).sum(-1).mean().clamp(min=0).item()
    return out
