"""The analytic cost model (vlmopt.cost) against FlopCounterMode and hand computations."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlmopt import cost
from vlmopt.frontend.load import model_shapes

IMAGE_TOKEN = 5


def llava_config(decoder: str = "llama", kv_heads: int = 4, feature_layer=-2,
                 strategy: str = "default"):
    """Tiny LLaVA config: CLIP 32px/8px patches (16 patches + CLS), 2-layer decoder."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=8,
                              projection_dim=32)
    text_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[decoder]
    text = text_cls(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=kv_heads,
                    max_position_embeddings=256)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                      vision_feature_layer=feature_layer,
                      vision_feature_select_strategy=strategy, image_seq_length=16)
    cfg._attn_implementation = "sdpa"
    return cfg


def llava_7b_config():
    """LLaVA-1.5-7B shapes: CLIP ViT-L/14-336, 1024->4096->4096 projector, Llama-2-7B."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14,
                              projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=576, dtype="float16")
    cfg._attn_implementation = "sdpa"
    return cfg


def prompt(s: cost.ModelShapes, n_text: int, image_token: int, batch: int = 1) -> dict:
    """n_text text tokens around one image's placeholder tokens, and a zero image."""
    before = n_text // 2
    row = [1] * before + [image_token] * s.n_visual + [2] * (n_text - before)
    return {"input_ids": torch.tensor([row] * batch),
            "pixel_values": torch.zeros(batch, 3, s.image_size, s.image_size)}


def assert_close(measured: int, analytic: int, what: str, rel: float = 0.01) -> None:
    assert abs(measured - analytic) <= rel * measured, (
        f"{what}: FlopCounterMode {measured:,} vs analytic {analytic:,} "
        f"({(analytic - measured) / measured:+.3%})")


def random_llava(cfg):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


TINY_CASES = {
    "llama_mha": {},
    "llama_gqa": {"kv_heads": 2},
    "qwen2_gqa": {"decoder": "qwen2", "kv_heads": 2},
    "two_feature_layers": {"feature_layer": [-2, -1]},
    "full_strategy_keeps_cls": {"strategy": "full"},
}


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_analytic_prefill_matches_flop_counter_per_node_on_tiny_llava(case):
    cfg = llava_config(**TINY_CASES[case])
    s = model_shapes(cfg)
    measured = cost.measure_prefill_breakdown(random_llava(cfg), prompt(s, 7, IMAGE_TOKEN))
    analytic = cost.prefill_flops(s, cost.baseline_layers(s, 7))
    assert measured["other"] == 0, measured
    for node, flops in analytic.items():
        assert_close(measured[node], flops, f"{case} {node}")


def test_fake_tensor_measurement_equals_counting_a_real_forward():
    from torch.utils.flop_counter import FlopCounterMode

    cfg = llava_config(kv_heads=2)
    s = model_shapes(cfg)
    model, batch = random_llava(cfg), prompt(s, 5, IMAGE_TOKEN)
    cost.register_sdpa_flop_formulas()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(**batch, logits_to_keep=1, use_cache=False)
    assert cost.measure_prefill_flops(model, batch) == fc.get_total_flops()


def test_cpu_flash_sdpa_is_counted_like_the_math_backend():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = llava_config(kv_heads=2)
    s = model_shapes(cfg)
    model, batch = random_llava(cfg), prompt(s, 5, IMAGE_TOKEN)
    default = cost.measure_prefill_flops(model, batch)
    with sdpa_kernel(SDPBackend.MATH):
        math = cost.measure_prefill_flops(model, batch)
    assert default == math == cost.prefill_flops(s, cost.baseline_layers(s, 5))["total"]


def test_batch_scales_every_node_linearly():
    cfg = llava_config()
    s = model_shapes(cfg)
    measured = cost.measure_prefill_flops(random_llava(cfg), prompt(s, 6, IMAGE_TOKEN, batch=3))
    assert_close(measured, cost.prefill_flops(s, cost.baseline_layers(s, 6), batch=3)["total"],
                 "batch 3", rel=0)


def test_llava_7b_shape_matches_flop_counter_under_fake_tensors(capsys):
    cfg = llava_7b_config()
    s = model_shapes(cfg)
    assert (s.n_vision_tokens, s.n_visual, s.proj_in, s.bytes_per_el) == (577, 576, 1024, 2)
    measured = cost.measure_prefill_breakdown(cost.fake_llava(cfg), prompt(s, 20, 32000))
    analytic = cost.prefill_flops(s, cost.baseline_layers(s, 20))
    with capsys.disabled():
        print(f"\nLLaVA-1.5-7B prefill, 20 text + 576 image tokens: "
              f"FlopCounterMode {measured['total']:.6e}, analytic {analytic['total']:.6e}")
    for node, flops in analytic.items():
        assert_close(measured[node], flops, f"7B {node}")


def test_llava_7b_meta_model_is_measured_without_allocating():
    from transformers import LlavaForConditionalGeneration

    cfg = llava_7b_config()
    s = model_shapes(cfg)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    measured = cost.measure_prefill_flops(model, prompt(s, 20, 32000))
    assert_close(measured, cost.prefill_flops(s, cost.baseline_layers(s, 20))["total"], "meta")


def test_llava_7b_decoder_reproduces_published_3_82_tmac_baseline():
    # methods.md 11.3 convention: n_t = 0, 576 visual tokens, decoder layers only, c = 3, MACs
    s = model_shapes(llava_7b_config())
    macs = sum(cost.layer_flops(s, spec) for spec in cost.baseline_layers(s, 0)) / 2
    assert macs == pytest.approx(3.82e12, rel=0.01)
    # vision tower: methods.md quotes ~0.19 TMAC (c = 2) for CLIP ViT-L/14-336 on 577 tokens
    assert cost.vision_flops(s) / 2 == pytest.approx(0.19e12, rel=0.02)


