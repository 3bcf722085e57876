"""builtin:synth-qwen's definition (config, tokenizer, chat template, image processor files) and
the family-agnostic trainer's Qwen path (label grid order, pixels, a 2-step run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vlmopt.data import synthvqa
from vlmopt.frontend import synth_qwen

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import train_synth  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised synth-qwen directory: safetensors weights + processor files."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = tmp_path_factory.mktemp("synth-qwen")
    cfg, vocab = synth_qwen.make_config()
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(out, safe_serialization=True)
    synth_qwen.save_processor(out, vocab)
    return out


def test_config_builds_a_model_that_loads_with_transformers_alone(checkpoint):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, use_safetensors=True)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    v, t = model.config.vision_config, model.config.text_config
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size) == (4, 2, 2)
    assert v.fullatt_block_indexes == [v.depth - 1] and v.out_hidden_size == t.hidden_size
    assert (t.num_attention_heads, t.num_key_value_heads) == (4, 2)  # GQA
    head_dim = t.hidden_size // t.num_attention_heads
    assert sum(t.rope_parameters["mrope_section"]) == head_dim // 2
    assert not model.config.tie_word_embeddings
    assert (checkpoint / "model.safetensors").stat().st_size < 40 * 2**20
    tok = AutoTokenizer.from_pretrained(checkpoint)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 0
    ip = AutoImageProcessor.from_pretrained(checkpoint)  # the PIL backend: no torchvision
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (4, 2, 2)


@pytest.mark.parametrize("h, w", [(112, 112), (88, 144), (160, 80)])
def test_image_processor_keeps_sizes_between_80_and_160_px(checkpoint, h, w):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    ip = Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
    enc = ip(images=[synthvqa.sample(0, 1).image.resize((w, h))], return_tensors="np")
    assert enc["image_grid_thw"].tolist() == [[1, h // 4, w // 4]]  # 196 tokens at 112x112


def test_tokenizer_round_trips_the_synthvqa_vocabulary(checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    vocab = synth_qwen.vocabulary()
    for word in synthvqa.vocabulary() + synth_qwen.SPECIALS:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert ids == [vocab.index(word)], word
        assert tok.decode(ids) == word
    s = synthvqa.sample(3, 0)
    ids = tok(s.question, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == s.question.lower()


def test_chat_template_places_the_image_tokens_where_the_prompt_has_them(checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    msgs = [{"role": "user", "content": "What colour is the circle?\n<image>"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>user\nWhat colour is the circle?\n"
                    "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n")
    assert text == synth_qwen.prompt_text(msgs[0]["content"])
    listed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert tok.apply_chat_template(listed, tokenize=False).startswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>")
    toks = tok.convert_ids_to_tokens(tok(text)["input_ids"])
    at = toks.index("<|image_pad|>")
    assert toks[at - 1:at + 2] == ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
    assert toks[-2:] == ["<|im_start|>", "assistant"] and toks.count("<|image_pad|>") == 1


def test_trainer_inputs_equal_the_hf_processor_path(checkpoint):
    """The trainer's ids and pixels = template + the image processor + placeholder expansion
    (what Qwen2_5_VLProcessor does: grid.prod() / 4 pads per image)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = AutoTokenizer.from_pretrained(checkpoint)
    ip = Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
    fam = train_synth.Family("qwen", attn_eager=False)
    samples, sizes = [synthvqa.sample(0, i) for i in range(2)], [(112, 112), (96, 136)]
    kw, _ = train_synth.batch(fam, samples, sizes, "cpu", with_answer=False)
    images = [s.image.resize((w, h)) if (h, w) != (112, 112) else s.image
              for s, (h, w) in zip(samples, sizes)]
    ref = ip(images=images, return_tensors="pt")
    torch.testing.assert_close(kw["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)
    assert torch.equal(kw["image_grid_thw"], ref["image_grid_thw"])
    for row, s, g in zip(kw["input_ids"], samples, ref["image_grid_thw"]):
        text = tok.apply_chat_template([{"role": "user", "content": s.prompt}],
                                       add_generation_prompt=True, tokenize=False)
        text = text.replace("<|image_pad|>", "<|image_pad|>" * int(g.prod() // 4))
        want = tok(text)["input_ids"]
        assert row[-len(want):].tolist() == want and not row[:-len(want)].any()


def test_trainer_inputs_equal_vlmopts_qwen_processor(checkpoint):
    """vlmopt's own loader (transformers' Qwen2_5_VLProcessor, image-only) agrees exactly."""
    qwen_processor = pytest.importorskip("vlmopt.frontend.qwen_processor")
    proc = qwen_processor.load_qwen_processor(checkpoint)
    fam = train_synth.Family("qwen", attn_eager=False)
    samples, sizes = [synthvqa.sample(1, i) for i in range(3)], [(112, 112), (88, 144), (128, 96)]
    kw, _ = train_synth.batch(fam, samples, sizes, "cpu", with_answer=False)
    texts = [proc.apply_chat_template([{"role": "user", "content": s.prompt}],
                                      add_generation_prompt=True, tokenize=False) for s in samples]
    images, _ = train_synth.show(samples, sizes, grids=False)
    enc = proc(images=images, text=texts, padding=True, return_tensors="pt")
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(kw[k].long(), enc[k].long()), k
    torch.testing.assert_close(kw["pixel_values"], enc["pixel_values"], rtol=0, atol=0)


def test_token_grids_at_112_px_equal_synthvqa_patch_labels():
    for i in range(8):
        scene = synthvqa.sample(4, i).scene
        labels, owners, glyph = train_synth.token_grids(scene)
        np.testing.assert_array_equal(labels, synthvqa.patch_labels(scene, 8))
        np.testing.assert_array_equal(owners, synthvqa.patch_labels(scene, 8, owners=True))
        assert glyph == synthvqa.glyph_patch(scene, 8)


class _MeanRGB(nn.Module):
    """Probe patch embedding: a patch row [3*2*4*4] -> its mean R, G, B, zero-padded."""

    def __init__(self, width):
        super().__init__()
        self.width = width

    def forward(self, x):
        return nn.functional.pad(x.view(-1, 3, 2 * 16).mean(-1), (0, self.width - 3))


class _MeanOfBlock(nn.Module):
    """Probe merger: the mean of its 2x2 patches' mean RGB (the real merger's grouping)."""

    def __init__(self, width):
        super().__init__()
        self.width = width

    def forward(self, x):
        return x.view(-1, 4, self.width)[..., :3].mean(1)


@pytest.mark.parametrize("h, w", [(112, 112), (88, 144)])
def test_label_grid_follows_the_merger_token_order(h, w):
    """Through the real vision tower's window permutation and un-permutation (blocks removed,
    probes for the embedding and merger), merged token k is the 8x8 cell that the trainer's
    label row k describes; and the resized labels agree with the resized image's colours."""
    fam = train_synth.Family("qwen", attn_eager=False)
    visual = fam.build(None, "cpu").model.visual
    width = visual.config.hidden_size
    visual.patch_embed, visual.blocks = _MeanRGB(width), nn.ModuleList()
    visual.merger = _MeanOfBlock(width)
    s = synthvqa.sample(0, 3)  # a scene with several objects and a glyph
    images, grids = train_synth.show([s], [(h, w)])
    inputs = fam.pixel_inputs(images, "cpu")
    with torch.no_grad():
        got = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    img = np.asarray(images[0], dtype=np.float32)  # [h, w, 3]
    cells = ((img / 255 - 0.5) / 0.5).reshape(h // 8, 8, w // 8, 8, 3).mean((1, 3))
    np.testing.assert_allclose(got.numpy(), cells.reshape(-1, 3), atol=1e-5)  # row-major
    labels = train_synth.token_labels(grids).numpy()  # [M, 3], the trainer's token order
    assert len(labels) == len(got) == (h // 8) * (w // 8)
    # colour of each pixel of the resized image (0: none near), then per cell as the labels
    palette = np.array(list(synthvqa.COLOURS.values()), dtype=np.float32)  # [6, 3]
    dist = np.linalg.norm(img[:, :, None] - palette, axis=-1)  # [h, w, 6]
    pix = np.where(dist.min(-1) < 60, dist.argmin(-1) + 1, 0)
    cell = pix.reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3).reshape(-1, 64)
    counts = np.stack([(cell == c).sum(-1) for c in range(1, 7)], -1)  # [M, 6]
    seen = np.where(counts.max(-1) >= 8, counts.argmax(-1) + 1, 0)
    either = (seen > 0) | (labels[:, 0] > 0)
    agree = np.mean(seen[either] == labels[either, 0])
    assert either.sum() >= 10 and agree >= 0.85, f"labels match the pixels on {agree:.0%}"


def test_two_step_qwen_run_writes_a_loadable_checkpoint(tmp_path, capsys):
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = tmp_path / "run"
    train_synth.main(["--family", "qwen", "--out", str(out), "--steps", "2", "--batch-size", "2",
                      "--warmup", "1", "--eval-every", "1", "--threads", "1", "--held-n", "7",
                      "--test-n", "7", "--vision-steps", "1", "--vision-batch-size", "2",
                      "--attn-weight", "1", "--ground-weight", "1", "--aux-bg-weight", "0.25"])
    printed = capsys.readouterr().out
    losses = [float(line.split()[3]) for line in printed.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and all(np.isfinite(losses)), printed
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, use_safetensors=True)
    assert model.config.vision_config.patch_size == 4
    rec = json.loads((out / "training.json").read_text())
    stage = rec["stages"][-1]
    assert stage["command"].startswith("python examples/train_synth.py --family qwen")
    assert stage["step"] == 2 and set(stage["test_per_type"]) == set(synthvqa.QUESTION_TYPES)
    assert 0 <= stage["blank_accuracy"] <= 1 and "held_out_mixed_sizes_accuracy" in stage
    assert not list(tmp_path.glob(".*saving"))


def test_the_shipped_builtin_loads_and_needs_the_image():
    """builtin:synth-qwen is a plain Qwen2.5-VL checkpoint with M-RoPE split 2,2,12 (the width
    rows get frequencies a 14-token row can resolve), and it answers from the image: on 48
    test questions well above the blank-image score (full figures: README)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    import vlmopt
    from vlmopt.data.dataset import load_records
    from vlmopt.frontend.builtins import BUILTIN_MODELS

    path = BUILTIN_MODELS["builtin:synth-qwen"]
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, use_safetensors=True)
    assert hf.config.text_config.rope_parameters["mrope_section"] == [2, 2, 12]
    assert sum(f.stat().st_size for f in path.glob("*.safetensors")) < 40e6
    lm = vlmopt.load("builtin:synth-qwen")
    recs = load_records("builtin:synthvqa-test", limit=48)
    seen = vlmopt.evaluate(lm, recs).accuracy
    blank = vlmopt.evaluate(lm, recs, blank_image=True).accuracy
    assert seen >= 0.8 and blank <= 0.5, (seen, blank)


def test_mrope_section_flag_reaches_the_rotary_embedding(checkpoint):
    fam = train_synth.Family("qwen", attn_eager=False)
    model = fam.build(checkpoint, "cpu", [2, 2, 12])
    assert model.model.language_model.rotary_emb.mrope_section == [2, 2, 12]
    with pytest.raises(SystemExit, match="must sum to 16"):
        fam.build(checkpoint, "cpu", [4, 4, 4])
