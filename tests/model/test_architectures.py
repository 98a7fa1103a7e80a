"""ALIA architecture registry: exact parameter counts three ways, config translations, RoPE."""

from __future__ import annotations

import pytest
import torch

from alia_nemo.model.architectures import (
    ARCHITECTURES,
    RopeSettings,
    count_hf_meta,
    count_megatron_meta,
    get_spec,
    parameter_report,
)

# (total, embedding): 40b from the model card; 2b/7b are salamandra-2b/7b's published sizes.
EXPECTED = {
    "alia_tiny": (328_256, 65_536),
    "alia_2b": (2_253_490_176, 524_288_000),
    "alia_7b": (7_768_117_248, 1_048_576_000),
    "alia_40b": (40_433_885_184, 2_097_152_000),
}


def test_registry_has_the_four_sizes():
    assert set(ARCHITECTURES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_analytic_count(name):
    spec = get_spec(name)
    assert (spec.total_parameters(), spec.embedding_parameters()) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_transformers_meta_count(name):
    assert count_hf_meta(get_spec(name)) == dict(zip(("total", "embedding"), EXPECTED[name]))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_megatron_core_meta_count(name):
    # megatron-core 0.16 (test extra) builds the full model on the meta device on a CPU: no reduced-depth
    # build scaled per layer is needed.
    assert count_megatron_meta(get_spec(name)) == dict(zip(("total", "embedding"), EXPECTED[name]))


def test_40b_breakdown_matches_card():
    s = get_spec("alia_40b")
    assert s.layer_parameters() == 150_994_944 + 603_979_776 + 2 * 8192
    assert 2 * 2_097_152_000 + 48 * s.layer_parameters() + 8192 == 40_433_885_184
    assert (s.num_layers, s.hidden_size, s.num_attention_heads, s.num_key_value_heads, s.intermediate_size) == (
        48,
        8192,
        64,
        8,
        24576,
    )
    assert (s.vocab_size, s.rms_norm_eps, s.rope_theta, s.head_dim, s.tie_word_embeddings) == (
        256000,
        1e-5,
        10000.0,
        128,
        False,
    )


def test_tiny_is_same_family_and_small():
    tiny = get_spec("alia_tiny")
    assert 100_000 < tiny.total_parameters() < 1_000_000
    assert (
        tiny.num_attention_heads % tiny.num_key_value_heads == 0 and tiny.num_key_value_heads < tiny.num_attention_heads
    )


def test_hf_config_fields():
    cfg = get_spec("alia_40b").hf_config(32768, RopeSettings("llama3", factor=8.0))
    assert cfg.model_type == "llama" and cfg.max_position_embeddings == 32768
    assert (cfg.hidden_act, cfg.attention_bias, cfg.mlp_bias, cfg.tie_word_embeddings) == ("silu", False, False, False)
    assert cfg.rope_parameters == {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 4096,
    }
    assert get_spec("alia_40b").hf_config().max_position_embeddings == 4096


def _inv_freq(cfg):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        theta = cfg.rope_parameters["rope_theta"]
        return 1.0 / (theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim))
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")[0]


def test_rope_scaling_changes_the_frequencies():
    spec = get_spec("alia_40b")
    base = _inv_freq(spec.hf_config())
    scaled = _inv_freq(spec.hf_config(32768, RopeSettings("llama3", factor=8.0)))
    assert torch.allclose(scaled[:8], base[:8])  # high frequencies kept (Llama-3.1 scaling)
    assert torch.allclose(scaled[-4:], base[-4:] / 8.0)  # low frequencies divided by the factor
    theta = _inv_freq(spec.hf_config(32768, RopeSettings("theta", theta=500000.0)))
    assert theta[-1] < base[-1] / 10


def test_megatron_kwargs():
    kw = get_spec("alia_40b").megatron_kwargs(32768, RopeSettings("llama3", factor=8.0))
    assert kw == {
        "num_layers": 48,
        "hidden_size": 8192,
        "ffn_hidden_size": 24576,
        "num_attention_heads": 64,
        "num_query_groups": 8,
        "kv_channels": 128,
        "gated_linear_unit": True,
        "activation": "silu",
        "normalization": "RMSNorm",
        "layernorm_epsilon": 1e-5,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "share_embeddings_and_output_weights": False,
        "position_embedding_type": "rope",
        "rotary_base": 10000.0,
        "rope_scaling": True,
        "rope_scaling_factor": 8.0,
        "seq_length": 32768,
        "vocab_size": 256000,
    }


def test_unknown_arch_lists_known_ones():
    with pytest.raises(KeyError, match="alia_40b"):
        get_spec("alia_13b")


def test_parameter_report_agrees_for_40b():
    report = parameter_report("alia_40b")
    assert report["agree"] is True
    for method in ("analytic", "transformers_meta", "megatron_core_meta"):
        assert report[method] == {"total": 40_433_885_184, "embedding": 2_097_152_000}
