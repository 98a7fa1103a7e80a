"""``alia-nemo compile``: values the card fixes, derived steps, RoPE overrides transformers reads, recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alia_nemo.cli import main
from alia_nemo.config.compose import available_recipes, load_config
from alia_nemo.config.nemo_rl_schema import validate_nemo_rl
from alia_nemo.config.to_nemo_rl import DATASET_CLASS, UNPREPARED
from alia_nemo.engines.nemo_rl_prepare import compile_stage
from alia_nemo.errors import ConfigError
from alia_nemo.model.chatml import CHAT_TEMPLATE

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_recipe_compiles_with_exact_values(tiny_compiled):
    cfg, compiled = tiny_compiled
    c, d = compiled.config, compiled.derived
    assert c["policy"]["tokenizer"]["chat_template"] == CHAT_TEMPLATE
    assert c["data"]["add_eos"] is False and c["data"]["add_bos"] is True
    assert c["data"]["train"]["dataset_name"] == DATASET_CLASS
    assert c["data"]["train"]["processor"] == "alia_sft_processor"
    assert (Path(c["data"]["train"]["data_path"]) / "manifest.json").is_file()
    # 282 training conversations, global batch 16 -> 17 full steps per epoch (last partial batch dropped), 2 epochs.
    assert d["train_rows"] == 282 and d["steps_per_epoch"] == 17 and c["sft"]["max_num_steps"] == 34
    assert c["sft"]["val_period"] == 10 and c["sft"]["val_at_end"] is True
    assert c["policy"]["dtensor_cfg"]["enabled"] and not c["policy"]["megatron_cfg"]["enabled"]
    assert c["policy"]["optimizer"]["kwargs"]["lr"] == cfg.stage.lr
    warm, cosine, milestones = c["policy"]["scheduler"]
    assert warm["kwargs"]["total_iters"] == 5 and cosine["kwargs"]["T_max"] == 29 and milestones == {"milestones": [5]}
    start = Path(c["policy"]["model_name"])
    assert (start / "config.json").is_file() and (start / "tokenizer.json").is_file()
    assert c["checkpointing"]["checkpoint_dir"] == str(Path(cfg.run.output_dir).resolve() / "checkpoints")
    assert c["logger"]["tensorboard_enabled"] and not c["logger"]["wandb_enabled"]


def test_dtensor_worker_selects_nemo_rls_policy_worker(tiny_compiled, tmp_path):
    """v2 (NeMo AutoModel) by default, as upstream; v1 is the plain worker the CPU harness trains with."""
    assert tiny_compiled[1].config["policy"]["dtensor_cfg"]["_v2"] is True
    base = ["recipe=sft-alia-tiny-1n1g-dtensor", f"run.output_dir={tmp_path}"]
    v1 = compile_stage(load_config([*base, "engine.dtensor_worker=v1"]), prepare=False, materialise=False)
    assert v1.config["policy"]["dtensor_cfg"]["_v2"] is False
    with pytest.raises(ConfigError, match=r"engine\.dtensor_worker=v1 picks NeMo-RL's DTensor policy worker"):
        compile_stage(load_config([*base, "engine.dtensor_worker=v1", "engine.backend=megatron"]), prepare=False,
                      materialise=False)  # fmt: skip
    with pytest.raises(ConfigError, match="dtensor_worker"):
        load_config([*base, "engine.dtensor_worker=v3"])


def test_card_sft_on_megatron(tmp_path):
    cfg = load_config([
        "recipe=sft-alia-40b-16n4g-megatron-tp4pp4cp4-actckpt", f"run.output_dir={tmp_path}",
    ])  # fmt: skip
    c = compile_stage(cfg, prepare=False).config
    m = c["policy"]["megatron_cfg"]
    assert (m["tensor_model_parallel_size"], m["pipeline_model_parallel_size"], m["context_parallel_size"]) == (4, 4, 4)
    assert c["policy"]["make_sequence_length_divisible_by"] == 2 * 4 * 4
    assert c["policy"]["sequence_packing"]["enabled"] and c["policy"]["sequence_packing"]["train_mb_tokens"] == 32768
    assert c["policy"]["optimizer"] is None and c["policy"]["scheduler"] is None
    assert m["optimizer"]["lr"] == 1e-5 and m["scheduler"]["lr_decay_style"] == "cosine"
    assert m["scheduler"]["lr_warmup_iters"] == 5 and m["scheduler"]["lr_decay_iters"] == 712_213 // 512
    assert c["policy"]["train_global_batch_size"] == 512 and c["policy"]["max_total_sequence_length"] == 32768
    assert c["sft"]["max_num_epochs"] == 1 and c["sft"]["max_num_steps"] == 1391
    assert c["data"]["train"]["data_path"] == UNPREPARED
    assert c["policy"]["hf_config_overrides"] == {}  # SFT keeps the context of the model it starts from
    assert c["cluster"] == {"gpus_per_node": 4, "num_nodes": 16, "segment_size": None}


def test_rope_overrides_change_the_frequencies_transformers_computes(tiny_compiled, tmp_path):
    """NeMo-RL applies hf_config_overrides as AutoConfig.from_pretrained(model, **overrides)."""
    import math

    import torch
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from alia_nemo.model.architectures import get_spec

    cfg = load_config([
        "recipe=sft-alia-tiny-1n1g-dtensor", f"run.output_dir={tmp_path}", "stage.seq_length=1024",
        "stage.rope.type=llama3", "stage.rope.factor=4", "stage.rope.original_max_position_embeddings=256",
    ])  # fmt: skip
    c = compile_stage(cfg, progress=False).config
    over = c["policy"]["hf_config_overrides"]
    assert over["max_position_embeddings"] == 1024 and over["rope_parameters"]["rope_type"] == "llama3"
    base_dir = tiny_compiled[1].config["policy"]["model_name"]  # written without RoPE scaling
    base = AutoConfig.from_pretrained(base_dir)
    scaled = AutoConfig.from_pretrained(base_dir, **over)
    assert scaled.max_position_embeddings == 1024

    f_base = LlamaRotaryEmbedding(base).inv_freq
    f_scaled = LlamaRotaryEmbedding(scaled).inv_freq
    # The base model: plain RoPE at alia_tiny's theta over its head dimension (64 / 4 heads = 16: 8 frequencies).
    theta, head_dim = get_spec("alia_tiny").rope_theta, 16
    torch.testing.assert_close(f_base, 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    # llama3 at factor 4 from 256 positions (low 1, high 4): wavelengths under 256 / 4 = 64 untouched, over 256
    # divided by 4, the band between interpolated; alia_tiny's 8 frequencies fall in all three (3, 1 and 4).
    wavelen = 2 * math.pi / f_base
    smooth = (256 / wavelen - 1) / (4 - 1)
    expected = torch.where(
        wavelen < 64, f_base, torch.where(wavelen > 256, f_base / 4, (1 - smooth) * f_base / 4 + smooth * f_base)
    )
    bands = [int((wavelen < 64).sum()), int(((wavelen >= 64) & (wavelen <= 256)).sum()), int((wavelen > 256).sum())]
    assert bands == [3, 1, 4]
    torch.testing.assert_close(f_scaled, expected)
    assert torch.equal(f_scaled[:3], f_base[:3]) and not torch.allclose(f_scaled[3:], f_base[3:])
    bare = AutoConfig.from_pretrained(base_dir, rope_theta=1e6)  # why we never emit a bare rope_theta
    assert torch.allclose(LlamaRotaryEmbedding(bare).inv_freq, f_base)


@pytest.mark.parametrize("recipe", available_recipes())
def test_every_recipe_composes_and_nemo_rl_recipes_compile(recipe, tmp_path):
    cfg = load_config([f"recipe={recipe}", f"run.output_dir={tmp_path}"])
    assert cfg.recipe == recipe
    path = next((ROOT / "recipes").rglob(f"{recipe}.yaml"))
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(line.startswith("# Launch:") for line in header) and any("Tested:" in line for line in header)
    if cfg.engine.name == "nemo_rl":
        compiled = compile_stage(cfg, prepare=cfg.data.name == "sample", progress=False)
        parsed = validate_nemo_rl(compiled.config)
        assert parsed.policy.train_global_batch_size == compiled.derived["resolved"]["global_batch_size"]
        memory = compiled.derived["memory_gib"]  # estimated for Megatron layouts only
        assert (memory is not None) == (cfg.engine.backend == "megatron")
        if memory is not None:  # every shipped Megatron recipe fits its cluster's GPUs (planner)
            assert 0 < memory["total"] <= memory["budget"] == round(cfg.cluster.gpu_memory_gb * 1e9 / 1024**3, 1)


def test_recipes_are_found_recursively():
    files = {p.stem for p in (ROOT / "recipes").rglob("*.yaml")}
    assert files == set(available_recipes())
    assert {"sft-alia-tiny-1n1g-dtensor", "sft-alia-40b-16n4g-megatron-tp4pp4cp4-actckpt"} <= files


def test_compile_refusals(tmp_path):
    with pytest.raises(ConfigError, match="compile needs engine=nemo_rl"):
        compile_stage(load_config([f"run.output_dir={tmp_path}"]), prepare=False)
    with pytest.raises(ConfigError, match="cluster=local has no GPUs"):
        compile_stage(load_config(["engine=nemo_rl", f"run.output_dir={tmp_path}"]), prepare=False)
    random_7b = ["engine=nemo_rl", "cluster=mn5_acc", "model=alia_7b", "model.pretrained=null",
                 f"run.output_dir={tmp_path}"]  # fmt: skip
    # The stage is resolved first: sft's global batch 16 does not divide over 64 GPUs x micro-batch 8.
    with pytest.raises(ConfigError, match=r"global_batch_size=16 is not a multiple of .* \(8 x 64 = 512\)"):
        compile_stage(load_config(random_7b), prepare=False)
    with pytest.raises(ConfigError, match="would start from random weights"):
        compile_stage(load_config([*random_7b, "stage.global_batch_size=512"]), prepare=False)
    with pytest.raises(ConfigError, match=r"estimated \d+\.\d GiB per GPU for TP1 PP1 CP1 DP64 .*nearest here: engine"):
        compile_stage(
            load_config(["engine=nemo_rl", "cluster=mn5_acc", "model=alia_40b", "stage=sft", "data=sft_mixture",
                         f"run.output_dir={tmp_path}"]), prepare=False)  # fmt: skip


def test_cli_compile_writes_a_yaml_with_a_header(tmp_path, capsys):
    out = tmp_path / "sub" / "tiny.yaml"
    rc = main(["compile", "--out", str(out), "recipe=sft-alia-tiny-1n1g-dtensor", f"run.output_dir={tmp_path / 'run'}"])
    assert rc == 0
    text = out.read_text()
    assert text.startswith("# NeMo-RL v0.7 SFT config compiled by alia-nemo")
    loaded = yaml.safe_load(text)
    assert loaded["policy"]["tokenizer"]["chat_template"] == CHAT_TEMPLATE
    assert "34 steps" in capsys.readouterr().out
    rc = main(["compile", "--out", str(out), "engine=nemo_rl", "cluster=mn5_acc", "model=alia_40b", "stage=sft",
               "data=sft_mixture", "--no-prepare"])  # fmt: skip
    assert rc == 2 and "exceeds the 59.6 GiB" in capsys.readouterr().err


def test_train_with_nemo_rl_engine_explains_when_nemo_rl_is_missing(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("nemo_rl") is not None:
        pytest.skip("NeMo-RL is importable here")
    rc = main(["train", "recipe=sft-alia-tiny-1n1g-dtensor", f"run.output_dir={tmp_path}"])
    assert rc == 2 and "engine=nemo_rl needs NeMo-RL v0.7" in capsys.readouterr().err
