"""The verifier: runs after every pass (always in tests).

1. fx lint;
2. shape propagation on fake tensors (no FLOPs spent, works for config-only real shapes);
3. structural invariants: token counts non-increasing along the decoder chain, the static visual
   count each decoder node declares equals its propagated shape, low-rank factors shaped like the
   weight they replace;
4. with an ``example`` batch, value invariants: every text token reaches every layer, kept tokens
   stay in order and keep their original position ids, or, after a token change declared
   ``positions="contiguous"``, carry positions renumbered 0.. over the kept sequence. Tokens
   are told apart by the slot indices each keep-top-k returns, not by their positions.
Errors name the pass, the node and the invariant.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from vlmopt.cost import fake_weights
from vlmopt.errors import VerifyError
from vlmopt.ir.rewrite import visual_tokens

log = logging.getLogger(__name__)


def _fail(pass_name: str | None, node: str, invariant: str, detail: str) -> VerifyError:
    who = f"pass {pass_name!r}" if pass_name else "graph"
    return VerifyError(f"{who}: node {node!r}: invariant '{invariant}' broken: {detail}")


def example_shapes(gm: fx.GraphModule, batch: int = 2, n_text: int = 16) -> dict:
    """Fake-able example inputs of the captured model's real shapes."""
    info = gm.meta["vlmopt"]
    size = info["image_size"]  # NOTE: from meta: passes may replace the vision module
    n_vis = example_image_slots(gm)
    T = n_text + n_vis
    ids = torch.full((batch, T), 1, dtype=torch.long)
    ids[:, 4:4 + n_vis] = info["image_token_id"]
    pos = torch.arange(T).expand(batch, T).contiguous()
    out = {"input_ids": ids, "attention_mask": torch.ones(batch, T, dtype=torch.long),
           "position_ids": pos if info.get("position_rows", 1) == 1 else
           pos[None].expand(3, batch, T).contiguous()}
    if size is not None:
        out["pixel_values"] = torch.zeros(batch, 3, size, size)
    else:  # dynamic resolution: one reference image per sample, as its family builds it
        from vlmopt.frontend.family import adapter_of_graph

        ex = adapter_of_graph(info).example_inputs(info["vision_example"], ids,
                                                    out["attention_mask"],
                                                    info["image_token_id"])
        if info.get("position_rows", 1) == 1:  # the 1-row example positions above stand
            ex.pop("position_ids")
        else:  # NOTE: equal rows, as before; M-RoPE values do not change the shapes
            ex["position_ids"] = out["position_ids"]
        out.update(ex)
    return out


def example_n_visual(gm: fx.GraphModule) -> int:
    """Visual tokens per image of the shape-propagation example (the fixed count, or the
    reference grid's for dynamic resolution)."""
    info = gm.meta["vlmopt"]
    if info["n_visual"] is not None:
        return info["n_visual"]
    from vlmopt.frontend.family import adapter_of_graph

    return adapter_of_graph(info).example_visual_tokens(info["vision_example"])


def example_image_slots(gm: fx.GraphModule) -> int:
    """Image-token slots per image of the example: its visual tokens plus the slots that stay
    text (AnyRes newlines, which fill ``<image>`` slots but are no image features)."""
    info = gm.meta["vlmopt"]
    if info["n_visual"] is not None:
        return info["n_visual"]
    from vlmopt.frontend.family import adapter_of_graph

    return adapter_of_graph(info).example_image_tokens(info["vision_example"])


