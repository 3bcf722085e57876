"""The verifier: runs after every pass (always in tests).

1. fx lint;
2. shape propagation on fake tensors (no FLOPs spent, works for config-only real shapes);
3. structural invariants: token counts non-increasing along the decoder chain, the static visual
   count each decoder node declares equals its propagated shape, low-rank factors shaped like the
   weight they replace;
4. with an ``example`` batch, value invariants: every text token reaches every layer, kept tokens
   keep their original position ids, and kept positions stay sorted.
Errors name the pass, the node and the invariant.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from vlmopt.cost import fake_weights
from vlmopt.errors import VerifyError


def _fail(pass_name: str | None, node: str, invariant: str, detail: str) -> VerifyError:
    who = f"pass {pass_name!r}" if pass_name else "graph"
    return VerifyError(f"{who}: node {node!r}: invariant '{invariant}' broken: {detail}")


def example_shapes(gm: fx.GraphModule, batch: int = 2, n_text: int = 16) -> dict:
    """Fake-able example inputs of the captured model's real shapes."""
    info = gm.meta["vlmopt"]
    size = info["image_size"]  # NOTE: from meta: passes may replace the vision module
    n_vis = info["n_visual"]
    T = n_text + n_vis
    ids = torch.full((batch, T), 1, dtype=torch.long)
    ids[:, 4:4 + n_vis] = info["image_token_id"]
    return {
        "input_ids": ids,
        "pixel_values": torch.zeros(batch, 3, size, size),
        "attention_mask": torch.ones(batch, T, dtype=torch.long),
        "position_ids": torch.arange(T).expand(batch, T).contiguous(),
    }


def _hidden_len(node: fx.Node) -> int | None:
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) == 3 else None


def verify_graph(gm: fx.GraphModule, *, pass_name: str | None = None,
                 example: dict | None = None, n_text: int = 16) -> None:
    try:
        gm.graph.lint()
    except Exception as e:  # fx raises RuntimeError/AssertionError with its own message
        raise _fail(pass_name, "<graph>", "fx lint", str(e)) from None
    gm.recompile()
    # NOTE: before shape propagation, so a mis-shaped factor is named, not a matmul error
    for name, mod in gm.named_modules():
        check = getattr(mod, "verify_factors", None)
        if check is not None:
            problem = check()
            if problem:
                raise _fail(pass_name, name, "low-rank factors shaped like the weight", problem)

    # shape propagation under fake tensors
    args = example_shapes(gm, n_text=n_text)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        fargs = [fake.from_tensor(args[k]) for k in ("input_ids", "pixel_values",
                                                     "attention_mask", "position_ids")]
    try:
        with fake_weights(gm):  # meta (config-only) and real weights alike become fake
            ShapeProp(gm, fake_mode=fake).propagate(*fargs)
    except Exception as e:
        raise _fail(pass_name, "<shape propagation>", "shapes propagate",
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None

    prev = None
    for n in gm.graph.nodes:
        info = n.meta.get("vlmopt", {})
        if info.get("block") != "decoder":
            continue
        T = _hidden_len(n)
        if T is None:
            raise _fail(pass_name, n.name, "decoder output is [B, T, D]", "no shape propagated")
        if prev is not None and prev < T:
            raise _fail(pass_name, n.name, "token counts non-increasing", f"{prev} -> {T}")
        declared = info.get("n_visual")
        if declared is not None and n_text + declared != T:
            raise _fail(pass_name, n.name, "declared visual count matches shape",
                        f"declares {declared} visual + {n_text} text but sees {T} tokens")
        prev = T
    if example is not None:
        verify_values(gm, example, pass_name=pass_name)


class _Recorder(fx.Interpreter):
    """Records the position ids each decoder node is called with."""

    def __init__(self, gm):
        super().__init__(gm)
        self.seen: list[tuple[str, torch.Tensor]] = []

    def call_module(self, target, args, kwargs):
        mod = self.module.get_submodule(target)
        if getattr(mod, "is_decoder_block", False):
            self.seen.append((target, args[3]))
        return super().call_module(target, args, kwargs)


@torch.no_grad()
def verify_values(gm: fx.GraphModule, example: dict, *, pass_name: str | None = None) -> None:
    from vlmopt.ir.capture import complete_inputs

    ex = complete_inputs(example)
    rec = _Recorder(gm)
    rec.run(*(ex[k] for k in ("input_ids", "pixel_values", "attention_mask", "position_ids")))
    image_id = gm.meta["vlmopt"]["image_token_id"]
    valid = ex["attention_mask"].bool()
    for b in range(ex["input_ids"].shape[0]):
        all_pos = ex["position_ids"][b][valid[b]]
        text_pos = set(ex["position_ids"][b][valid[b] & (ex["input_ids"][b] != image_id)].tolist())
        for target, pos in rec.seen:
            # NOTE: left padding: pads are text, never dropped, so they stay the first n_pad slots
            n_pad = int((~valid[b]).sum())
            got = pos[b][n_pad:].tolist()
            if not text_pos <= set(got):
                raise _fail(pass_name, target, "text tokens kept",
                            f"sample {b} lost positions {sorted(text_pos - set(got))[:5]}")
            new = set(got) - set(all_pos.tolist())
            if new:
                raise _fail(pass_name, target, "positions unchanged for kept tokens",
                            f"sample {b} has new positions {sorted(new)[:5]}")
            if got != sorted(got):
                raise _fail(pass_name, target, "kept tokens stay sorted", f"sample {b}")
