"""Fidelity of candidate plans on a calibration set, with evaluations cached by plan hash and
node outputs cached by *what computed them*, so layers whose inputs did not change are not
recomputed.

Every node of a block graph gets a signature: its module's key (class, static fields, the
identity of shared Hugging Face submodules and of any new parameters) and its inputs'
signatures. Two candidates that agree up to layer k (same selection, same drops before k) give
layer k's input the same signature, so its value comes from the cache. The key of a module is
conservative: anything that is not a plain number, string or list of them is keyed by identity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from vlmopt import inputs
from vlmopt.data.dataset import Record
from vlmopt.evaluation import answer_token, record_batches
from vlmopt.ir.capture import capture, complete_inputs
from vlmopt.pipeline import make_config, run_passes

log = logging.getLogger(__name__)

_SIMPLE = (int, float, str, bool, type(None))


@dataclass(frozen=True)
class Metrics:
    """Fidelity of one plan on the calibration set (against the original model)."""

    accuracy: float | None  # None when the calibration set has no answers
    agreement: float  # top-1 answer equal to the original model's
    kl: float  # mean KL(original || candidate) of the answer distribution

    @property
    def fidelity(self) -> float:
        """The objective: accuracy where answers exist, otherwise agreement."""
        return self.accuracy if self.accuracy is not None else self.agreement

    @property
    def score(self) -> float:
        """fidelity, ties broken by KL (a KL of 1 nat is worth 0.01 of fidelity)."""
        return self.fidelity - 0.01 * self.kl

    def to_json(self) -> dict:
        return {**asdict(self), "fidelity": self.fidelity}


def plan_hash(steps: list[tuple[str, dict]]) -> str:
    """Stable hash of a list of (pass name, JSON config fields)."""
    blob = json.dumps([[n, f] for n, f in steps], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _LRU:
    """Node outputs by (batch, signature), evicted least-recently-used beyond ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.data = max_bytes, 0, OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def _size(v) -> int:
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        if isinstance(v, (tuple, list)):
            return sum(_LRU._size(x) for x in v)
        return 0

    def get(self, key):
        if key in self.data:
            self.data.move_to_end(key)
            self.hits += 1
            return self.data[key]
        self.misses += 1
        return None

    def put(self, key, value) -> None:
        size = self._size(value)
        if size > self.max_bytes:
            return
        self.data[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, s) = self.data.popitem(last=False)
            self.bytes -= s


