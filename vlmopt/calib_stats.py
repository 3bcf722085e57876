"""Calibration statistics for weight compression: the second moment of each decoder layer's
normed input, G_l = E[x x^T] over calibration tokens, x = input_layernorm(hidden) [D] - the
input of that layer's q/k/v projections (what whitened SVD needs, shared/methods.md 8.2).

Statistics are a function of (checkpoint, calibration records) only: they are taken on the
ORIGINAL model (every visual and text token, padding excluded), never on a rewritten graph, so
one set serves every plan a search tries. They are cached on disk under
``$VLMOPT_CACHE/cov/<fingerprint>-<data hash>-v2.safetensors`` (and in memory).

``covariances_for_graph`` is what a pass calls: a graph captured from a loaded model carries its
source (``gm.meta["vlmopt"]["source"]``: path, name, fingerprint), so a pass config that names
only a calibration set (``calib``, ``calib_samples``) rebuilds the same statistics on a fresh
machine: the plan alone reproduces the result.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import fx

from vlmopt import inputs
from vlmopt.data.dataset import Record, cache_dir, load_records
from vlmopt.evaluation import record_batches
from vlmopt.ir.capture import capture, complete_inputs

log = logging.getLogger(__name__)

_MEMORY: dict[str, dict[str, torch.Tensor]] = {}  # key -> covariances; a few entries at most


def _data_key(records: list[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.image}\x00{r.prompt}\n".encode())
    return h.hexdigest()[:16]


class _Collect(fx.Interpreter):
    """Accumulates sum x x^T and the token count at every decoder node's normed input: over
    all real tokens ("layer_i") and per modality ("layer_i.visual", "layer_i.text")."""

    def __init__(self, gm, gram, count):
        super().__init__(gm)
        self.gram, self.count = gram, count

    def call_module(self, target, args, kwargs):
        mod = self.module.get_submodule(target)
        if getattr(mod, "is_decoder_block", False):
            hidden, visual, amask = args[0], args[4], args[5]  # [B, T, D], [B, T], [B, T]
            real = amask.bool()
            normed = mod.layer.input_layernorm(hidden).double()
            name = f"layer_{mod.index}"
            for key, sel in ((name, real), (f"{name}.visual", real & visual),
                             (f"{name}.text", real & ~visual)):
                x = normed[sel]  # [N, D]
                if key not in self.gram:
                    self.gram[key] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64)
                    self.count[key] = 0
                self.gram[key] += x.T @ x
                self.count[key] += x.shape[0]
        return super().call_module(target, args, kwargs)


@torch.no_grad()
def input_covariances(lm, records: list[Record], *, batch_size: int = 8,
                      processor=None) -> dict[str, torch.Tensor]:
    """{"layer_i": E[x x^T] [D, D] float32} of each decoder layer's normed input over every
    real token of ``records``, and the same over its visual tokens ("layer_i.visual") and its
    text tokens ("layer_i.text"; a modality with no tokens is left out).
    ``lm``: a LoadedModel, or a captured graph with ``processor``."""
    if isinstance(lm, fx.GraphModule):
        gm, proc = lm, processor
    else:
        gm, proc = capture(lm), processor or lm.processor
    gram: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    names = gm.meta["vlmopt"]["inputs"]
    for chunk in record_batches(records, batch_size, proc):
        batch = complete_inputs(inputs.encode(proc, [r.prompt for r in chunk],
                                              [r.load_image() for r in chunk]))
        _Collect(gm, gram, count).run(*(batch[k] for k in names))
    return {k: (g / count[k]).float() for k, g in gram.items() if count[k]}


WEIGHTINGS = ("modality", "token")


def whitening_covariance(covs: dict[str, torch.Tensor], layer: str,
                         weighting: str = "modality") -> torch.Tensor:
    """The second moment that whitens ``layer``'s q/k weights.

    "token": E[x x^T] over every calibration token (SVD-LLM / CASP as published), which on a
    VLM is ~95% visual tokens (196 per image against ~14 text tokens here), so the truncation
    spends its rank on the visual directions and the text tokens' queries - the question and
    the answer position - pay for it. "modality": 0.5 E_visual[x x^T] + 0.5 E_text[x x^T],
    each modality weighted equally whatever its token count (falls back to the one present).
    On the built-in model, Q/K at 25% of their parameters: "token" loses 1.9 points of
    held-out accuracy, "modality" 0.3 (examples/bench_compress.py).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if weighting == "token":
        return covs[layer]
    parts = [covs[k] for k in (f"{layer}.visual", f"{layer}.text") if k in covs]
    return sum(parts) / len(parts)


_VERSION = "v2"  # v2: per-modality statistics beside the all-token ones


def _key(fingerprint: str, records: list[Record]) -> str:
    return f"{fingerprint.split(':')[-1]}-{_data_key(records)}-{_VERSION}"


def _lookup(key: str) -> dict[str, torch.Tensor] | None:
    if key not in _MEMORY:
        path = cache_dir() / "cov" / f"{key}.safetensors"
        if not path.exists():
            return None
        from safetensors.torch import load_file

        _remember(key, load_file(str(path)))
    return _MEMORY[key]


def _remember(key: str, covs: dict[str, torch.Tensor]) -> None:
    while len(_MEMORY) >= 2:  # a 7B model's set is ~2 GB: keep few
        _MEMORY.pop(next(iter(_MEMORY)))
    _MEMORY[key] = covs


def cached_covariances(lm, records: list[Record], *, use_cache: bool = True
                       ) -> dict[str, torch.Tensor]:
    """``input_covariances`` of a LoadedModel, cached per (model fingerprint, records)."""
    from safetensors.torch import save_file

    key = _key(lm.fingerprint, records)
    if use_cache and (hit := _lookup(key)) is not None:
        return hit
    log.info("calibration covariances of %s on %d samples", lm.name, len(records))
    covs = input_covariances(lm, records)
    path = cache_dir() / "cov" / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(covs, str(tmp), metadata={"model": lm.name, "n": str(len(records))})
    tmp.replace(path)
    _remember(key, covs)
    return covs


def covariances_for_graph(gm: fx.GraphModule, calib: str, n_samples: int,
                          who: str = "calibration") -> dict[str, torch.Tensor]:
    """The covariances of the model ``gm`` was captured from, on the first ``n_samples``
    records of ``calib`` (a dataset path or builtin name). A ValueError when ``gm`` does not
    know its source (captured from a bare nn.Module) or the model has no processor."""
    from vlmopt.frontend.load import load

    src = gm.meta["vlmopt"].get("source")
    if not src:
        raise ValueError(f"{who}: this graph does not know its checkpoint (captured from a bare "
                         "nn.Module), so calibration statistics cannot be computed; capture a "
                         "model loaded with vlmopt.load(), or turn whitening off")
    records = load_records(calib, limit=n_samples)
    hit = _lookup(_key(src["fingerprint"], records))
    if hit is not None:
        return hit
    lm = load(src["path"])
    if lm.fingerprint != src["fingerprint"]:
        raise ValueError(f"{who}: {src['path']} changed since it was captured (fingerprint "
                         f"{lm.fingerprint} != {src['fingerprint']})")
    if lm.processor is None:
        raise ValueError(f"{who}: {src['path']} has no processor files to encode {calib}")
    return cached_covariances(lm, records)

