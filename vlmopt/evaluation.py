"""Evaluation: accuracy (overall and per type), agreement with and KL from a reference model.

A *runner* is any callable ``runner(batch) -> logits [B, V]`` of the last prompt position; the
answer is the greedy first token, compared with the first token of the reference answer (exact
for single-word answers on word-level tokenizers, the SynthVQA case).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from vlmopt import inputs
from vlmopt.data.dataset import Record

log = logging.getLogger(__name__)
Runner = Callable[[dict], torch.Tensor]


def hf_runner(model) -> Runner:
    """Runner over a transformers LLaVA model (its own forward, SDPA attention)."""

    @torch.no_grad()
    def run(batch: dict) -> torch.Tensor:
        out = model(**batch, logits_to_keep=1)
        return out.logits[:, -1].float()

    return run


@dataclass
class EvalResult:
    n: int
    accuracy: float | None
    per_type: dict[str, float]
    majority_per_type: dict[str, float]
    agreement: float
    kl: float
    samples_per_s: float
    reference: str
    predictions: list[str] = field(repr=False, default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("predictions")
        return d


def answer_token(tokenizer, answer: str) -> int:
    """Id of the first token of ``answer`` as the model would generate it after the prompt."""
    ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    return ids[0] if ids else -1


def batches(records: list[Record], batch_size: int, processor) -> list[list[int]]:
    """Record indices in batches. A dynamic-resolution processor (Qwen-VL) gets batches of one
    image size each: token passes keep a number of visual tokens that follows the image's, and
    a batch must stay rectangular. Otherwise consecutive records, as they come."""
    order = list(range(len(records)))
    if not getattr(processor, "dynamic_resolution", False):
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[image_size(r)].append(i)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def record_batches(records: list[Record], batch_size: int, processor) -> list[list[Record]]:
    """The records in ``batches`` order, one list a batch."""
    return [[records[i] for i in idx] for idx in batches(records, batch_size, processor)]


def image_size(r: Record) -> tuple[int, int]:
    """(width, height) from the image header only."""
    from PIL import Image

    try:
        with Image.open(r.image) as im:
            return im.size
    except OSError:
        return r.load_image().size  # raises the record's own error line


@torch.no_grad()
def evaluate(runner: Runner, records: list[Record], processor, *,
             reference: Runner | None = None, batch_size: int = 16,
             blank_image: bool = False, progress: Callable | None = None) -> EvalResult:
    """Run ``runner`` over ``records``; compare with ``reference`` (same inputs, real images).

    With ``reference=None`` the runner is its own reference (agreement 1, KL 0 by definition).
    ``blank_image`` feeds a flat grey image to the runner (the reference still sees the image).
    """
    tok = processor.tokenizer
    preds: list[str] = [""] * len(records)
    agree, kls = [], []
    hits: dict[str, list[bool]] = defaultdict(list)
    answers: dict[str, list[str]] = defaultdict(list)
    elapsed = 0.0
    for idx in batches(records, batch_size, processor):
        chunk = [records[i] for i in idx]
        images = [r.load_image() for r in chunk]
        prompts = [r.prompt for r in chunk]
        batch = inputs.encode(processor, prompts,
                              [inputs.blank_like(im) for im in images] if blank_image else images)
        t0 = time.perf_counter()
        logits = runner(batch)  # [B, V]
        elapsed += time.perf_counter() - t0
        ref = logits
        if reference is not None:
            ref_batch = inputs.encode(processor, prompts, images) if blank_image else batch
            ref = reference(ref_batch)
        logp, ref_logp = F.log_softmax(logits, -1), F.log_softmax(ref, -1)
        kls += (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0).tolist()  # KL(ref||run)
        agree += (logits.argmax(-1) == ref.argmax(-1)).tolist()
        for i, r, tid in zip(idx, chunk, logits.argmax(-1).tolist()):
            preds[i] = tok.decode([tid]).strip()
            if r.answer is not None:
                t = r.type or "all"
                hits[t].append(tid == answer_token(tok, r.answer))
                answers[t].append(r.answer.strip().lower())
        if progress:
            progress(len(chunk))
    n_lab = sum(len(v) for v in hits.values())
    majority = {t: max(a.count(x) for x in set(a)) / len(a) for t, a in answers.items()}
    return EvalResult(
        n=len(records),
        accuracy=sum(sum(v) for v in hits.values()) / n_lab if n_lab else None,
        per_type={t: sum(v) / len(v) for t, v in sorted(hits.items())},
        majority_per_type=dict(sorted(majority.items())),
        agreement=sum(agree) / len(agree),
        kl=sum(kls) / len(kls),
        samples_per_s=len(records) / elapsed if elapsed else float("nan"),
        reference="self" if reference is None else "original",
        predictions=preds,
    )


def mean_text_tokens(lm, records, batch_size: int) -> int:
    """Mean text tokens per prompt (padding of its batch included, as the evaluators encode
    them), from the processor alone (no forward): the ``n_text`` of FLOPs ratios."""
    from vlmopt import inputs

    image_id = lm.model.config.image_token_id
    total = 0
    for chunk in record_batches(records, batch_size, lm.processor):
        ids = inputs.encode(lm.processor, [r.prompt for r in chunk],
                            [r.load_image() for r in chunk])["input_ids"]
        total += int((ids != image_id).sum())
    return round(total / max(1, len(records)))
