"""Shared test helpers: a tiny LLaVA checkpoint built from the synth-llava template."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmopt.data import synthvqa
from vlmopt.frontend import synth_llava

REPO = Path(__file__).resolve().parent.parent
BUILTIN_SYNTH_LLAVA = REPO / "vlmopt" / "builtin" / "synth-llava"

TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 2, "projection_dim": 32}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 512}


def make_tiny_config(decoder: str = "llama", kv_heads: int | None = None):
    """(LlavaConfig, vocab): synth-llava's layout with a tiny vision tower and text model."""
    from transformers import CLIPVisionConfig, Qwen2Config

    kv = kv_heads or TINY_TEXT["num_attention_heads"]
    cfg, vocab = synth_llava.make_config(**TINY_TEXT, num_key_value_heads=kv)
    vision = cfg.vision_config.to_dict()
    vision.update(TINY_VISION)
    vision.pop("model_type", None)
    cfg.vision_config = CLIPVisionConfig(**vision)
    if decoder == "qwen2":
        cfg.text_config = Qwen2Config(
            vocab_size=len(vocab), num_key_value_heads=kv, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0,
            **TINY_TEXT)
    elif decoder != "llama":
        raise ValueError(f"unknown decoder {decoder!r}")
    assert cfg.vision_config.image_size == synthvqa.IMAGE_SIZE
    return cfg, vocab


def build_tiny_model(decoder: str = "llama", kv_heads: int | None = None, *, cfg=None,
                     seed: int = 0):
    """The in-memory model that ``make_tiny_llava`` saves (same seed -> same weights)."""
    from transformers import LlavaForConditionalGeneration

    if cfg is None:
        cfg, _ = make_tiny_config(decoder, kv_heads)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).eval()


def make_tiny_llava(path, decoder: str = "llama", kv_heads: int | None = None,
                    weights: bool = True) -> Path:
    """Write a tiny LLaVA checkpoint directory at ``path`` and return it.

    weights=True: safetensors weights (seeded, so deterministic) + processor files.
    weights=False: config.json only (a config-only directory).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg, vocab = make_tiny_config(decoder, kv_heads)
    if not weights:
        cfg.save_pretrained(path)
        return path
    model = build_tiny_model(decoder, kv_heads, cfg=cfg)
    model.save_pretrained(path, safe_serialization=True)
    synth_llava.make_processor(vocab).save_pretrained(path)
    return path


def write_jsonl(path, rows) -> Path:
    """Write ``rows`` (dicts or raw strings) as a JSONL file."""
    path = Path(path)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GRAPH_INPUTS = ("input_ids", "pixel_values", "attention_mask", "position_ids")


def tiny_model_and_batch(*, n_layers: int = 2, kv_heads: int | None = None,
                         vision_layers: int = 1, feature_layer: int = -1, seed: int = 3,
                         data_seed: int = 5, n: int = 3):
    """An in-memory tiny LLaVA (random weights) and a left-padded batch of ``n`` SynthVQA
    samples (questions of different lengths)."""
    from vlmopt import inputs

    cfg, vocab = make_tiny_config(kv_heads=kv_heads)
    cfg.text_config.num_hidden_layers = n_layers
    cfg.vision_config.num_hidden_layers = vision_layers
    cfg.vision_feature_layer = feature_layer
    model = build_tiny_model(cfg=cfg, seed=seed)
    proc = synth_llava.make_processor(vocab)
    samples = [synthvqa.sample(data_seed, i) for i in range(n)]
    batch = inputs.encode(proc, [s.prompt for s in samples], [s.image for s in samples])
    return model, batch


def record_modules(gm, batch, targets) -> dict:
    """{target: (args, result)} of the named call_module nodes in one run of ``gm``."""
    from torch import fx

    out = {}

    class Rec(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            res = super().call_module(target, args, kwargs)
            if target in targets:
                out[target] = (args, res)
            return res

    with torch.no_grad():
        Rec(gm).run(*(batch[k] for k in gm.meta["vlmopt"]["inputs"]))
    return out


def single_sample(batch: dict, i: int) -> dict:
    """The i-th sample of a left-padded batch, alone and without its padding."""
    keep = batch["attention_mask"][i].bool()
    return {k: (v[i:i + 1] if k == "pixel_values" else v[i:i + 1, keep])
            for k, v in batch.items()}


# ------------------------------------------------------------------ tiny Qwen-VL checkpoints

QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QWEN_IDS = {"image_token_id": 60, "video_token_id": 61, "vision_start_token_id": 62,
            "vision_end_token_id": 63}


def make_tiny_qwen_config(model_type: str):
    """A tiny random-weight Qwen2-VL / Qwen2.5-VL / Qwen3-VL config (patch 4, 2x2 merge: one
    LLM token per 8x8 px; GQA; Qwen2.5: windows + one full-attention block; Qwen3: deepstack)."""
    import transformers as tf

    text = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=3, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]})
    common = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if model_type == "qwen2_vl":
        vis = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, **common)
        return tf.Qwen2VLConfig(text_config=text, vision_config=vis, **QWEN_IDS)
    if model_type == "qwen2_5_vl":
        vis = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2,
                   out_hidden_size=64, window_size=16, fullatt_block_indexes=[2], **common)
        return tf.Qwen2_5_VLConfig(text_config=text, vision_config=vis, **QWEN_IDS)
    if model_type == "qwen3_vl":
        text["head_dim"] = 16
        text["rope_parameters"]["mrope_interleaved"] = True
        vis = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2,
                   out_hidden_size=64, num_position_embeddings=64,
                   deepstack_visual_indexes=[0, 1], **common)
        return tf.Qwen3VLConfig(text_config=text, vision_config=vis, **QWEN_IDS)
    raise ValueError(model_type)


def build_tiny_qwen(model_type: str, seed: int = 0):
    from vlmopt.frontend.qwen_vl import QwenVLAdapter

    cfg = make_tiny_qwen_config(model_type)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return QwenVLAdapter.hf_class_for(model_type)(cfg).eval()


def qwen_batch(model, grids, n_text=(3, 4), seed: int = 0) -> dict:
    """A left-padded batch, one image per row (grid_thw in patches), random pixels; M-RoPE
    position ids from the model's own get_rope_index."""
    from vlmopt.frontend.load import adapter_for

    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor(grids)
    rows = []
    for i, grid in enumerate(grids):
        k = int(grid.prod()) // 4
        pre = torch.randint(4, 59, (n_text[0],), generator=g).tolist()
        post = torch.randint(4, 59, (n_text[1] + i,), generator=g).tolist()
        rows.append([*pre, 62, *([60] * k), 63, *post])
    T = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    pad = torch.tensor([T - len(r) for r in rows])
    amask = (torch.arange(T)[None] >= pad[:, None]).long()
    pix = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 4 * 4, generator=g)
    batch = {"input_ids": ids, "attention_mask": amask, "pixel_values": pix,
             "image_grid_thw": grids}
    batch["position_ids"] = adapter_for(model).default_positions(batch)
    return batch


