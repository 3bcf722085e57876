"""The two ways the lmms-eval model runs a vlmopt model, both greedy and both vlmopt's own code:

- :class:`ArtifactBackend`: an emitted artifact on ONNX Runtime (``vlmopt.runtime``, what
  ``vlmopt run`` and ``vlmopt eval OUT`` run), with the artifact's own preprocessing;
- :class:`GraphBackend`: a checkpoint's block graph, optimized by a plan or not, in PyTorch
  (``vlmopt.emit.torch_generate``: the prefill and decode forms that the artifact is exported
  from and checked against), with the checkpoint's processor (``vlmopt.inputs``).

Each offers ``generate(prompts, images, max_new_tokens) -> texts`` and
``loglikelihood(prompt, image, continuation) -> (mean NLL, is greedy)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vlmopt.errors import VlmoptError

log = logging.getLogger(__name__)


def _np(x) -> np.ndarray:
    """float64 numpy view of a logits row (ONNX Runtime gives numpy, PyTorch tensors)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def teacher_forced(out, cont: list[int], step: Callable) -> tuple[float, bool]:
    """(mean negative log-likelihood per token of ``cont`` after the prompt, whether greedy
    decoding would give ``cont``): lmms-eval's loglikelihood convention (its own models return
    the loss, and its multiple_choice scoring takes the argmin).

    ``out`` is a prefill's outputs for one prompt (logits [1, V], next position, per-layer
    K/V); ``step(token [1, 1] int64, position, past)`` runs one decode step and returns the
    same kind of outputs. The continuation is fed back token by token (teacher forcing)."""
    total, greedy = 0.0, True
    for i, c in enumerate(cont):
        logits = _np(out[0])[0]  # [V]
        m = logits.max()
        total -= float(logits[c] - m - np.log(np.exp(logits - m).sum()))  # -log p(c | ...)
        greedy = greedy and int(logits.argmax()) == c
        if i + 1 < len(cont):
            out = step(np.array([[c]], dtype=np.int64), out[1], list(out[2:]))
    return (total / len(cont) if cont else 0.0), greedy


class ArtifactBackend:
    """An artifact written by ``vlmopt apply`` / ``vlmopt optimize``, on ONNX Runtime."""

    def __init__(self, root: str | Path, provider: str = "cpu", threads: int | None = None):
        from vlmopt import runtime

        self.art = runtime.Artifact(root, provider=provider, threads=threads)
        self.pre = runtime.preprocessor(self.art)
        self.name = f"artifact {root} ({self.art.manifest['model']['name']})"
        self.one_per_call = self.art.dynamic  # Qwen-VL graphs run at batch 1

    def generate(self, prompts: list[str], images: list, max_new_tokens: int) -> list[str]:
        return self.art.generate(self.pre, prompts, images, max_new_tokens=max_new_tokens)

    def loglikelihood(self, prompt: str, image, continuation: str) -> tuple[float, bool]:
        cont = self.pre.tokenizer.encode(continuation, add_special_tokens=False).ids
        out = self.art.run_prefill(self.pre.encode([prompt], [image]))
        return teacher_forced(out, cont, self.art.step)


class GraphBackend:
    """A checkpoint (or ``builtin:...``) as vlmopt's block graph in PyTorch, with the passes of
    ``plan`` applied (verified) when one is given. Runs on CPU."""

    def __init__(self, model: str, plan: str | None = None):
        from vlmopt.api import apply_plan, capture, load

        self.lm = load(model)
        if self.lm.processor is None:
            raise VlmoptError(f"model={model}: the checkpoint has no processor files; "
                              "evaluation needs them")
        self.processor = self.lm.processor
        self.gm = apply_plan(self.lm, plan) if plan else capture(self.lm)
        eos = self.lm.model.generation_config.eos_token_id
        self.eos = (eos[0] if eos else None) if isinstance(eos, list) else eos
        self.name = f"{model}" + (f" with plan {plan}" if plan else "")
        self.one_per_call = getattr(self.processor, "dynamic_resolution", False)

    def _feeds(self, prompts: list[str], images: list) -> dict:
        from vlmopt import inputs
        from vlmopt.emit import export_feeds
        from vlmopt.ir.capture import complete_inputs

        return export_feeds(self.gm, complete_inputs(inputs.encode(self.processor, prompts,
                                                                   images)))

    def generate(self, prompts: list[str], images: list, max_new_tokens: int) -> list[str]:
        from vlmopt.emit import torch_generate

        toks, _ = torch_generate(self.gm, self._feeds(prompts, images), max_new_tokens,
                                 self.eos)
        texts = []
        for row in toks.tolist():  # finished rows repeat their EOS: cut at the first
            if self.eos in row:
                row = row[:row.index(self.eos)]
            texts.append(self.processor.tokenizer.decode(row, skip_special_tokens=True)
                         .strip())
        return texts

    def loglikelihood(self, prompt: str, image, continuation: str) -> tuple[float, bool]:
        import torch

        from vlmopt.export_graph import DecodeForm, PrefillForm

        cont = self.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        pf, df = PrefillForm(self.gm).eval(), DecodeForm(self.gm).eval()
        with torch.no_grad():
            return teacher_forced(pf(**self._feeds([prompt], [image])), cont,
                                  lambda tok, pos, past: df(torch.from_numpy(tok), pos, past))
