"""Loading LLaVA checkpoints offline: safetensors only, config-only directories, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import BUILTIN_SYNTH_LLAVA, build_tiny_model

from vlmopt.errors import VlmoptError
from vlmopt.frontend import load as load_mod
from vlmopt.frontend.load import fingerprint, load


def _load_error(spec, **kw) -> str:
    with pytest.raises(VlmoptError) as e:
        load(spec, **kw)
    return str(e.value)


# ----------------------------------------------------------------------------- checkpoints


def test_tiny_checkpoint_loads_in_eval_mode_with_its_processor(loaded_tiny, tiny_llava):
    lm = loaded_tiny
    assert lm.has_weights and lm.path == tiny_llava
    assert not lm.model.training
    assert all(not m.training for m in lm.model.modules())
    assert lm.processor is not None and lm.processor.tokenizer.unk_token_id == 1
    assert lm.config.model_type == "llava"
    assert lm.adapter.image_token_id == lm.processor.tokenizer.convert_tokens_to_ids("<image>")
    assert len(lm.adapter.layers) == 2


def test_loaded_weights_are_the_saved_weights(loaded_tiny):
    ref = build_tiny_model().state_dict()
    got = loaded_tiny.model.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    assert all(p.dtype == torch.float32 for p in loaded_tiny.model.parameters())


def test_qwen2_gqa_checkpoint_loads_with_its_decoder_and_kv_heads(tiny_qwen2_gqa):
    lm = load(tiny_qwen2_gqa)
    assert lm.config.text_config.model_type == "qwen2"
    assert type(lm.adapter.lm).__name__ == "Qwen2Model"
    attn = lm.adapter.layers[0].self_attn
    assert attn.k_proj.out_features == 2 * attn.head_dim
    assert attn.q_proj.out_features == 4 * attn.head_dim
    ref = build_tiny_model("qwen2", kv_heads=2).state_dict()
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_fingerprint_is_stable_and_differs_between_checkpoints(loaded_tiny, tiny_llava,
                                                               tiny_qwen2_gqa):
    again = load(tiny_llava)
    assert again.fingerprint == loaded_tiny.fingerprint == fingerprint(tiny_llava)
    assert loaded_tiny.fingerprint.startswith("sha256:")
    assert fingerprint(tiny_qwen2_gqa) != loaded_tiny.fingerprint


def test_fingerprint_changes_when_weights_are_retrained_at_equal_shape(tiny_llava, tmp_path):
    retrained = shutil.copytree(tiny_llava, tmp_path / "retrained")
    model = build_tiny_model(seed=1)
    model.save_pretrained(retrained, safe_serialization=True)
    assert (retrained / "model.safetensors").stat().st_size == (
        tiny_llava / "model.safetensors").stat().st_size
    assert fingerprint(retrained) != fingerprint(tiny_llava)


@pytest.mark.parametrize("where", [0, -1])
def test_fingerprint_sees_changed_first_and_last_weights_of_a_large_file(tmp_path, where):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    w = torch.zeros(1 << 20)  # 4 MiB: larger than the bytes hashed at either end
    save_file({"w": w}, tmp_path / "model.safetensors")
    before = fingerprint(tmp_path)
    w[where] = 1.0
    save_file({"w": w}, tmp_path / "model.safetensors")
    assert fingerprint(tmp_path) != before


def test_dtype_argument_casts_the_weights(tiny_llava):
    lm = load(tiny_llava, dtype=torch.bfloat16)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- config-only


def test_config_only_directory_loads_with_seeded_random_weights(tiny_config_only):
    a, b = load(tiny_config_only, seed=0), load(tiny_config_only, seed=0)
    c = load(tiny_config_only, seed=1)
    assert not a.has_weights and a.processor is None
    assert not a.model.training
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    w = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sa[w], sc[w])
    assert all(p.device.type == "cpu" for p in a.model.parameters())


def test_config_only_directory_on_meta_device_allocates_nothing(tiny_config_only):
    lm = load(tiny_config_only, device="meta")
    params = list(lm.model.parameters())
    assert params and all(p.is_meta for p in params)
    assert lm.config.text_config.hidden_size == 32


def test_meta_device_is_refused_for_a_checkpoint_with_weights(tiny_llava):
    assert "meta" in _load_error(tiny_llava, device="meta")


# ----------------------------------------------------------------------------- errors


def test_nonexistent_path_is_an_error(tmp_path):
    msg = _load_error(tmp_path / "nope")
    assert "nope" in msg and "no such model directory" in msg


def test_a_file_is_not_a_checkpoint_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert "directory" in _load_error(tmp_path / "model.safetensors")


def test_directory_without_config_is_an_error(tmp_path):
    assert "no config.json" in _load_error(tmp_path)


def test_invalid_config_json_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert "config.json" in _load_error(tmp_path)


def test_unknown_family_is_refused_with_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    msg = _load_error(tmp_path)
    assert "unsupported model family" in msg and "'bert'" in msg
    assert ("supported: idefics3, internvl, llava, llava_next, llava_onevision, qwen2_5_vl, "
            "qwen2_vl, qwen3_vl, smolvlm") in msg


@pytest.mark.parametrize("mtype", ["llava_next_video", "gemma3", "paligemma"])
def test_llava_variants_not_yet_supported_are_refused_not_misloaded(tmp_path, mtype):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": mtype}))
    msg = _load_error(tmp_path)
    assert f"model_type '{mtype}'" in msg and "not supported yet" in msg


def test_architectures_that_contradict_the_model_type_are_refused(tmp_path):
    cfg = {"model_type": "llava", "architectures": ["LlavaNextForConditionalGeneration"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert "do not match model_type 'llava'" in _load_error(tmp_path)


def test_remote_code_config_is_refused(tmp_path):
    cfg = {"model_type": "llava", "auto_map": {"AutoModel": "modeling_x.X"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert "remote code" in _load_error(tmp_path)


def test_pickle_only_checkpoint_is_refused_without_unpickling(tiny_config_only, tmp_path,
                                                              monkeypatch):
    shutil.copy(tiny_config_only / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")

    def forbidden(*a, **kw):
        raise AssertionError("pickle weights must never be loaded")

    monkeypatch.setattr(torch, "load", forbidden)
    msg = _load_error(tmp_path)
    assert "safetensors" in msg and "pytorch_model.bin" in msg


def test_corrupt_safetensors_is_a_vlmopt_error(tiny_llava, tmp_path):
    bad = shutil.copytree(tiny_llava, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "cannot load weights" in _load_error(bad)


def test_unknown_builtin_model_lists_the_known_ones():
    msg = _load_error("builtin:nope")
    assert "builtin:nope" in msg and "builtin:synth-llava" in msg


def test_missing_builtin_checkpoint_says_how_to_train_it(tmp_path, monkeypatch):
    monkeypatch.setitem(load_mod.BUILTIN_MODELS, "builtin:synth-llava", tmp_path / "absent")
    msg = _load_error("builtin:synth-llava")
    assert "examples/train_synth.py --family llava" in msg


# ----------------------------------------------------------------------------- transformers alone

TRANSFORMERS_ONLY = textwrap.dedent(r"""
    import json, sys
    sys.modules["vlmopt"] = None  # any import of vlmopt fails: transformers alone must do
    import torch
    from PIL import Image, ImageDraw
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = sys.argv[1]
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    proc = AutoProcessor.from_pretrained(path)
    img = Image.new("RGB", (112, 112), (128, 120, 110))
    ImageDraw.Draw(img).rectangle([20, 20, 34, 34], fill=(220, 40, 40))
    # question first, then the image: the built-in model's prompt format (SynthVQA's)
    text = proc.apply_chat_template(
        [{"role": "user", "content": "What colour is the square?\n<image>"}],
        add_generation_prompt=True, tokenize=False)
    text2 = proc.apply_chat_template(  # the structured message form tokenizes the same
        [{"role": "user", "content": [{"type": "text", "text": "What colour is the square?"},
                                      {"type": "image"}]}],
        add_generation_prompt=True, tokenize=False)
    enc = proc(images=[img], text=[text], return_tensors="pt")
    enc2 = proc(images=[img], text=[text2], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    image_id = model.config.image_token_id
    print(json.dumps({
        "text": text, "same_ids": enc["input_ids"].tolist() == enc2["input_ids"].tolist(),
        "shape": list(logits.shape), "finite": bool(torch.isfinite(logits).all()),
        "n_image_tokens": int((enc["input_ids"] == image_id).sum()),
        "image_seq_length": model.config.image_seq_length,
        "unk": int((enc["input_ids"] == proc.tokenizer.unk_token_id).sum()),
        "vocab": model.config.text_config.vocab_size,
        "answer": proc.tokenizer.decode([int(logits[0, -1].argmax())]).strip(),
        "vlmopt_loaded": any(m.startswith("vlmopt.") for m in sys.modules),
    }))
""")


@pytest.mark.parametrize("which", ["tiny", "builtin"])
def test_checkpoint_loads_and_runs_with_transformers_alone(which, tiny_llava, tmp_path):
    if which == "builtin":
        if not (BUILTIN_SYNTH_LLAVA / "config.json").exists():
            pytest.skip("built-in checkpoint not trained yet (examples/train_synth_llava.py)")
        path = BUILTIN_SYNTH_LLAVA
    else:
        path = tiny_llava
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "-c", TRANSFORMERS_ONLY, str(path)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, check=False, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["text"] == "USER: What colour is the square?\n<image> ASSISTANT:"
    assert out["same_ids"]
    assert out["finite"] and not out["vlmopt_loaded"]
    assert out["n_image_tokens"] == out["image_seq_length"] == 196
    assert out["unk"] == 0
    assert out["shape"][0] == 1 and out["shape"][2] == out["vocab"]
    assert out["shape"][1] > 196
    if which == "builtin":  # a trained model answers with a word, not a special token
        assert out["answer"] not in ("", "<pad>", "<unk>", "<s>", "</s>", "<image>")


@pytest.mark.parametrize("content", [b"\xff\xfe{", b"[1, 2]", b"\"llava\""])
def test_config_that_is_not_a_utf8_json_object_is_one_error_line(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)
    assert "config.json: not" in _load_error(tmp_path)
