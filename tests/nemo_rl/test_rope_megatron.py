"""RoPE on the Megatron backend: the rotary frequencies Megatron-Core trains with equal the ones transformers (and
vLLM) compute from the config.json we compile and export.

What reaches Megatron-Core, read from Megatron-Bridge's Llama bridge at the commit NeMo-RL v0.7.0 pins (upstream
554c7b9 for the fork 151168f; llama_bridge.py provider_bridge, model_bridge.py CONFIG_MAPPING, gpt_provider.py):
  - rope_parameters["rope_theta"]          -> rotary_base
  - rope_parameters["rope_type"] == llama3 -> rope_scaling=True
  - rope_parameters["factor"] (default 8)  -> rope_scaling_factor
  - partial_rotary_factor                  -> rotary_percent (forced to 1.0 for Llama)
  - max_position_embeddings                -> seq_length (not used for the frequencies)
  - low_freq_factor, high_freq_factor, original_max_position_embeddings: dropped; Megatron-Core's
    RotaryEmbedding._apply_scaling keeps its defaults 1, 4 and 8192 (megatron-core 0.16.1, identical at the pin).
Megatron-Core's own RotaryEmbedding (test extra, CPU) is built with exactly those, and compared with transformers'
rotary initialisation of the config NeMo-RL builds (``AutoConfig.from_pretrained(model_name, **hf_config_overrides)``,
the same call its DTensor workers and checkpoint converters make).
"""

from __future__ import annotations

import pytest
import torch

from alia_nemo.config.compose import available_recipes, load_config
from alia_nemo.engines.nemo_rl_prepare import compile_stage
from alia_nemo.errors import ConfigError
from alia_nemo.model.architectures import get_spec

MEGATRON_RECIPES = [r for r in available_recipes() if getattr(load_config([f"recipe={r}"]).engine, "backend", None)
                    == "megatron"]  # fmt: skip


def hf_inv_freq(config) -> torch.Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        theta = config.rope_parameters["rope_theta"]
        return 1.0 / theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float()


def megatron_inv_freq(config) -> torch.Tensor:
    """Megatron-Core's RotaryEmbedding, given what Megatron-Bridge's Llama bridge derives from ``config``."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = config.rope_parameters
    llama3 = rope.get("rope_type") == "llama3"
    return RotaryEmbedding(
        kv_channels=config.head_dim, rotary_percent=1.0, rotary_base=rope["rope_theta"], rope_scaling=llama3,
        rope_scaling_factor=rope.get("factor", 8.0) if llama3 else 8.0, use_cpu_initialization=True,
    ).inv_freq.float()  # fmt: skip


def _model_dir(path, arch: str, stage: str | None = None):
    """A config.json for ``arch``: the base model (native context, no scaling), or a stage's final/."""
    cfg = load_config([f"model={arch}", f"stage={stage}", "data=cpt_sample"] if stage else [f"model={arch}"])
    seq = cfg.stage.seq_length if stage else None
    get_spec(arch).hf_config(seq, cfg.stage.rope.settings() if stage else None).save_pretrained(path)
    return path


def _nemo_rl_config(compiled):
    from transformers import AutoConfig

    policy = compiled.config["policy"]
    return AutoConfig.from_pretrained(policy["model_name"], **policy["hf_config_overrides"])


@pytest.mark.parametrize("recipe", MEGATRON_RECIPES)
def test_megatron_trains_the_rotary_frequencies_its_config_json_declares(recipe, tmp_path):
    cfg = load_config([f"recipe={recipe}"])
    # CPT stages start from the base model; the 40B SFT from the 160k stage's final/ (its RoPE comes from there);
    # the 2b/7b SFT recipes from their base models (no scaling).
    stage = "cpt_160k" if cfg.stage.kind in ("sft", "dpo") and cfg.model.arch == "alia_40b" else None
    start = _model_dir(tmp_path / "start", cfg.model.arch, stage)
    cfg = load_config([f"recipe={recipe}", f"run.output_dir={tmp_path / 'run'}", f"model.pretrained={start}"])
    config = _nemo_rl_config(compile_stage(cfg, prepare=False))
    hf, mcore = hf_inv_freq(config), megatron_inv_freq(config)
    assert hf.shape == mcore.shape == (config.head_dim // 2,)
    torch.testing.assert_close(mcore, hf, rtol=1e-6, atol=0)
    rope = config.rope_parameters
    expected = {"cpt_32k": (8.0, 32768), "cpt_160k": (40.0, 163840)}.get(cfg.stage.name)
    if cfg.model.arch == "alia_40b":  # the card's chain: 32k at factor 8, then 160k (and SFT on it) at factor 40
        assert rope["rope_type"] == "llama3" and rope["original_max_position_embeddings"] == 8192
        assert (rope["factor"], config.max_position_embeddings) == (expected or (40.0, 163840))


def test_the_old_4096_original_context_would_train_other_frequencies_and_is_refused(tmp_path):
    """What the stages declared before: transformers honours 4096, Megatron-Core silently uses 8192."""
    recipe = "recipe=cpt160k-alia-40b-16n4g-megatron-tp4pp2cp8-actckpt"
    start = _model_dir(tmp_path / "base", "alia_40b")
    old = [recipe, f"run.output_dir={tmp_path / 'run'}", f"model.pretrained={start}",
           "stage.rope.original_max_position_embeddings=4096"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"original_max_position_embeddings=4096 \(Megatron-Core uses 8192\)"):
        compile_stage(load_config(old), prepare=False, materialise=False)
    # What it would have trained: a band of frequencies off by more than 1%, up to a factor 40 apart.
    dtensor = compile_stage(load_config([*old, "engine.backend=dtensor", "engine.pipeline_parallel=1",
                                         "engine.context_parallel=1", "engine.sequence_packing=false"]),
                            prepare=False, materialise=False)  # fmt: skip
    config = _nemo_rl_config(dtensor)  # DTensor honours the declared values: allowed there
    hf, mcore = hf_inv_freq(config), megatron_inv_freq(config)
    ratio = torch.maximum(hf / mcore, mcore / hf)
    assert int((ratio > 1.01).sum()) >= 8 and float(ratio.max()) > 10


def test_a_starting_model_declaring_another_llama3_context_is_refused_on_megatron(tmp_path):
    """SFT keeps its starting model's RoPE: a final/ written with 4096 would be trained at 8192 by Megatron."""
    from transformers import AutoConfig

    start = _model_dir(tmp_path / "old_final", "alia_40b", "cpt_160k")
    config = AutoConfig.from_pretrained(start)
    config.rope_parameters = {**config.rope_parameters, "original_max_position_embeddings": 4096}
    config.save_pretrained(start)
    cfg = load_config(["recipe=sft-alia-40b-16n4g-megatron-tp4pp4cp4-actckpt", f"run.output_dir={tmp_path / 'r'}",
                       f"model.pretrained={start}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"the starting model .*old_final asks for llama3 RoPE"):
        compile_stage(cfg, prepare=False, materialise=False)
