"""The CPT stages: batch / steps / tokens arithmetic, RoPE that really changes the frequencies, `show`."""

from __future__ import annotations

import math

import pytest
import torch

from alia_nemo.cli import main
from alia_nemo.config.compose import load_config
from alia_nemo.config.resolve import resolve
from alia_nemo.errors import ConfigError
from alia_nemo.model.architectures import get_spec

CPT = ["data=long_context", "model=alia_40b"]


def test_cpt_32k_arithmetic():
    cfg = load_config(["stage=cpt_32k", *CPT])
    s, r = cfg.stage, resolve(cfg)
    assert (s.seq_length, s.lr, s.lr_scheduler, s.warmup_steps) == (32768, 9e-7, "constant", 0)
    assert r.global_batch_size == 128  # 4,194,304 / 32,768 exactly
    assert r.steps == 477 == math.ceil(2_000_000_000 / (128 * 32768))
    assert r.tokens == 477 * 128 * 32768 == 2_000_683_008
    assert r.train_rows == 477 * 128 and r.train_tokens == r.tokens  # windows to pack: every step's, whole
    assert s.rope.type == "llama3" and s.rope.factor == 8.0 and s.rope.original_max_position_embeddings == 8192


@pytest.mark.parametrize(("dp", "gbs"), [(1, 26), (2, 26), (4, 24), (8, 24), (16, 32), (64, 64)])
def test_cpt_160k_batch_rounds_to_a_multiple_of_dp(dp, gbs):
    cfg = load_config(["stage=cpt_160k", *CPT, "engine=nemo_rl", "cluster=mn5_acc",
                       f"engine.tensor_parallel={64 // dp if 64 // dp <= 4 else 4}",
                       f"engine.context_parallel={max(1, 64 // dp // 4)}"])  # fmt: skip
    s, r = cfg.stage, resolve(cfg)
    assert r.layout["dp"] == dp
    assert s.seq_length == 163840 and s.rope.factor == 40.0
    assert r.global_batch_size == gbs and gbs % dp == 0
    assert r.steps == math.ceil(36_800_000_000 / (gbs * 163840))
    assert r.steps * gbs * 163840 >= 36_800_000_000 > (r.steps - 1) * gbs * 163840


def test_explicit_values_win():
    cfg = load_config(["stage=cpt_160k", *CPT, "stage.global_batch_size=32", "stage.max_steps=10"])
    assert (resolve(cfg).global_batch_size, resolve(cfg).steps) == (32, 10)
    theta = load_config(["stage=cpt_32k", *CPT, "stage.rope.type=theta", "stage.rope.theta=500000"]).stage.rope
    assert theta.settings().hf_rope_parameters(10000.0) == {"rope_type": "default", "rope_theta": 500000.0}


def test_stage_and_data_must_match():
    with pytest.raises(ConfigError, match=r"stage.kind=cpt does not go with data.format=mixture"):
        load_config(["stage=cpt_32k"])
    with pytest.raises(ConfigError, match=r"stage.kind=sft does not go with data.format=text_corpus"):
        load_config(["data=cpt_sample"])
    with pytest.raises(ConfigError, match=r"needs stage.tokens_per_update"):
        load_config(["stage=cpt_32k", *CPT, "stage.tokens_per_update=null"])


def _inv_freq(cfg) -> torch.Tensor:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    spec = get_spec(cfg.model.arch)
    return LlamaRotaryEmbedding(spec.hf_config(cfg.stage.seq_length, cfg.stage.rope.settings())).inv_freq


def test_rope_scaling_changes_the_inverse_frequencies():
    base = _inv_freq(load_config(["model=alia_40b", "stage=sft"]))
    f32 = _inv_freq(load_config(["stage=cpt_32k", *CPT]))
    f160 = _inv_freq(load_config(["stage=cpt_160k", *CPT]))
    head_dim = 128
    assert torch.allclose(base, 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    assert torch.allclose(f32[0], base[0]) and torch.allclose(f160[0], base[0])  # high frequencies kept
    assert torch.allclose(f32[-1], base[-1] / 8) and torch.allclose(f160[-1], base[-1] / 40)  # low ones scaled
    assert (f160 <= f32 + 1e-12).all() and not torch.allclose(f32, base)
    theta = _inv_freq(load_config(["stage=cpt_32k", *CPT, "stage.rope.type=theta", "stage.rope.theta=1e6"]))
    assert torch.allclose(theta, 1.0 / 1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim))


def test_show_prints_the_derived_numbers(capsys):
    assert main(["show", "stage=cpt_32k", *CPT]) == 0
    out = capsys.readouterr().out
    assert "# derived:" in out and "global batch 128 windows" in out and "training windows 61,056" in out
    assert "steps 477 = ceil(2,000,000,000 budget / 4,194,304)" in out and "tokens trained 2,000,683,008" in out