class Evaluator:
    """Evaluates plans (lists of (pass, fields)) on pre-encoded calibration batches."""

    def __init__(self, lm, records: list[Record], *, batch_size: int = 32,
                 cache_bytes: int = 3 << 30):
        self.lm = lm
        chunks = record_batches(records, batch_size, lm.processor)  # one image size a batch
        records = [r for c in chunks for r in c]
        self.records = records
        self.base = capture(lm)
        self._hf_ids = {id(m) for m in lm.model.modules()}
        self._pinned: dict[int, object] = {}  # keyed by id() -> kept alive, ids never reused
        self.cache = _LRU(cache_bytes)
        self.results: dict[str, Metrics] = {}  # plan hash -> metrics
        self.n_evaluated = 0
        self.seconds = 0.0
        tok = lm.processor.tokenizer
        self.batches = []
        for chunk in chunks:
            self.batches.append(complete_inputs(inputs.encode(
                lm.processor, [r.prompt for r in chunk], [r.load_image() for r in chunk])))
        self.answers = [answer_token(tok, r.answer) if r.answer is not None else None
                        for r in records]
        self.labelled = all(a is not None for a in self.answers) and bool(records)
        self.ref_logp = [F.log_softmax(x, -1) for x in self._run(self.base)]
        self.n_text = int(sum(int((~(b["input_ids"] == lm.model.config.image_token_id))
                                  .sum()) for b in self.batches) / max(1, len(records)))

    # ------------------------------------------------------------------ signatures

    def _module_key(self, m: nn.Module) -> tuple:
        if id(m) in self._hf_ids:
            return ("hf", id(m))
        parts: list = [type(m).__qualname__]
        for name, v in sorted(vars(m).items()):
            if name.startswith("_") or name == "training":
                continue
            if isinstance(v, _SIMPLE):
                parts.append((name, v))
            elif isinstance(v, (list, tuple)) and all(isinstance(x, _SIMPLE) for x in v):
                parts.append((name, tuple(v)))
            else:
                parts.append((name, "id", self._pin(v)))
        parts += [(n, self._module_key(c)) for n, c in m._modules.items() if c is not None]
        parts += [(n, "p", self._pin(p)) for n, p in m._parameters.items()]
        parts += [(n, "b", self._pin(b)) for n, b in m._buffers.items()]
        return tuple(parts)

    def _pin(self, obj) -> int:
        self._pinned.setdefault(id(obj), obj)
        return id(obj)

    def _signatures(self, gm: fx.GraphModule) -> dict[fx.Node, int]:
        sig: dict[fx.Node, int] = {}

        def arg_sig(a):
            if isinstance(a, fx.Node):
                return ("n", sig[a])
            if isinstance(a, (tuple, list)):
                return tuple(arg_sig(x) for x in a)
            return ("c", a if isinstance(a, _SIMPLE) else id(a))

        for n in gm.graph.nodes:
            if n.op == "placeholder":
                sig[n] = hash(("in", n.target))
            elif n.op == "call_module":
                sig[n] = hash((self._module_key(gm.get_submodule(n.target)),
                               arg_sig(n.args), arg_sig(tuple(sorted(n.kwargs.items())))))
            else:
                sig[n] = hash((n.op, str(n.target), arg_sig(n.args)))
        return sig

    @torch.no_grad()
    def _run(self, gm: fx.GraphModule) -> list[torch.Tensor]:
        sig = self._signatures(gm)
        cache = self.cache
        outs = []

        class _Cached(fx.Interpreter):
            def run_node(self, n):
                if n.op != "call_module":
                    return super().run_node(n)
                key = (self.batch_index, sig[n])
                hit = cache.get(key)
                if hit is not None:
                    return hit[0]
                val = super().run_node(n)
                cache.put(key, val)
                return val

        interp = _Cached(gm)
        for i, b in enumerate(self.batches):
            interp.batch_index = i
            outs.append(interp.run(*(b[k] for k in gm.meta["vlmopt"]["inputs"])).float())
        return outs

    # ------------------------------------------------------------------ evaluation

    def build(self, steps: list[tuple[str, dict]], *, verify: bool = False) -> fx.GraphModule:
        if not steps:
            return self.base
        return run_passes(self.base, [(n, make_config(n, f)) for n, f in steps],
                          verify=verify)[0]

    def evaluate(self, steps: list[tuple[str, dict]]) -> Metrics:
        key = plan_hash(steps)
        if key in self.results:
            return self.results[key]
        t0 = time.perf_counter()
        logits = self._run(self.build(steps))
        hits, agree, kls = [], [], []
        j = 0
        for lg, ref in zip(logits, self.ref_logp):
            logp = F.log_softmax(lg, -1)
            pred = logp.argmax(-1)
            agree += (pred == ref.argmax(-1)).tolist()
            kls += (ref.exp() * (ref - logp)).sum(-1).clamp(min=0).tolist()
            for p in pred.tolist():
                if self.answers[j] is not None:
                    hits.append(p == self.answers[j])
                j += 1
        m = Metrics(accuracy=sum(hits) / len(hits) if self.labelled else None,
                    agreement=sum(agree) / len(agree), kl=sum(kls) / len(kls))
        self.results[key] = m
        self.n_evaluated += 1
        self.seconds += time.perf_counter() - t0
        log.debug("evaluated %s in %.2fs: %s", key, time.perf_counter() - t0, m)
        return m

    def remember(self, steps: list[tuple[str, dict]], metrics: Metrics) -> None:
        """Seed the cache with a result measured earlier (a resumed study)."""
        self.results[plan_hash(steps)] = metrics


ProgressFn = Callable[[dict], None]