def _positions(pos: torch.Tensor, b: int) -> list:
    """Sample b's position ids, one hashable per token: an int, or a (t, h, w) M-RoPE triple."""
    if pos.dim() == 3:
        return list(zip(*(pos[r, b].tolist() for r in range(pos.shape[0]))))
    return pos[b].tolist()


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

    # shape propagation under fake tensors. NOTE: dynamic-resolution graphs (Qwen-VL) read
    # their image grids and visual counts as values, which fake tensors do not have: they
    # propagate real tensors of a small reference image instead (one cheap forward), and
    # skip this step on meta (config-only) weights.
    args = example_shapes(gm, n_text=n_text)
    dynamic = gm.meta["vlmopt"]["n_visual"] is None
    if dynamic and any(p.is_meta for p in gm.parameters()):
        log.info("graph on meta weights with dynamic resolution: shape propagation skipped")
        checked = False
    else:
        checked = True
        fake = None if dynamic else FakeTensorMode(allow_non_fake_inputs=True)
        names = gm.meta["vlmopt"]["inputs"]
        if fake is None:
            fargs = [args[k] for k in names]
        else:
            with fake:
                fargs = [fake.from_tensor(args[k]) for k in names]
        try:
            with contextlib.ExitStack() as stack:
                if fake is not None:  # meta (config-only) and real weights alike become fake
                    stack.enter_context(fake_weights(gm))
                stack.enter_context(torch.no_grad())
                ShapeProp(gm, fake_mode=fake).propagate(*fargs)
        except Exception as e:
            raise _fail(pass_name, "<shape propagation>", "shapes propagate",
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") \
                from None

    prev = None
    # text the decoders see: the prompt's and the image slots that stay text (newlines)
    n_text = n_text + example_image_slots(gm) - example_n_visual(gm)
    for n in gm.graph.nodes:
        info = n.meta.get("vlmopt", {})
        if info.get("block") != "decoder" or not checked:
            continue
        T = _hidden_len(n)
        if T is None:
            raise _fail(pass_name, n.name, "decoder output is [B, T, D]", "no shape propagated")
        if prev is not None and prev < T:
            raise _fail(pass_name, n.name, "token counts non-increasing", f"{prev} -> {T}")
        declared = visual_tokens(info, example_n_visual(gm))
        if n_text + declared != T:
            raise _fail(pass_name, n.name, "declared visual count matches shape",
                        f"declares {declared} visual + {n_text} text but sees {T} tokens")
        prev = T
    if example is not None:
        verify_values(gm, example, pass_name=pass_name)


class _Recorder(fx.Interpreter):
    """Records, at each decoder node, the position ids it is called with, its attention mask,
    and the original slot of each of its tokens (composed from the keep-top-k indices)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.seen: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.slots: torch.Tensor | None = None

    def call_module(self, target, args, kwargs):
        from vlmopt.ir.tokens import KeepTopK

        mod = self.module.get_submodule(target)
        if getattr(mod, "is_decoder_block", False):
            slots = self.slots
            if slots is None or slots.shape[1] != args[0].shape[1]:
                slots = None if self.slots is not None else torch.arange(
                    args[0].shape[1]).expand(args[0].shape[0], -1)
            self.seen.append((target, args[3], args[5], slots))
        out = super().call_module(target, args, kwargs)
        if isinstance(mod, KeepTopK):
            prev = self.slots if self.slots is not None else torch.arange(
                args[1].shape[1]).expand(args[1].shape[0], -1)
            self.slots = prev.gather(1, out[4])
        return out


@torch.no_grad()
def verify_values(gm: fx.GraphModule, example: dict, *, pass_name: str | None = None) -> None:
    from vlmopt.ir.capture import complete_inputs
    from vlmopt.ir.tokens import contiguous_positions, gather_positions

    ex = complete_inputs(example)
    rec = _Recorder(gm)
    rec.run(*(ex[k] for k in gm.meta["vlmopt"]["inputs"]))
    image_id = gm.meta["vlmopt"]["image_token_id"]
    renumbered = {n.target: n.meta["vlmopt"]["renumbered"] for n in gm.graph.nodes
                  if n.meta.get("vlmopt", {}).get("renumbered")}
    valid = ex["attention_mask"].bool()
    for b in range(ex["input_ids"].shape[0]):
        n_pad = int((~valid[b]).sum())
        orig = _positions(ex["position_ids"], b)
        is_text = (ex["input_ids"][b] != image_id).tolist()
        all_pos = orig[n_pad:]
        text_pos = {p for p, t in zip(orig[n_pad:], is_text[n_pad:]) if t}
        for target, pos, amask, slots in rec.seen:
            # the tokens' identity: their original positions, through the kept slots
            ident = pos if slots is None else gather_positions(ex["position_ids"], slots)
            if target in renumbered:
                want = contiguous_positions(ident, amask)
                if renumbered[target] == "exact" and \
                        not torch.equal(pos[b][n_pad:], want[b][n_pad:]):
                    raise _fail(pass_name, target, "contiguous positions after the cut",
                                f"sample {b} has {pos[b][n_pad:][:8].tolist()}")
            elif slots is not None and not torch.equal(pos, ident):
                raise _fail(pass_name, target, "positions unchanged for kept tokens",
                            f"sample {b} has positions that are not its tokens' own")
            # NOTE: left padding: pads are text, never dropped, so they stay the first n_pad slots
            got = _positions(ident, b)[n_pad:]
            if not text_pos <= set(got):
                raise _fail(pass_name, target, "text tokens kept",
                            f"sample {b} lost positions {sorted(text_pos - set(got))[:5]}")
            new = set(got) - set(all_pos)
            if new:
                raise _fail(pass_name, target, "positions unchanged for kept tokens",
                            f"sample {b} has new positions {sorted(new)[:5]}")
            if got != sorted(got):
                raise _fail(pass_name, target, "kept tokens stay sorted", f"sample {b}")