def make_tiny_qwen_dir(path, model_type: str = "qwen2_5_vl") -> Path:
    """A tiny Qwen-VL checkpoint directory over synth-qwen's vocabulary and processor files
    (safetensors weights, seeded): loadable by vlmopt and by transformers alone."""
    import transformers as tf

    from vlmopt.frontend import synth_qwen

    vocab = synth_qwen.vocabulary()
    ids = {t: vocab.index(t) for t in synth_qwen.SPECIALS}
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=ids[synth_qwen.IM_END],
                pad_token_id=ids[synth_qwen.PAD],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [1, 1, 2]})
    common = dict(patch_size=synth_qwen.PATCH, spatial_merge_size=synth_qwen.MERGE,
                  temporal_patch_size=synth_qwen.TEMPORAL, in_channels=3)
    tok_ids = dict(image_token_id=ids[synth_qwen.IMAGE_TOKEN],
                   video_token_id=ids[synth_qwen.VIDEO_TOKEN],
                   vision_start_token_id=ids[synth_qwen.VISION_START],
                   vision_end_token_id=ids[synth_qwen.VISION_END])
    if model_type == "qwen2_vl":
        vis = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, **common)
        cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vis, **tok_ids)
    elif model_type == "qwen2_5_vl":
        vis = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                   out_hidden_size=32, window_size=synth_qwen.WINDOW,
                   fullatt_block_indexes=[1], **common)
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vis, **tok_ids)
    else:
        text["head_dim"] = 8
        vis = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                   out_hidden_size=32, num_position_embeddings=64,
                   deepstack_visual_indexes=[0], **common)
        cfg = tf.Qwen3VLConfig(text_config=text, vision_config=vis, **tok_ids)
    from vlmopt.frontend.qwen_vl import QwenVLAdapter

    torch.manual_seed(0)
    model = QwenVLAdapter.hf_class_for(model_type)(cfg).eval()
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    synth_qwen.save_processor(path, vocab)
    return path


def write_mixed_size_data(src_jsonl: Path, out: Path, sizes=((112, 112), (96, 128))) -> Path:
    """A copy of a SynthVQA dataset whose images alternate between ``sizes`` (W, H)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, line in enumerate(src_jsonl.read_text().splitlines()):
        rec = json.loads(line)
        im = Image.open(src_jsonl.parent / rec["image"]).convert("RGB")
        im = im.resize(sizes[i % len(sizes)])
        name = f"img_{i}.png"
        im.save(out / name)
        rec["image"] = name
        lines.append(json.dumps(rec))
    (out / "data.jsonl").write_text("\n".join(lines) + "\n")
    return out / "data.jsonl"


def clearest_per_size(lm, gm, data) -> dict:
    """{visual tokens: (decision margin, batch)}: per image size of the dataset at ``data``,
    the record whose selection picks win clearest (vlmopt.emit.decision_margins)."""
    from vlmopt import emit, inputs
    from vlmopt.data.dataset import load_records
    from vlmopt.ir.capture import complete_inputs

    seen: dict = {}
    for r in load_records(str(data)):
        batch = complete_inputs(inputs.encode(lm.processor, [r.prompt], [r.load_image()]))
        n = int(batch["image_grid_thw"].prod()) // 4
        m = float(emit.decision_margins(gm, batch)[0])
        if m > seen.get(n, (-1.0,))[0]:
            seen[n] = (m, batch)
    return seen
