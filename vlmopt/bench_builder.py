"""The peer row of `vlmopt bench`: ONNX Runtime GenAI's model builder graph of the same decoder.

What a deployer would ship without vlmopt: ``python -m onnxruntime_genai.models.builder`` (fp32,
CPU EP: GroupQueryAttention with the rotary inside, packed QKV, SkipSimplifiedLayerNormalization)
of the checkpoint's text decoder. The builder has no LLaVA architecture, so the decoder is saved
as its own causal-LM checkpoint (same weights: a config-only model's seeded random weights too)
and built from that directory; the image goes through a vision graph (vision tower + projector,
exported by torch.onnx from the same model), which is how ORT-GenAI runs its VLMs (a vision
graph beside the text decoder). The row's prefill is that vision graph then the builder's
decoder over the whole prompt (image tokens included: the same sequence length as vlmopt's
unpruned prefill; the image positions read the image token's embedding row instead of the
features, which costs the same), its decode the builder's decoder step.

``onnxruntime-genai`` is optional (``pip install vlmopt[genai]``); without it the row is skipped
with a note (``SKIP_NOTE``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ROW = "genai-builder/original"
SKIP_NOTE = ("genai-builder/original: skipped, onnxruntime-genai is not installed "
             "(pip install 'vlmopt[genai]' adds ONNX Runtime GenAI's model builder row)")


def available() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def unsupported(lm) -> str | None:
    """Why the builder row cannot be made for ``lm`` (None: it can)."""
    if lm.adapter.position_rows != 1:  # the builder's decoders take one row of positions
        return (f"{ROW}: skipped, the builder row needs a decoder with 1-D positions "
                f"({lm.adapter.family} uses {lm.adapter.position_rows} rows: M-RoPE)")
    return None


def save_decoder(lm, dst: Path) -> Path:
    """The LLaVA's text decoder + LM head as a causal-LM checkpoint at ``dst`` (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    tc = lm.config.text_config
    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(tc)
    a = lm.adapter
    sd = {f"model.{k}": v for k, v in a.lm.state_dict().items()}
    sd.update({f"lm_head.{k}": v for k, v in a.lm_head.state_dict().items()})
    causal.load_state_dict(sd, assign=True, strict=True)  # NOTE: shares the tensors, no copy
    causal.config.architectures = [type(causal).__name__]
    causal.save_pretrained(dst, safe_serialization=True)
    tok = getattr(lm.processor, "tokenizer", None) if lm.processor is not None else None
    if tok is None:  # NOTE: the builder copies a tokenizer; a config-only model has none
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
            vocab, unk_token="<unk>")), unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(dst)
    return dst


class _Vision:
    """pixel_values [B, 3, H, W] -> projected image features, as LLaVA computes them."""

    def __new__(cls, lm):
        import torch

        class Vision(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = lm.model.model

            def forward(self, pixel_values):
                cfg = lm.config
                out = self.m.get_image_features(
                    pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                    vision_feature_select_strategy=cfg.vision_feature_select_strategy)
                out = getattr(out, "pooler_output", out)
                return out if isinstance(out, torch.Tensor) else torch.cat(list(out), 0)

        return Vision().eval()


def build(lm, work: Path, pixel_values, threads: int | None = None) -> Path:
    """Build (or reuse) ``work``/model.onnx with the builder and ``work``/vision.onnx."""
    import torch

    stamp = work / "vlmopt-builder.json"
    key = {"fingerprint": lm.fingerprint, "pixel_shape": list(pixel_values.shape)}
    if stamp.is_file() and json.loads(stamp.read_text()) == key:
        log.info("reusing the builder graph in %s", work)
        return work
    work.mkdir(parents=True, exist_ok=True)
    src = save_decoder(lm, work / "hf-decoder")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o",
           str(work / "genai"), "-p", "fp32", "-e", "cpu", "-c", str(work / "cache"),
           "--extra_options", "prune_lm_head=true"]  # NOTE: last-position logits, like vlmopt
    log.info("building: %s", " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        from vlmopt.errors import VlmoptError

        raise VlmoptError(f"{ROW}: the ORT-GenAI builder failed: "
                          f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    import shutil

    shutil.rmtree(work / "hf-decoder", ignore_errors=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    with torch.no_grad():
        prog = torch.onnx.export(_Vision(lm), (pixel_values,), dynamo=True, opset_version=18,
                                 input_names=["pixel_values"], output_names=["features"],
                                 optimize=True, verbose=False)
    prog.save(str(work / "vision.onnx"), external_data=None)
    stamp.write_text(json.dumps(key))
    return work


def prepare(lm, work: Path, pixel_values) -> tuple[Path | None, str]:
    """(the builder's work directory or None, the note for the results) for ``vlmopt bench``."""
    why = unsupported(lm) or (None if available() else SKIP_NOTE)
    if why:
        log.warning("%s", why)
        return None, why
    return build(lm, work, pixel_values), (
        f"{ROW}: ONNX Runtime GenAI's model builder (fp32, CPU EP, prune_lm_head) of the "
        "checkpoint's text decoder + a vision graph of the same model; its prefill runs the "
        "whole unpruned prompt")


class BuilderVariant:
    """Timed like bench.OrtVariant: prefill = vision graph + builder decoder over the prompt."""

    def __init__(self, work: Path, threads: int | None = None):
        from vlmopt.runtime import session

        self.vision = session(work / "vision.onnx", "cpu", threads, spinning=False)
        self.decoder = session(work / "genai" / "model.onnx", "cpu", threads, spinning=False)
        ins = {i.name: i for i in self.decoder.get_inputs()}
        self.past = sorted((n for n in ins if n.startswith("past_key_values.")),
                           key=lambda n: (int(n.split(".")[1]), n.split(".")[2]))
        dec = json.loads((work / "genai" / "genai_config.json").read_text())["model"]["decoder"]
        self.kv_heads, self.head_dim = int(dec["num_key_value_heads"]), int(dec["head_size"])
        self.has_pos = "position_ids" in ins

    def _run(self, ids, mask, past):
        feeds = {"input_ids": ids, "attention_mask": mask, **dict(zip(self.past, past))}
        if self.has_pos:
            T = mask.shape[1]
            feeds["position_ids"] = np.arange(T - ids.shape[1], T, dtype=np.int64)[None].repeat(
                ids.shape[0], 0)
        out = self.decoder.run(None, feeds)
        names = [o.name for o in self.decoder.get_outputs()]
        res = dict(zip(names, out))
        present = [res[n.replace("past_key_values", "present")] for n in self.past]
        return res["logits"][:, -1], present

    def prefill(self, batch):
        b = batch["numpy"]
        self.vision.run(None, {"pixel_values": b["pixel_values"]})  # image features
        ids = b["input_ids"]
        B = ids.shape[0]
        empty = np.zeros((B, self.kv_heads, 0, self.head_dim), np.float32)
        mask = np.ones_like(ids)
        logits, present = self._run(ids, mask, [empty] * len(self.past))
        return logits, present, mask

    def decode(self, state, n: int):
        logits, past, mask = state
        for _ in range(n):
            tok = logits.argmax(-1)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones_like(tok)], 1)
            logits, past = self._run(tok, mask, past)
        return logits

    def release(self) -> None:
        self.vision = None
