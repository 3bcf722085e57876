"""`vlmopt bench`'s ORT-GenAI builder row (vlmopt.bench_builder): skipped with a note without
onnxruntime-genai; with it, the builder's graph of the tiny LLaVA's decoder is that decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_tiny_config, make_tiny_qwen_dir

from vlmopt import bench_builder as bb


def test_builder_row_is_skipped_with_a_note_when_onnxruntime_genai_is_absent(
        monkeypatch, loaded_tiny, tmp_path, capsys):
    from vlmopt.bench import print_table

    monkeypatch.setattr(bb, "available", lambda: False)
    work, note = bb.prepare(loaded_tiny, tmp_path / "b", torch.zeros(1, 3, 8, 8))
    assert work is None and note == bb.SKIP_NOTE and not (tmp_path / "b").exists()
    assert "onnxruntime-genai is not installed" in note and "vlmopt[genai]" in note
    res = {"model": "m", "prompt_tokens": 1, "batch_size": 1, "threads": 1, "repeats": 1,
           "flops": {"prefill_ratio": 0.5, "ideal_prefill_speedup": 2.0, "decode_ratio": 1.0},
           "latency": {}, "speedup": {"ort_prefill_speedup": None,
                                      "torch_prefill_speedup": None},
           "targets": {"ort_prefill_speedup_over_ideal": 0.0}, "accuracy": None,
           "notes": ["a", "b", note]}
    print_table(res)
    assert f"note: {bb.SKIP_NOTE}" in capsys.readouterr().out


def test_builder_row_is_skipped_for_a_family_it_does_not_cover(loaded_tiny, tmp_path):
    from vlmopt.frontend.load import load

    assert bb.unsupported(loaded_tiny) is None
    qwen = load(make_tiny_qwen_dir(tmp_path / "qwen"))
    assert "M-RoPE" in bb.unsupported(qwen)  # told by the adapter, not by a family name


@pytest.mark.skipif(not bb.available(), reason="onnxruntime-genai is not installed")
def test_builder_graph_is_the_checkpoints_decoder(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from vlmopt.emit import synthetic_batch
    from vlmopt.emit_fuse import op_counts
    from vlmopt.frontend import synth_llava
    from vlmopt.frontend.load import load
    from vlmopt.ir.capture import capture

    cfg, vocab = make_tiny_config()
    cfg.text_config.hidden_size, cfg.text_config.head_dim = 64, 16  # GQA: head size % 16
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(tmp_path / "m")
    synth_llava.make_processor(vocab).save_pretrained(tmp_path / "m")
    lm = load(tmp_path / "m")
    tb = synthetic_batch(capture(lm), len(vocab), n=1, n_text=8, ragged=False)
    work, note = bb.prepare(lm, tmp_path / "b", tb["pixel_values"])
    assert "model builder" in note
    assert op_counts(work / "genai" / "model.onnx").get("GroupQueryAttention") == 2
    v = bb.BuilderVariant(work, threads=1)
    logits, past, mask = v.prefill({"numpy": {k: x.numpy() for k, x in tb.items()}})
    ids = tb["input_ids"]
    with torch.no_grad():
        dec = lm.model.model.language_model
        ref = lm.model.lm_head(dec(input_ids=ids).last_hidden_state)[:, -1].numpy()
        tok = ref.argmax(-1)[:, None]
        ids2 = torch.cat([ids, torch.from_numpy(tok)], 1)
        ref2 = lm.model.lm_head(dec(input_ids=ids2).last_hidden_state)[:, -1].numpy()
    assert float(np.abs(logits - ref).max()) <= 1e-4
    assert float(np.abs(v.decode((logits, past, mask), 1) - ref2).max()) <= 1e-4
