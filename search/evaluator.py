"""Fidelity of candidate plans on a calibration set, with evaluations cached by plan hash and
node outputs cached by *what computed them*, so layers whose inputs did not change are not
recomputed.

Every node of a block graph gets a signature: its module's key (class, static fields, the
identity of shared Hugging Face submodules and of any new parameters) and its inputs'
signatures. Two candidates that agree up to layer k (same selection, same drops before k) give
layer k's input the same signature, so its value comes from the cache. The key of a module is
conservative: anything that is not a plain number, string or list of them is keyed by identity.

Memory: every Evaluator of a process shares one cache of node outputs (``SHARED_CACHE_BYTES``,
512 MiB), so the search's, the finalists' and the held-out evaluators together stay within it
(each had its own 3 GiB before: 11 GB peak for the demo); an evaluator's entries go when it is
garbage collected. Outputs of blocks that are cheaper to recompute than to keep (embedding,
masks, rotary tables, token gathers, the final norm: ``recompute = True`` on the block) are
never stored, and an entry that was hit once is protected from the flood of one-off outputs
(segmented LRU), so what every plan reuses - the vision tower's features, the original model's
prefix - stays. The original plan is measured from the reference run itself. None of this
changes a value: a cached output is the one recomputing gives.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
import weakref
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
    """Node outputs by key, at most ``max_bytes`` of tensors. Segmented LRU: a new entry is on
    probation; one hit moves it to the protected segment (at most ``protect`` of the budget, its
    least recently used entries demoted back beyond that). Eviction takes the least recently
    used probationary entry first, so a plan's one-off outputs never flush what every plan
    reuses. A key asked for again after its eviction (remembered among the last ``ghosts``
    evicted keys) enters protected: one pass of a plan over many batches may outgrow probation
    before the next plan comes back to its first batch. Keys start with the owning evaluator's
    token (``drop``)."""

    def __init__(self, max_bytes: int, protect: float = 0.5, ghosts: int = 20000):
        self.max_bytes, self.max_protected = max_bytes, int(max_bytes * protect)
        self.probation: OrderedDict = OrderedDict()
        self.protected: OrderedDict = OrderedDict()
        self.evicted: OrderedDict = OrderedDict()  # keys only, most recent last
        self.max_ghosts = ghosts
        self.bytes = self.protected_bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.probation) + len(self.protected)

    @staticmethod
    def _size(v) -> int:
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        if isinstance(v, (tuple, list)):
            return sum(_LRU._size(x) for x in v)
        return 0

    def get(self, key):
        if key in self.protected:
            self.protected.move_to_end(key)
            self.hits += 1
            return self.protected[key]
        if key in self.probation:
            entry = self.probation.pop(key)
            self._protect(key, entry)
            self.hits += 1
            return entry
        self.misses += 1
        return None

    def _protect(self, key, entry) -> None:
        self.protected[key] = entry
        self.protected_bytes += entry[1]
        while self.protected_bytes > self.max_protected:
            k, e = self.protected.popitem(last=False)
            self.protected_bytes -= e[1]
            self.probation[k] = e

    def put(self, key, value) -> None:
        size = self._size(value)
        if size > self.max_bytes or key in self.probation or key in self.protected:
            return
        self.bytes += size
        if self.evicted.pop(key, False):  # wanted again after its eviction: reused
            self._protect(key, (value, size))
        else:
            self.probation[key] = (value, size)
        while self.bytes > self.max_bytes:
            seg = self.probation or self.protected
            k, (_, s) = seg.popitem(last=False)
            self.bytes -= s
            if seg is self.protected:
                self.protected_bytes -= s
            self.evicted[k] = True
            if len(self.evicted) > self.max_ghosts:
                self.evicted.popitem(last=False)

    def drop(self, owner) -> None:
        """Forget every entry of one owner (an evaluator that is gone)."""
        for k in [k for k in self.evicted if k[0] == owner]:
            del self.evicted[k]
        for seg in (self.probation, self.protected):
            for k in [k for k in seg if k[0] == owner]:
                _, s = seg.pop(k)
                self.bytes -= s
                if seg is self.protected:
                    self.protected_bytes -= s


SHARED_CACHE_BYTES = 512 << 20  # node outputs kept for every Evaluator of the process together
_shared: _LRU | None = None
_owners = itertools.count()


def shared_cache() -> _LRU:
    global _shared
    if _shared is None or _shared.max_bytes != SHARED_CACHE_BYTES:
        _shared = _LRU(SHARED_CACHE_BYTES)
    return _shared


class Evaluator:
    """Evaluates plans (lists of (pass, fields)) on pre-encoded calibration batches."""

    def __init__(self, lm, records: list[Record], *, batch_size: int = 32,
                 cache_bytes: int | None = None):
        """``cache_bytes``: a cache of its own of that size; None: the process-wide one."""
        self.lm = lm
        chunks = record_batches(records, batch_size, lm.processor)  # one image size a batch
        records = [r for c in chunks for r in c]
        self.records = records
        self.base = capture(lm)
        self._hf_ids = {id(m) for m in lm.model.modules()}
        # identity keys: a token per object, released when the object dies (weakref), so a
        # trial's new weights are not kept alive by the keys; objects that cannot be weakly
        # referenced are pinned (kept alive) so their id() is never reused
        self._tokens: dict[int, int] = {}
        self._pinned: dict[int, object] = {}
        self._next_token = itertools.count()
        self._owner = next(_owners)
        self.cache = _LRU(cache_bytes) if cache_bytes is not None else shared_cache()
        weakref.finalize(self, self.cache.drop, self._owner).atexit = False
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
        i = id(obj)
        tok = self._tokens.get(i)
        if tok is None:
            tok = self._tokens[i] = next(self._next_token)
            try:
                weakref.finalize(obj, self._tokens.pop, i, None)
            except TypeError:  # no weak references to it: keep it alive instead
                self._pinned[i] = obj
        return tok

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
        cache, owner = self.cache, self._owner
        cached = {n for n in gm.graph.nodes if n.op == "call_module"
                  and not getattr(gm.get_submodule(n.target), "recompute", False)}
        outs = []

        class _Cached(fx.Interpreter):
            def run_node(self, n):
                if n not in cached:
                    return super().run_node(n)
                key = (owner, self.batch_index, sig[n])
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
        # the original plan's log-probabilities are the reference's (a run of the same graph on
        # the same batches gives the same logits): no run, and no cached layers needed for it
        logps = self.ref_logp if not steps else (
            F.log_softmax(lg, -1) for lg in self._run(self.build(steps)))
        hits, agree, kls = [], [], []
        j = 0
        for logp, ref in zip(logps, self.ref_logp):
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
