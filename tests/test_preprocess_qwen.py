"""Qwen-VL preprocessing: numpy pixels and grids equal transformers' Qwen2-VL image processor,
and the image-only processor expands, pads and marks image tokens as the Qwen processors do."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf

from vlmopt import preprocess_qwen as pq
from vlmopt.errors import VlmoptError
from vlmopt.frontend.qwen_processor import load_qwen_processor

REPO = Path(__file__).resolve().parents[1]
# small pixel limits: a few dozen patches per image, milliseconds per test
QWEN2 = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 12, "patch_size": 14,
         "temporal_patch_size": 2, "merge_size": 2, "image_mean": list(pq.OPENAI_CLIP_MEAN),
         "image_std": list(pq.OPENAI_CLIP_STD), "image_processor_type": "Qwen2VLImageProcessor"}
QWEN3 = {"size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 12}, "patch_size": 16,
         "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3,
         "image_std": [0.5] * 3, "image_processor_type": "Qwen2VLImageProcessorFast"}
BILINEAR_RAW = {**QWEN2, "resample": 2, "do_normalize": False}
CONFIGS = {"qwen2": QWEN2, "qwen3": QWEN3, "bilinear_raw": BILINEAR_RAW}
SIZES = [(37, 91), (91, 37), (300, 17), (111, 113), (1000, 333), (20, 25)]  # (w, h); last < min
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
WORDS = ["<unk>", "system", "user", "assistant", "you", "are", "a", "helpful", "what", "is",
         "this", "?", "and", "picture"]
# the Qwen2.5-VL template, video branches left out
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode in ("L", "P"):
        image = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
        if mode == "P":  # a palette with a transparent entry: composited onto white
            image = image.convert("P")
            image.info["transparency"] = 0
        return image
    return Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)


def _reference(cfg: dict, images: list[Image.Image]) -> dict:
    # NOTE: transformers' __init__ edits the dict it is given
    return hf.Qwen2VLImageProcessorPil(**copy.deepcopy(cfg))(images, return_tensors="np")


def _ours(cfg: dict, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    out = [pq.pixels(im, pq.image_config(cfg)) for im in images]
    return np.concatenate([p for p, _ in out]), np.stack([g for _, g in out])


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pixels_equal_transformers_qwen2vl_image_processor(name, size):
    cfg, image = CONFIGS[name], _image(*size)
    ref = _reference(cfg, [image])
    got, grid = pq.pixels(image, pq.image_config(cfg))
    want = ref["pixel_values"]
    assert got.dtype == np.float32 and got.shape == want.shape, (got.shape, want.shape)
    diff = float(np.abs(got - want).max())
    assert diff <= 1e-6, f"max abs diff {diff}"
    assert grid.dtype == np.int64 and np.array_equal(grid, ref["image_grid_thw"][0])
    assert pq.grid_for_size(size[1], size[0], pq.image_config(cfg)) == tuple(grid.tolist())
    assert pq.n_tokens(grid, 2) * 4 == got.shape[0]


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_pixels_of_odd_modes_equal_transformers_in_one_batch(name):
    images = [_image(150, 131, "RGBA", 1), _image(97, 240, "L", 2), _image(64, 64, "RGB", 3),
              _image(53, 71, "P", 4)]
    ref = _reference(CONFIGS[name], images)
    got, grids = _ours(CONFIGS[name], images)
    diff = float(np.abs(got - ref["pixel_values"]).max())
    assert got.shape == ref["pixel_values"].shape and diff <= 1e-6, f"max abs diff {diff}"
    assert np.array_equal(grids, ref["image_grid_thw"])


def test_smart_resize_equals_transformers_on_a_grid_of_sizes():
    sides = [1, 2, 3, 13, 14, 27, 28, 29, 41, 56, 99, 140, 333, 640, 1001, 3000]
    limits = [(56 * 56, 28 * 28 * 1280), (28 * 28 * 4, 28 * 28 * 12), (32 * 32 * 4, 32 * 32 * 16)]
    checked = rejected = 0
    for factor in (28, 32):
        for lo, hi in limits:
            for h in sides:
                for w in sides:
                    try:
                        want = hf.smart_resize(h, w, factor, lo, hi)
                    except ValueError:
                        with pytest.raises(VlmoptError, match="aspect ratio"):
                            pq.smart_resize(h, w, factor, lo, hi)
                        rejected += 1
                        continue
                    assert pq.smart_resize(h, w, factor, lo, hi) == want, (h, w, factor, lo, hi)
                    checked += 1
    assert checked > 1000 and rejected > 0


def test_absurd_aspect_ratio_is_one_error_line():
    with pytest.raises(VlmoptError) as e:
        pq.pixels(_image(1, 300), pq.image_config(QWEN2))
    assert "\n" not in str(e.value) and "aspect ratio 300.0" in str(e.value)


@pytest.mark.parametrize("cfg", [
    QWEN2, QWEN3, {}, {"image_processor": QWEN3},
    {**QWEN3, "min_pixels": 5000, "max_pixels": 20000},  # top level overrides size
], ids=["min_max_pixels", "size_edges", "defaults", "nested", "override"])
def test_image_config_reads_both_spellings_as_transformers(cfg):
    got = pq.image_config(cfg)
    ref = hf.Qwen2VLImageProcessorPil(**copy.deepcopy(cfg.get("image_processor", cfg)))
    assert (got.min_pixels, got.max_pixels) == (ref.size.shortest_edge, ref.size.longest_edge)
    assert (got.patch_size, got.merge_size, got.temporal_patch_size) == (
        ref.patch_size, ref.merge_size, ref.temporal_patch_size)
    assert got.mean == tuple(ref.image_mean) and got.std == tuple(ref.image_std)
    assert got.resample == int(ref.resample) == 3  # bicubic
    assert got.rescale_factor == ref.rescale_factor


def test_image_config_without_a_longest_edge_is_rejected():
    with pytest.raises(VlmoptError, match="longest_edge"):
        pq.image_config({"size": {"shortest_edge": 3136}})


def test_expand_image_tokens_repeats_each_placeholder_to_its_count():
    text = "a<|vision_start|><|image_pad|><|vision_end|>b<|image_pad|>c"
    assert pq.expand_image_tokens(text, [2, 3]) == (
        "a<|vision_start|>" + "<|image_pad|>" * 2 + "<|vision_end|>b" + "<|image_pad|>" * 3 + "c")
    with pytest.raises(VlmoptError, match="2 <|image_pad|> placeholders for 1 images"):
        pq.expand_image_tokens(text, 4)


# ----------------------------------------------------------------------------- processor


def _tiny_checkpoint(out: Path, preprocessor: dict) -> Path:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = SPECIALS + WORDS
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
        unk_token="<unk>", padding_side="left", model_max_length=4096)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(TEMPLATE)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return out


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen-proc"),
                            {**QWEN2, "processor_class": "Qwen2_5_VLProcessor"})


def _messages(n_images: int) -> list[dict]:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": "what is this ?"}]
    return [{"role": "user", "content": content}]


def test_processor_expands_pads_left_and_marks_image_tokens(qwen_ckpt):
    p = load_qwen_processor(qwen_ckpt)
    tok = p.tokenizer
    text = p.apply_chat_template(_messages(1), add_generation_prompt=True, tokenize=False)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    images = [_image(37, 91, seed=5), _image(1000, 333, seed=6)]
    enc = p(images=images, text=[text, text], padding=True, return_tensors="pt")
    patches, grids = _ours(QWEN2, images)
    assert enc["pixel_values"].dtype == torch.float32
    assert torch.equal(enc["pixel_values"], torch.from_numpy(patches))
    assert enc["image_grid_thw"].dtype == torch.long
    assert torch.equal(enc["image_grid_thw"], torch.from_numpy(grids))
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pad_id, start, end = (tok.convert_tokens_to_ids(t) for t in
                          ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
    counts = [pq.n_tokens(g, 2) for g in grids]
    assert counts[0] != counts[1]  # so one row is padded
    for row, n in enumerate(counts):
        m = mask[row].bool()
        assert torch.all(m[:-1] <= m[1:]), "padding is not on the left"
        assert torch.all(ids[row][~m] == tok.pad_token_id)
        real = ids[row][m].tolist()
        assert real.count(pad_id) == n
        first = real.index(pad_id)
        assert real[first - 1] == start and real[first + n] == end, "pads not contiguous"
        assert real == tok(pq.expand_image_tokens(text, n))["input_ids"]
    # M-RoPE (get_rope_index) groups runs of 1 into one image each: 1 on image pads only
    assert torch.equal(enc["mm_token_type_ids"], (ids == pad_id).long())
    assert p.batch_decode(ids[:, -2:]) == ["<|im_start|> assistant"] * 2


def test_processor_output_drives_qwen25vl_mrope_with_left_padding(qwen_ckpt):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    p = load_qwen_processor(qwen_ckpt)
    tid = p.tokenizer.convert_tokens_to_ids
    text = p.apply_chat_template(_messages(1), add_generation_prompt=True, tokenize=False)
    images = [_image(37, 91, seed=5), _image(1000, 333, seed=6)]
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(SPECIALS + WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                          "rope_theta": 10000.0},
                         bos_token_id=None, eos_token_id=None),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=32, window_size=56, fullatt_block_indexes=[0]),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"))
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    enc = p(images=images, text=[text, text], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits  # [B, T, V]
        pos, _ = model.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"],
                                            enc["image_grid_thw"],
                                            attention_mask=enc["attention_mask"])
        for row, image in enumerate(images):  # each row alone, unpadded: the same numbers
            one = p(images=[image], text=[text], return_tensors="pt")
            alone, _ = model.model.get_rope_index(one["input_ids"], one["mm_token_type_ids"],
                                                  one["image_grid_thw"])
            assert torch.equal(pos[:, row, enc["attention_mask"][row].bool()], alone[:, 0])
            diff = (logits[row, -1] - model(**one).logits[0, -1]).abs().max().item()
            assert diff <= 1e-5, f"last-token logits differ by {diff} when left-padded"


def test_processor_takes_two_images_in_one_prompt_in_order(qwen_ckpt):
    p = load_qwen_processor(qwen_ckpt)
    text = p.apply_chat_template(_messages(2), add_generation_prompt=True, tokenize=False)
    images = [_image(300, 17, seed=7), _image(111, 113, seed=8)]
    enc = p(images=images, text=[text], return_tensors="pt")
    _, grids = _ours(QWEN2, images)
    want = p.tokenizer(pq.expand_image_tokens(text, [pq.n_tokens(g, 2) for g in grids]))
    assert enc["input_ids"][0].tolist() == want["input_ids"]


def test_processor_reads_transformers5_nested_processor_config(tmp_path):
    ck = _tiny_checkpoint(tmp_path / "ck", {})
    (ck / "preprocessor_config.json").unlink()
    (ck / "processor_config.json").write_text(json.dumps(
        {"image_processor": QWEN3, "processor_class": "Qwen3VLProcessor"}))
    p = load_qwen_processor(ck)
    assert type(p).__name__ == "Qwen3VLProcessor"
    assert p.image_processor.patch_size == 16
    assert p.image_processor.size.longest_edge == QWEN3["size"]["longest_edge"]


def test_processor_without_image_config_is_one_error_line(tmp_path):
    ck = _tiny_checkpoint(tmp_path / "ck", {})
    (ck / "preprocessor_config.json").unlink()
    with pytest.raises(VlmoptError, match="no image processor config"):
        load_qwen_processor(ck)


def test_preprocess_qwen_imports_and_runs_with_torch_unimportable(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    # NOTE: sys.modules[name] = None makes every `import torch` raise ImportError
    (shim / "sitecustomize.py").write_text(
        "import sys\nfor m in ('torch', 'torchvision', 'transformers'):\n"
        "    sys.modules[m] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), str(REPO)]))
    code = ("from PIL import Image\nimport vlmopt.preprocess_qwen as q\n"
            "p, g = q.pixels(Image.new('RGB', (37, 91)), q.image_config({}))\n"
            "print(p.shape[0], q.n_tokens(g, 2))\n")
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    assert check.returncode != 0  # the shim works
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    patches, grid = pq.pixels(Image.new("RGB", (37, 91)), pq.image_config({}))
    assert run.stdout.split() == [str(patches.shape[0]), str(pq.n_tokens(grid, 2))]
