"""Prefill latency on ONNX Runtime, for the report: the emitted artifact's prefill graph against
the original model's, exported the same way (``emit.export_prefill``, same dynamic shapes, fused
when the artifact is: vlmopt.emit_fuse), on the same batch, interleaved rounds, medians (as
``compare.prefill_latency`` does in PyTorch).

Dynamic-resolution graphs (Qwen-VL, Idefics3) run at batch 1: the batch's first sample is timed.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

from torch import fx

log = logging.getLogger(__name__)


def first_sample(batch: dict, meta: dict | None = None) -> dict:
    """Sample 0 of a left-padded graph batch, alone and without its padding (``meta``: the
    graph's, for families whose tiles are concatenated over the batch)."""
    keep = batch["attention_mask"][0].bool()
    out = {"input_ids": batch["input_ids"][:1, keep],
           "attention_mask": batch["attention_mask"][:1, keep]}
    pos = batch["position_ids"]
    out["position_ids"] = pos[:, :1][..., keep] if pos.dim() == 3 else pos[:1, keep]
    if "image_grid_thw" in batch:
        grids = batch["image_grid_thw"]
        out["pixel_values"] = batch["pixel_values"][:int(grids[0].prod())]
        out["image_grid_thw"] = grids[:1]
    elif "pixel_attention_mask" in batch:  # tiles: sample 0's real ones (padding is all-zero)
        pix = batch["pixel_values"][:1]
        real = pix[0].flatten(1).ne(0).any(-1)
        out["pixel_values"] = pix[:, real]
        out["pixel_attention_mask"] = batch["pixel_attention_mask"][:1, real]
    elif meta and (meta.get("layout") or {}).get("kind") == "internvl":
        n = int((out["input_ids"] == meta["image_token_id"]).sum())
        out["pixel_values"] = batch["pixel_values"][:n // meta["layout"]["tokens_per_tile"]]
    else:
        out["pixel_values"] = batch["pixel_values"][:1]
    return out


def prefill_latency(artifact: Path, original: fx.GraphModule, chosen: fx.GraphModule,
                    batch: dict, repeats: int = 5, threads: int | None = None
                    ) -> dict[str, float]:
    """Median prefill seconds on ONNX Runtime (CPU) of the original graph and of the
    artifact at ``artifact`` (whose graph is ``chosen``), on ``batch`` (graph inputs)."""
    from vlmopt import emit, runtime

    if emit.dynamic(chosen):
        batch = first_sample(batch, chosen.meta["vlmopt"])
    art = runtime.Artifact(artifact, verify=False, threads=threads, spinning=False)
    with tempfile.TemporaryDirectory(prefix="vlmopt-ort-latency-") as tmp:
        path = Path(tmp) / "prefill.onnx"
        t0 = time.perf_counter()
        emit.export_prefill(original, batch, path)
        if (art.manifest.get("fusion") or {}).get("enabled"):  # NOTE: like against like
            from vlmopt.emit_fuse import fuse_graph

            fuse_graph(path)
        log.info("exported the original prefill graph for timing in %.1f s",
                 time.perf_counter() - t0)
        sessions = {"original": runtime.session(path, "cpu", threads, spinning=False),
                    "chosen": art.prefill}
        feeds = {}
        for name, gm in (("original", original), ("chosen", chosen)):
            f = {k: v.numpy() for k, v in emit.export_feeds(gm, batch).items()}
            wanted = [i.name for i in sessions[name].get_inputs()]
            feeds[name] = {k: f[k] for k in wanted}
        out = interleaved(sessions, feeds, repeats)
        del sessions
    return out


def interleaved(sessions: dict, feeds: dict, repeats: int) -> dict[str, float]:
    """Median seconds of ``sessions[name].run(None, feeds[name])``, the sessions taking turns
    in each of ``repeats`` rounds after one warm-up round, so machine noise hits them alike."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(1 + repeats):  # round 0 warms up
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[name])
            if r:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