def small_shapes(**kw) -> cost.ModelShapes:
    s = model_shapes(llava_config(kv_heads=2))  # d 64, m 96, 4 heads x 16, d_kv 32
    return dataclasses.replace(s, **kw)


def test_frozen_visual_layer_skips_visual_queries_o_proj_and_ffn():
    s = small_shapes()
    n, nv = 30, 20
    nt = n - nv
    full = cost.layer_flops(s, cost.LayerSpec(n, nv))
    frozen = cost.layer_flops(s, cost.LayerSpec(n, nv, frozen_visual=True))
    # by hand (MACs): q 64*64, o 64*64, FFN 3*64*96 per visual token; attention rows 2*4*16*n
    saved_macs = nv * (64 * 64 + 64 * 64 + 3 * 64 * 96) + 2 * 4 * 16 * nv * n
    assert full - frozen == 2 * saved_macs
    # and the absolute value: k, v for all n; q, o, FFN and attention rows for text only
    assert frozen == 2 * (n * 2 * 64 * 32 + nt * (2 * 64 * 64 + 3 * 64 * 96) + 2 * 4 * nt * n * 16)


def test_low_rank_q_and_k_cost_d_r_plus_r_d_out_per_token():
    s = small_shapes()
    n, r = 30, 8
    dense = cost.layer_flops(s, cost.LayerSpec(n, 20))
    low = cost.layer_flops(s, cost.LayerSpec(n, 20, q_rank=r, k_rank=r))
    # q: n*64*64 -> n*(64*8 + 8*64); k: n*64*32 -> n*(64*8 + 8*32)
    saved_macs = n * (64 * 64 - (64 * 8 + 8 * 64)) + n * (64 * 32 - (64 * 8 + 8 * 32))
    assert dense - low == 2 * saved_macs
    both = cost.layer_flops(s, cost.LayerSpec(n, 20, frozen_visual=True, q_rank=r))
    frozen = cost.layer_flops(s, cost.LayerSpec(n, 20, frozen_visual=True))
    assert frozen - both == 2 * 10 * (64 * 64 - 2 * 64 * 8)  # low-rank q on the 10 text tokens


def test_kv_cache_bytes_are_two_tensors_of_kv_len_by_kv_heads_by_head_dim():
    s = small_shapes(bytes_per_el=2)
    assert cost.kv_cache_bytes(s, [100, 40]) == [2 * 100 * 2 * 16 * 2, 2 * 40 * 2 * 16 * 2]
    assert cost.kv_cache_bytes(s, [100, 40], bytes_per_el=1) == [6400, 2560]


def test_decode_token_costs_projections_ffn_attention_over_cache_and_lm_head():
    s = small_shapes()
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96  # q, k, v, o, FFN (MACs)
    expected = 2 * (per_layer + 2 * 4 * 16 * 101) + 2 * (per_layer + 2 * 4 * 16 * 41) \
        + 2 * 64 * 100  # attention over kv_len + 1 keys; LM head over vocab 100
    assert cost.decode_flops_per_token(s, [100, 40]) == expected
    low = cost.decode_flops_per_token(s, [100, 40], [cost.LayerSpec(1, 0, q_rank=8)] * 2)
    assert expected - low == 2 * 2 * (64 * 64 - 2 * 64 * 8)


def test_prefill_visual_count_into_projector_is_overridable():
    s = small_shapes()
    full = cost.prefill_flops(s, cost.baseline_layers(s, 4))
    cut = cost.prefill_flops(s, cost.baseline_layers(s, 4), n_visual_in=4)
    assert full["project"] == 2 * 16 * (32 * 64 + 64 * 64)
    assert cut["project"] == full["project"] // 4
    assert full["head"] == 2 * 64 * 100


@pytest.mark.parametrize("decoder", ["llama", "qwen2"])
def test_weight_bytes_sum_to_the_models_parameter_bytes(decoder):
    cfg = llava_config(decoder=decoder, kv_heads=2)
    s = model_shapes(cfg, bytes_per_el=4)
    model = random_llava(cfg)
    want = sum(p.numel() * p.element_size() for p in model.parameters())
    assert cost.weight_bytes(s)["total"] == want


def test_shapes_read_dtype_bytes_and_accept_an_override():
    assert model_shapes(llava_7b_config()).bytes_per_el == 2
    assert model_shapes(llava_config()).bytes_per_el == 4
    assert model_shapes(llava_7b_config(), bytes_per_el=1).bytes_per_el == 1


def test_layer_spec_rejects_more_visual_than_total_tokens():
    with pytest.raises(ValueError):
        cost.LayerSpec(10, 11)


def test_builtin_synth_llava_shape_matches_flop_counter_and_llm_dominates():
    from vlmopt.frontend import synth_llava

    cfg, _ = synth_llava.make_config()  # the shipped checkpoint's exact shapes
    s = model_shapes(cfg)
    measured = cost.measure_prefill_breakdown(cost.fake_llava(cfg), prompt(s, 16, 4))
    analytic = cost.prefill_flops(s, cost.baseline_layers(s, 16))
    for node, flops in analytic.items():
        assert_close(measured[node], flops, f"synth-llava {node}")
    llm = sum(v for k, v in analytic.items() if k.startswith("layer_"))
    share = llm / analytic["total"]
    assert share >= 0.80, f"LLM prefill share {share:.3f} (a real LLaVA is > 0.9)"
    assert s.n_visual >= 144 and s.n_layers >= 6
