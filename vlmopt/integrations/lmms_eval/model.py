"""``lmms-eval --model vlmopt``: a vlmopt artifact or (optimized) block graph as an lmms-eval
model.

    --model_args artifact=OUT[,provider=cpu|cuda][,threads=N]   # ONNX Runtime (the artifact)
    --model_args model=DIR|builtin:NAME[,plan=plan.json]         # PyTorch block graph (CPU)

Common: ``image_at=start|end`` (where the image goes in a prompt that has no ``<image>``;
default ``start``, LLaVA's convention; a prompt with ``<image>`` is used as it is) and
``max_new_tokens`` (when the task gives none; default 16). Decoding is greedy, one image per
request; ``--batch_size N`` batches requests of the same generation settings (one at a time
on dynamic-resolution models). ``loglikelihood`` returns (mean negative log-likelihood per
continuation token, whether greedy decoding gives it), as lmms-eval's own models do. NOTE:
lmms-eval 0.7.3's evaluator turns loglikelihood results into strings
(``unwrap_generation_output``), so its loglikelihood and multiple_choice tasks fail there
whatever the model; the method itself is correct and tested.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from vlmopt.errors import VlmoptError
from vlmopt.integrations.lmms_eval.backends import ArtifactBackend, GraphBackend

log = logging.getLogger(__name__)
IMAGE = "<image>"
GREEDY_ONLY = {"do_sample": False, "temperature": 0, "num_beams": 1}
IGNORED_GEN_KWARGS = {"top_p", "top_k", "image_aspect_ratio"}  # no effect on greedy decoding


class VlmoptLMM(lmms):
    is_simple = True

    def __init__(self, artifact: str | None = None, model: str | None = None,
                 plan: str | None = None, provider: str | None = None,
                 threads: int | None = None, image_at: str = "start",
                 max_new_tokens: int = 16, batch_size: int | str = 1, device: str | None = None,
                 max_batch_size: int | None = None, **unknown) -> None:
        super().__init__()
        try:
            self._check_args(artifact, model, plan, provider, threads, image_at,
                             max_new_tokens, device, unknown)
            self.batch_size_per_call = _batch_size(batch_size)
            if artifact is not None:
                self.backend = ArtifactBackend(str(artifact), provider=provider or _ep(device),
                                               threads=threads)
            else:
                self.backend = GraphBackend(str(model), str(plan) if plan else None)
        except VlmoptError as e:  # NOTE: lmms-eval prints the message; make it name vlmopt
            raise VlmoptError(f"vlmopt: {e}") from None
        self.image_at, self.max_new_tokens = image_at, int(max_new_tokens)
        log.info("vlmopt model: %s", self.backend.name)

    @staticmethod
    def _check_args(artifact, model, plan, provider, threads, image_at, max_new_tokens,
                    device, unknown) -> None:
        if unknown:
            raise VlmoptError(f"unknown model_args {', '.join(sorted(unknown))} (known: "
                              "artifact, model, plan, provider, threads, image_at, "
                              "max_new_tokens)")
        if (artifact is None) == (model is None):
            raise VlmoptError("give exactly one of model_args artifact=OUT (an ONNX artifact) "
                              "or model=DIR (a checkpoint, optionally with plan=plan.json)")
        if artifact is not None:
            if plan is not None:
                raise VlmoptError("plan= goes with model=; an artifact already carries its plan")
            if not Path(str(artifact)).is_dir():
                raise VlmoptError(f"artifact={artifact}: no such artifact directory")
        else:
            if provider is not None or threads is not None:
                raise VlmoptError("provider= and threads= are ONNX Runtime settings: they go "
                                  "with artifact=")
            if device is not None and str(device) != "cpu":
                raise VlmoptError(f"--device {device}: the PyTorch graph (model=) runs on CPU; "
                                  "evaluate an artifact with provider=cuda for a GPU")
            if plan is not None and not Path(str(plan)).is_file():
                raise VlmoptError(f"plan={plan}: no such file")
        if image_at not in ("start", "end"):
            raise VlmoptError(f"image_at must be start or end, got {image_at!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise VlmoptError(f"max_new_tokens must be a positive integer, got "
                              f"{max_new_tokens!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise VlmoptError(f"threads must be a positive integer, got {threads!r}")

    # -- requests
    def _prompt(self, context: str, where: str) -> str:
        n = context.count(IMAGE)
        if n == 1:
            return context
        if n > 1:
            raise VlmoptError(f"vlmopt: {where}: the prompt holds {IMAGE} {n} times; vlmopt "
                              "models take one image")
        return f"{IMAGE}\n{context}" if self.image_at == "start" else f"{context}\n{IMAGE}"

    def _image(self, doc_to_visual, doc_id, task: str, split: str):
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) != 1 or not hasattr(visuals[0], "convert"):
            kinds = ", ".join(type(v).__name__ for v in visuals) or "none"
            raise VlmoptError(f"vlmopt: task {task} doc {doc_id}: vlmopt models take exactly "
                              f"one image per request, got {len(visuals)} ({kinds})")
        return visuals[0].convert("RGB")

    def _settings(self, gen_kwargs: dict, task: str) -> tuple[int, tuple[str, ...]]:
        kw = dict(gen_kwargs or {})
        for k, greedy in GREEDY_ONLY.items():
            v = kw.pop(k, greedy)
            if v is not None and v != greedy:
                raise VlmoptError(f"vlmopt: task {task} asks for {k}={v}; vlmopt decodes "
                                  "greedily only")
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = kw.pop("max_new_tokens", None) or self.max_new_tokens
        for k in sorted(set(kw) - IGNORED_GEN_KWARGS):
            log.warning("task %s: generation setting %s=%r is not used by vlmopt", task, k,
                        kw[k])
        return int(max_new), tuple(s for s in until if s)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            _, gen_kwargs, _, _, task, _ = r.args
            groups[self._settings(gen_kwargs, task)].append(i)
        size = 1 if self.backend.one_per_call else self.batch_size_per_call
        out: list[str | None] = [None] * len(requests)
        for (max_new, until), idx in groups.items():
            for s in range(0, len(idx), size):
                chunk = idx[s:s + size]
                prompts, images = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    prompts.append(self._prompt(context, f"task {task} doc {doc_id}"))
                    images.append(self._image(doc_to_visual, doc_id, task, split))
                texts = self.backend.generate(prompts, images, max_new)
                for i, text in zip(chunk, texts):
                    for stop in until:  # the task's stop strings end the answer
                        text = text.split(stop, 1)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        res = []
        for r in requests:
            context, target, doc_to_visual, doc_id, task, split = r.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            prompt = self._prompt(context, f"task {task} doc {doc_id}")
            res.append(self.backend.loglikelihood(
                prompt, self._image(doc_to_visual, doc_id, task, split), continuation))
        return res

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vlmopt: multi-round generation is not supported; the vlmopt "
                                  "model runs generate_until and loglikelihood tasks")


def _batch_size(v) -> int:
    s = str(v)
    if not s.isdigit() or int(s) < 1:
        raise VlmoptError(f"--batch_size {v}: vlmopt takes a positive integer (no 'auto')")
    return int(s)


def _ep(device: str | None) -> str:
    """ONNX Runtime provider for lmms-eval's --device: cuda* -> cuda, else cpu."""
    return "cuda" if device and str(device).startswith("cuda") else "cpu"
