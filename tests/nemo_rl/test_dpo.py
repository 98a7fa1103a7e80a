"""DPO on NeMo-RL: the compiled config (strict mirror, values, refusals, memory), our preference dataset and
processor, and, in the harness, NeMo-RL's own DPO data path, MasterConfig and its real DPO loop on CPU.

Unmarked tests run without NeMo-RL. ``nemo_rl``-marked ones need it (tests/nemo_rl/harness.sh). The real loop
(``dpo.setup`` + ``dpo_train`` through ``alia-nemo train``) needs one workaround on a CPU, applied only to this
test's processes (see :data:`UNPINNED_SITECUSTOMIZE`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from alia_nemo.config.compose import load_config
from alia_nemo.config.nemo_rl_schema import NemoRLConfigError, NemoRLDPOConfig, validate_nemo_rl
from alia_nemo.config.planner import Gpu, Layout, memory_breakdown, parameters_on_gpu, plan, reference_host_gib
from alia_nemo.config.resolve import resolve
from alia_nemo.config.to_nemo_rl import PREFERENCE_DATASET_CLASS, UNPREPARED, header, memory_estimate
from alia_nemo.engines.nemo_rl import DPO_CONFIG_NAME, MaskedPairs, MetricsRecorder, masked_report, write_run_config
from alia_nemo.engines.nemo_rl_prepare import compile_stage
from alia_nemo.errors import ConfigError
from alia_nemo.model.architectures import get_spec
from alia_nemo.model.chatml import IM_END, tokenize_preferences
from alia_nemo.nemo_rl import AliaPreferenceDataset, alia_preference_processor
from alia_nemo.nemo_rl.dataset import AliaDataError
from tests.helpers import NEMO_RL_HARNESS, read_jsonl
from tests.nemo_rl.test_plugins import _NoEncoding

TINY = "dpo-alia-tiny-1n1g-dtensor"
BIG = "dpo-alia-40b-16n4g-megatron-tp4pp2-actckpt"
# data=dpo_sample: 282 training pairs (300 minus 18 held out) / global batch 16 -> 17 steps per epoch, 4 epochs.
TINY_STEPS = 68
SPEC_40B = get_spec("alia_40b")
GIB = 1024**3


@pytest.fixture(scope="module")
def dpo_compiled(tmp_path_factory, _isolated_cache):
    """(composed config, compiled) of the tiny DPO recipe: its pairs prepared by `alia-nemo prepare`'s path."""
    out = tmp_path_factory.mktemp("dpo_tiny")
    cfg = load_config([f"recipe={TINY}", f"run.output_dir={out}"])
    return cfg, compile_stage(cfg, progress=False)


@pytest.fixture(scope="module")
def pairs(dpo_compiled):
    """The prepared pairs, both splits, as our dataset class reads them."""
    entry = dpo_compiled[1].config["data"]["train"]
    return AliaPreferenceDataset(**entry), AliaPreferenceDataset(**{**entry, "split": "validation"})


def _big(tmp_path: Path, *extra: str):
    return load_config([f"recipe={BIG}", f"run.output_dir={tmp_path}", *extra])


# --- compile -----------------------------------------------------------------------------------------------------


def test_tiny_dpo_recipe_compiles_into_nemo_rls_dpo_sections(dpo_compiled):
    cfg, compiled = dpo_compiled
    c, d = compiled.config, compiled.derived
    assert list(c) == ["policy", "data", "dpo", "checkpointing", "logger", "cluster"]
    assert isinstance(validate_nemo_rl(c, get_spec("alia_tiny")), NemoRLDPOConfig)
    dpo, s = c["dpo"], cfg.stage
    assert (d["train_rows"], d["val_rows"], d["steps_per_epoch"]) == (282, 18, 17)
    assert dpo == {
        "max_num_epochs": 4, "max_num_steps": TINY_STEPS, "val_period": 10, "val_batches": 8,
        "val_global_batch_size": 16, "val_micro_batch_size": 1, "val_at_start": False, "val_at_end": True,
        "seed": 42, "reference_policy_kl_penalty": s.dpo.beta, "preference_average_log_probs": False,
        "sft_average_log_probs": False, "preference_loss_weight": 1.0, "sft_loss_weight": 0.0,
    }  # fmt: skip
    assert s.dpo.beta == 0.1 and cfg.run.eval_every == 10
    p = c["policy"]
    assert p["optimizer"]["kwargs"]["lr"] == s.lr == 1e-3
    assert (p["train_global_batch_size"], p["train_micro_batch_size"]) == (16, 8)  # pairs (NeMo-RL doubles them)
    assert p["sequence_packing"] == {"enabled": False} and p["dynamic_batching"] == {"enabled": False}
    assert p["max_total_sequence_length"] == c["data"]["max_input_seq_length"] == 256
    data = c["data"]
    assert set(data) == {"max_input_seq_length", "shuffle", "num_workers", "train", "validation"}
    for split in ("train", "validation"):
        entry = data[split]
        assert entry["dataset_name"] == PREFERENCE_DATASET_CLASS == "alia_nemo.nemo_rl.AliaPreferenceDataset"
        assert entry["processor"] == "alia_preference_processor" and entry["split"] == split
        assert (Path(entry["data_path"]) / "manifest.json").is_file()
    assert json.loads((Path(data["train"]["data_path"]) / "manifest.json").read_text())["format"] == "preference"
    assert c["checkpointing"]["metric_name"] is None and c["checkpointing"]["save_period"] == 10


def test_the_compiled_file_says_dpo_and_names_run_dpo(tmp_path):
    out = tmp_path / "dpo"
    path, config = write_run_config(load_config([f"recipe={TINY}", f"run.output_dir={out}"]), out)
    assert path == out / DPO_CONFIG_NAME == out / "nemo_rl_dpo.yaml"
    text = path.read_text()
    assert text.startswith("# NeMo-RL v0.7 DPO config compiled by alia-nemo from: alia-nemo train engine=nemo_rl\n")
    assert "# Run:  uv run examples/run_dpo.py --config THIS_FILE" in text and "run_sft" not in text
    assert f"/ global batch 16 -> {TINY_STEPS} steps" in text and "DPO, beta 0.1" in text
    assert yaml.safe_load(text) == config


def test_40b_dpo_recipe_compiles_a_cp1_megatron_layout_with_undoubled_schedule(tmp_path):
    cfg = _big(tmp_path)
    compiled = compile_stage(cfg, prepare=False)
    c = compiled.config
    parsed = validate_nemo_rl(c, SPEC_40B)
    assert isinstance(parsed, NemoRLDPOConfig)
    m = c["policy"]["megatron_cfg"]
    assert (m["tensor_model_parallel_size"], m["pipeline_model_parallel_size"], m["context_parallel_size"]) == (4, 2, 1)
    assert m["sequence_parallel"] and m["activation_checkpointing"] and m["recompute_granularity"] == "full"
    assert c["policy"]["sequence_packing"] == {"enabled": False}
    assert c["policy"]["make_sequence_length_divisible_by"] == 4  # TP without CP
    # 30,800 requested pairs (helpsteer3 10,800 + ultrafeedback 20,000) / 128 -> 240 steps, 1 epoch.
    assert c["dpo"]["max_num_steps"] == 240 and c["dpo"]["max_num_epochs"] == 1
    # Optimizer steps: NeMo-RL's dpo.setup doubles train_iters and every scheduler *iters key itself.
    assert (m["scheduler"]["lr_decay_iters"], m["scheduler"]["lr_warmup_iters"]) == (240, cfg.stage.warmup_steps)
    assert m["optimizer"]["lr"] == 2e-7 and m["scheduler"]["lr_decay_style"] == "cosine"
    assert c["dpo"]["reference_policy_kl_penalty"] == 5.0
    assert c["dpo"]["preference_average_log_probs"] is c["dpo"]["sft_average_log_probs"] is True
    assert c["dpo"]["val_period"] == 50 and c["data"]["train"]["data_path"] == UNPREPARED
    assert c["policy"]["model_name"] == "outputs/sft-alia-40b-16n4g-megatron-tp4pp4cp4-actckpt/final"
    text = header(cfg, compiled, "alia-nemo compile")
    assert "NeMo-RL's dpo.setup doubles them (and train_iters) itself" in text and "run_dpo.py" in text
    memory = compiled.derived["memory_gib"]
    assert memory == {"total": 46.6, "budget": 59.6, "suggestion": None, "reference_host_gib": 75.3,
                      "host_budget": 238.4}  # fmt: skip


def test_dpo_refuses_sequence_packing_and_megatron_context_parallelism(tmp_path):
    with pytest.raises(ConfigError, match=r"engine\.sequence_packing=true: NeMo-RL v0\.7's DPO refuses sequence pack"):
        compile_stage(_big(tmp_path, "engine.sequence_packing=true"), prepare=False)
    with pytest.raises(ConfigError, match=r"engine\.context_parallel=2: Megatron context parallelism needs sequence"):
        compile_stage(_big(tmp_path, "engine.context_parallel=2", "engine.pipeline_parallel=1"), prepare=False)
    tiny = load_config([f"recipe={TINY}", f"run.output_dir={tmp_path}", "engine.sequence_packing=true"])
    with pytest.raises(ConfigError, match="DPO refuses sequence packing"):
        compile_stage(tiny, prepare=False, materialise=False)


def test_strict_dpo_mirror_names_unknown_keys_and_what_nemo_rls_dpo_asserts(tmp_path):
    config = compile_stage(_big(tmp_path), prepare=False).config

    def broken(edit) -> str:
        c = copy.deepcopy(config)
        edit(c)
        with pytest.raises(NemoRLConfigError) as err:
            validate_nemo_rl(c, SPEC_40B)
        return str(err.value)

    assert "dpo.beta: unknown key" in broken(lambda c: c["dpo"].update(beta=0.1))
    assert "data.train.use_validation: unknown key" in broken(lambda c: c["data"]["train"].update(use_validation=True))
    assert "data.add_bos: unknown key" in broken(lambda c: c["data"].update(add_bos=True))
    packing = {"enabled": True, "train_mb_tokens": 8192, "algorithm": "modified_first_fit_decreasing",
               "sequence_length_round": 64}  # fmt: skip
    assert "policy.sequence_packing.enabled" in broken(lambda c: c["policy"].update(sequence_packing=packing))

    def cp2(c):
        c["policy"]["megatron_cfg"].update(context_parallel_size=2, pipeline_model_parallel_size=1)
        c["policy"]["make_sequence_length_divisible_by"] = 16

    assert "which NeMo-RL's DPO refuses: DPO layouts use engine.context_parallel=1" in broken(cp2)
    assert "dpo.val_global_batch_size=12 must be a multiple of data-parallel size 8" in broken(
        lambda c: c["dpo"].update(val_global_batch_size=12)
    )


# --- memory ------------------------------------------------------------------------------------------------------


def test_memory_counts_both_sequences_of_a_pair_and_the_reference_in_host_memory(tmp_path):
    dpo_cfg = _big(tmp_path)
    dpo = memory_estimate(dpo_cfg, resolve(dpo_cfg))
    # The same layout, batch and length as an SFT stage: one sequence per micro-batch, no reference.
    layout = ["engine.tensor_parallel=4", "engine.pipeline_parallel=2", "engine.sequence_parallel=true",
              "engine.activation_checkpointing=true"]  # fmt: skip
    sft_cfg = load_config(["engine=nemo_rl", "cluster=mn5_acc", "model=alia_40b", "stage=sft", "data=sft_mixture",
                           "stage.seq_length=8192", "stage.global_batch_size=128", *layout,
                           f"run.output_dir={tmp_path}"])  # fmt: skip
    sft = memory_estimate(sft_cfg, resolve(sft_cfg))
    assert sft is not None and dpo is not None
    assert dpo["total"] > sft["total"] and (sft["total"], dpo["total"]) == (39.0, 46.6)
    assert "reference_host_gib" not in sft
    # Twice the tokens in flight: activations and the logits' bf16 tensors double, one chunk workspace per sequence.
    lay = Layout(4, 2, 1, 8, 1, "full")
    one, two = memory_breakdown(SPEC_40B, lay, 8192, 128), memory_breakdown(SPEC_40B, lay, 8192, 128, dpo=True)
    assert two["activations"] == pytest.approx(2 * one["activations"])
    assert two["logits_and_loss"] == pytest.approx(2 * one["logits_and_loss"])
    assert (two["weights"], two["optimizer"]) == (one["weights"], one["optimizer"])  # no GPU copy of the reference
    # Host: the resident reference and the policy's copy during the swap, bf16, for each of a node's 4 ranks.
    host = reference_host_gib(SPEC_40B, lay, 4)
    assert host["total"] == pytest.approx(4 * 2 * 2 * parameters_on_gpu(SPEC_40B, lay) / GIB)
    assert dpo["reference_host_gib"] == round(host["total"], 1) == 75.3
    assert dpo["host_budget"] == round(0.5 * 512e9 / GIB, 1)


def test_a_layout_that_fits_sft_but_not_dpo_is_refused_with_the_planners_suggestion(tmp_path, capsys):
    """Micro-batch 2 at TP4 PP2: 45.0 GiB as SFT, 61.7 GiB with a pair's two sequences (of 59.6)."""
    sft_cfg = load_config(["engine=nemo_rl", "cluster=mn5_acc", "model=alia_40b", "stage=sft", "data=sft_mixture",
                           "stage.seq_length=8192", "stage.global_batch_size=128", "stage.micro_batch_size=2",
                           "engine.tensor_parallel=4", "engine.pipeline_parallel=2", "engine.sequence_parallel=true",
                           "engine.activation_checkpointing=true", f"run.output_dir={tmp_path}"])  # fmt: skip
    assert compile_stage(sft_cfg, prepare=False).derived["memory_gib"]["total"] == 45.0
    with pytest.raises(ConfigError) as err:
        compile_stage(_big(tmp_path, "stage.micro_batch_size=2"), prepare=False)
    msg = str(err.value)
    assert msg.startswith("estimated 61.7 GiB per GPU for TP4 PP2 CP1 DP8 (recompute full) (DPO: chosen and rejected")
    nearest = msg.split("nearest here: ", 1)[1]
    assert nearest.startswith(
        "engine.tensor_parallel=4 engine.pipeline_parallel=2 engine.context_parallel=1 stage.micro_batch_size=1 "
        "engine.activation_checkpointing=true engine.recompute_granularity=full (46.6 GiB)"
    )
    assert "context_parallel=2" not in nearest and "sequence_packing" not in nearest
    from alia_nemo.cli import main

    rc = main(["compile", "--no-prepare", "--out", str(tmp_path / "x.yaml"), f"recipe={BIG}",
               "stage.micro_batch_size=2", f"run.output_dir={tmp_path}"])  # fmt: skip
    assert rc == 2 and "estimated 61.7 GiB per GPU" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_reference_weights_beyond_a_nodes_ram_are_refused(tmp_path):
    # 75.3 GiB per node against half of 100 GB (46.6 GiB).
    with pytest.raises(ConfigError, match=r"DPO's reference model: .* 75\.3 GiB per node for TP4 PP2 .* \(50% of "):
        compile_stage(_big(tmp_path, "cluster.ram_gb=100"), prepare=False)
    no_ram = compile_stage(_big(tmp_path, "cluster.ram_gb=0"), prepare=False).derived["memory_gib"]
    assert no_ram["host_budget"] is None and no_ram["reference_host_gib"] == 75.3  # estimated, not checked


def test_the_planner_ranks_only_cp1_layouts_for_dpo():
    result = plan(SPEC_40B, 8192, 128, 16, 4, Gpu(64, 989), dpo=True)
    assert result["dpo"] is True and result["ranked"]
    assert all(r["layout"]["cp"] == 1 for r in result["ranked"])
    cp = [r for r in result["layouts"] if r["layout"]["cp"] > 1]
    assert cp and all(any("needs sequence packing" in why for why in r["reasons"]) for r in cp)
    best = result["ranked"][0]["layout"]
    assert (best["tp"], best["pp"], best["micro_batch"], best["recompute"]) == (4, 2, 1, "full")  # the recipe's
    sft = plan(SPEC_40B, 8192, 128, 16, 4, Gpu(64, 989))
    assert "dpo" not in sft and any(r["layout"]["cp"] > 1 for r in sft["ranked"])


# --- dataset and processor ---------------------------------------------------------------------------------------


def test_rows_carry_nemo_rls_preference_shape_and_the_stored_ids(pairs):
    train, val = pairs
    assert (len(train.dataset), len(val.dataset), train.task_name) == (282, 18, "alia_dpo")
    assert len(train.val_dataset) == 18 and val.val_dataset is None and val.split == "validation"
    assert not {r["id"] for r in train.dataset} & {r["id"] for r in val.dataset}
    row = train.dataset[0]
    assert row["context"] == row["prompt"] and row["prompt"][-1]["role"] == "user"
    assert row["completions"] == [
        {"rank": 0, "completion": [{"role": "assistant", "content": row["chosen"]}]},
        {"rank": 1, "completion": [{"role": "assistant", "content": row["rejected"]}]},
    ]
    assert row["prepared_tokenizer_sha256"] == train.manifest["tokenizer"]["sha256"]
    assert row["prepared_template_sha256"] == train.manifest["template_sha256"]
    assert (
        train.processor_function() is alia_preference_processor and train.processor_name == "alia_preference_processor"
    )


def test_dataset_refusals(pairs, tmp_path, tiny_compiled):
    entry = {"data_path": pairs[0].data_path, "task_name": "alia_dpo"}
    with pytest.raises(AliaDataError, match="split='test' is not a split"):
        AliaPreferenceDataset(**entry, split="test")
    with pytest.raises(TypeError, match=r"unknown keys \['chosen_key'\]"):
        AliaPreferenceDataset(**entry, chosen_key="chosen")
    with pytest.raises(AliaDataError, match="prompt_file"):
        AliaPreferenceDataset(**entry, prompt_file="p.txt")
    with pytest.raises(AliaDataError, match="not a prepared preference set"):
        AliaPreferenceDataset(data_path=str(tmp_path))
    sft_dir = tiny_compiled[1].config["data"]["train"]["data_path"]  # a prepared SFT mixture
    with pytest.raises(AliaDataError, match=r"holds no preference pairs \(its manifest's format is None"):
        AliaPreferenceDataset(data_path=sft_dir)


def _entries(log) -> list[tuple[str, str, list[int]]]:
    return [(m["role"], m["content"], m["token_ids"].tolist()) for m in log]


def test_each_sequences_last_entry_is_exactly_the_answer_and_its_im_end(pairs, tok):
    """What NeMo-RL's only_unmask_final trains is our mask: for every prepared pair, both sequences."""
    for ds in pairs:
        for i in range(len(ds.dataset)):
            row = ds.dataset[i]
            datum = alia_preference_processor(row, None, _NoEncoding(tok), 256, i)  # stored ids: no tokenising
            assert datum["loss_multiplier"] == 1.0 and datum["idx"] == i and datum["task_name"] == "alia_dpo"
            for which in ("chosen", "rejected"):
                log, ids, mask = datum[f"message_log_{which}"], row[f"{which}_input_ids"], row[f"{which}_loss_mask"]
                assert [t for m in log for t in m["token_ids"].tolist()] == ids  # nothing lost or added
                assert datum[f"length_{which}"] == len(ids)
                trained = [t for t, k in zip(ids, mask) if k]
                assert log[-1]["token_ids"].tolist() == trained and log[-1]["role"] == "assistant"
                assert log[-1]["content"] == row[which] + IM_END
                assert trained[-1] == tok.convert_tokens_to_ids(IM_END)
                assert trained == tok(row[which] + IM_END, add_special_tokens=False)["input_ids"]
                assert len(log) == 2 and log[0]["content"].endswith("<|im_start|>assistant\n")
                assert log[0]["token_ids"].tolist().count(tok.bos_token_id) == 1 == ids.count(tok.bos_token_id)


def test_stored_ids_and_retokenising_give_identical_logs(pairs, tok):
    train, _ = pairs
    for i in range(0, len(train.dataset), 7):
        row = train.dataset[i]
        stored = alia_preference_processor(row, None, _NoEncoding(tok), 256, i)
        bare = {k: row[k] for k in ("id", "prompt", "chosen", "rejected", "task_name")}  # as an upstream row would be
        fresh = alia_preference_processor(bare, None, tok, 256, i)
        for which in ("chosen", "rejected"):
            assert _entries(stored[f"message_log_{which}"]) == _entries(fresh[f"message_log_{which}"])
            assert stored[f"length_{which}"] == fresh[f"length_{which}"]
    with pytest.raises(AssertionError, match="tokenised again"):  # the guard itself works
        alia_preference_processor(bare, None, _NoEncoding(tok), 256, 0)


def test_a_multi_turn_prompts_assistant_turns_are_context_not_trained(tok):
    prompt = [
        {"role": "system", "content": "Ets un assistent."},
        {"role": "user", "content": "Hola!"},
        {"role": "assistant", "content": "Hola, què vols?"},
        {"role": "user", "content": "Quants són 2 i 2?"},
    ]
    ((chosen, rejected),) = tokenize_preferences(tok, [(prompt, "Són 4.", "SÓN 5.")])
    datum = alia_preference_processor({"prompt": prompt, "chosen": "Són 4.", "rejected": "SÓN 5."}, None, tok, 256, 3)
    for which, ours in (("chosen", chosen), ("rejected", rejected)):
        first, last = datum[f"message_log_{which}"]
        assert first["role"] == "system" and "Hola, què vols?<|im_end|>" in first["content"]
        assert last["token_ids"].tolist() == [t for t, k in zip(ours.input_ids, ours.loss_mask) if k]
        assert first["token_ids"].tolist() + last["token_ids"].tolist() == ours.input_ids
    assert datum["message_log_chosen"][-1]["content"] == "Són 4.<|im_end|>"


def test_an_overlong_pair_is_cut_masked_and_said(pairs, tok, capsys):
    row = pairs[0].dataset[0]
    limit = len(row["chosen_input_ids"]) - 3
    datum = alia_preference_processor(row, None, tok, limit, 0)
    assert datum["loss_multiplier"] == 0.0
    assert max(datum["length_chosen"], datum["length_rejected"]) == limit
    assert all(sum(len(m["token_ids"]) for m in datum[f"message_log_{w}"]) <= limit for w in ("chosen", "rejected"))
    assert f"preference pair {row['id']} has" in capsys.readouterr().err


def test_processor_options(pairs, tok):
    row = pairs[0].dataset[0]
    with pytest.raises(ValueError, match="add_eos=true"):
        alia_preference_processor(row, None, tok, 256, 0, add_eos=True)
    with pytest.raises(ValueError, match="add_generation_prompt"):
        alia_preference_processor(row, None, tok, 256, 0, add_generation_prompt=True)
    without_bos = alia_preference_processor(row, None, tok, 256, 0, add_bos=False)
    assert without_bos["length_chosen"] == len(row["chosen_input_ids"]) - 1
    assert without_bos["message_log_chosen"][0]["token_ids"][0].item() != tok.bos_token_id
    bad = {**row, "chosen_loss_mask": [1] * len(row["chosen_loss_mask"])}
    with pytest.raises(ValueError, match="loss mask is not one trained run at the end"):
        alia_preference_processor(bad, None, tok, 256, 0)


# --- driver pieces that need no NeMo-RL --------------------------------------------------------------------------


def test_metrics_recorder_writes_dpo_metrics_under_our_names(tmp_path):
    from alia_nemo.engines import TrainingError

    rec = MetricsRecorder(tmp_path / "metrics.jsonl", reward_scale=0.5)
    train = {"loss": 0.6, "grad_norm": 2.0, "lr": 1e-3, "global_valid_toks": 700.0, "accuracy": 0.75,
             "rewards_chosen_mean": 1.0, "rewards_rejected_mean": -3.0, "sft_loss": 0.0}  # fmt: skip
    rec.log_metrics(train, 4, prefix="train")
    rec.log_metrics({"loss": 0.5, "accuracy": 1.0, "rewards_chosen_mean": 2.0, "rewards_rejected_mean": -2.0}, 4,
                    prefix="validation-default")  # fmt: skip
    rec.log_metrics({"total_validation_time": 1.0}, 4, prefix="timing/validation-default")  # ignored
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows == [
        {"step": 4, "loss": 0.6, "grad_norm": 2.0, "learning_rate": 1e-3, "tokens": 700.0, "rewards/accuracy": 0.75,
         "rewards/chosen": 0.5, "rewards/rejected": -1.5, "rewards/margin": 2.0},
        {"step": 4, "eval_loss": 0.5, "eval_rewards/accuracy": 1.0, "eval_rewards/chosen": 1.0,
         "eval_rewards/rejected": -1.0, "eval_rewards/margin": 2.0},
    ]  # fmt: skip
    with pytest.raises(TrainingError, match="validation loss became nan at step 5"):
        rec.log_metrics({"loss": math.nan, "accuracy": 0.0, "rewards_chosen_mean": 0.0, "rewards_rejected_mean": 0.0},
                        5, prefix="validation-default")  # fmt: skip


def test_masked_pairs_are_counted_as_batches_are_consumed(tmp_path):
    batches = [{"sample_mask": torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0])}, {"sample_mask": torch.tensor([1.0, 1.0])}]
    loader = MaskedPairs(batches, "train", tmp_path / "masked.jsonl")
    assert list(loader) == batches and len(loader) == 2
    assert masked_report(tmp_path / "masked.jsonl", dpo=True) == {"train": {"pairs": 1}, "validation": {"pairs": 0}}


# --- NeMo-RL itself (the harness) --------------------------------------------------------------------------------


@pytest.mark.nemo_rl
@pytest.mark.parametrize("recipe", [TINY, BIG])
def test_nemo_rls_dpo_master_config_takes_the_compiled_recipes(recipe, tmp_path):
    from nemo_rl.algorithms.dpo import MasterConfig

    cfg = load_config([f"recipe={recipe}", f"run.output_dir={tmp_path}"])
    compiled = compile_stage(cfg, prepare=recipe == TINY, progress=False)
    master = MasterConfig(**compiled.config)
    assert master.dpo.reference_policy_kl_penalty == cfg.stage.dpo.beta
    assert master.dpo.preference_average_log_probs is cfg.stage.dpo.average_log_probs
    assert master.dpo.max_num_steps == compiled.derived["max_num_steps"] > 0
    assert not master.policy["sequence_packing"]["enabled"] and not master.policy["dynamic_batching"]["enabled"]
    assert master.data["train"]["dataset_name"] == PREFERENCE_DATASET_CLASS


def _master(config):
    from nemo_rl.algorithms.dpo import MasterConfig

    return MasterConfig(**config)


@pytest.mark.nemo_rl
def test_pairs_through_nemo_rls_loader_and_preference_collate_train_exactly_our_masks(dpo_compiled):
    from nemo_rl.algorithms.utils import get_tokenizer
    from nemo_rl.data.collate_fn import preference_collate_fn
    from nemo_rl.data.datasets.preference_datasets import load_preference_dataset
    from nemo_rl.data.processors import PROCESSOR_REGISTRY

    from alia_nemo.engines.nemo_rl import build_preference_datasets

    master = _master(dpo_compiled[1].config)
    raw = load_preference_dataset(dict(master.data["train"]))  # by dotted path, as NeMo-RL's setup does
    assert type(raw).__module__ == "alia_nemo.nemo_rl.preference" and raw.task_spec.task_name == "alia_dpo"
    raw.set_processor()
    assert raw.processor is PROCESSOR_REGISTRY["alia_preference_processor"] is alia_preference_processor
    tokenizer = get_tokenizer(master.policy["tokenizer"])
    train, val = build_preference_datasets(master, tokenizer)
    assert len(train) == 282 and list(val) == ["default"] and len(val["default"]) == 18
    n = 16
    batch = preference_collate_fn([train[i] for i in range(n)], tokenizer, 1, add_loss_mask=True)
    assert batch["input_ids"].shape[0] == 2 * n and batch["sample_mask"].tolist() == [1.0] * 2 * n
    for i in range(n):
        row = train.dataset[i]
        for j, which in enumerate(("chosen", "rejected")):  # interleaved: chosen, rejected, chosen, ...
            k, ids, mask = 2 * i + j, row[f"{which}_input_ids"], row[f"{which}_loss_mask"]
            length = int(batch["input_lengths"][k])
            assert length == len(ids) and batch["input_ids"][k, :length].tolist() == ids
            assert batch["token_mask"][k, :length].tolist() == mask
            assert batch["token_mask"][k, length:].sum() == 0


@pytest.mark.nemo_rl
def test_upstream_run_dpo_data_setup_reads_our_pairs(dpo_compiled):
    """examples/run_dpo.py's setup_preference_data: our rows through NeMo-RL's own preference_preprocessor."""
    from nemo_rl.algorithms.utils import get_tokenizer
    from nemo_rl.data.utils import setup_preference_data

    master = _master(dpo_compiled[1].config)
    tokenizer = get_tokenizer(master.policy["tokenizer"])
    train, val = setup_preference_data(tokenizer, copy.deepcopy(master.data))
    assert len(train) == 282 and len(val["default"]) == 18
    datum, row = train[0], train.dataset[0]
    assert row["chosen"] in datum["message_log_chosen"][-1]["content"]
    assert row["rejected"] in datum["message_log_rejected"][-1]["content"]


@pytest.mark.nemo_rl
def test_the_v1_workers_pinned_reference_copy_is_what_needs_the_workaround():
    """Why the real loop below needs :data:`UNPINNED_SITECUSTOMIZE` on a CPU: NeMo-RL's DTensor v1 worker copies the
    reference model (``init_reference_model``, dtensor_policy_worker.py:458-460) and the policy around every
    reference pass (``use_reference_model``, 1750-1752) with ``get_cpu_state_dict(..., pin_memory=True)``, whose
    ``torch.empty(..., pin_memory=True)`` (line 156-158) needs a CUDA driver. The harness's cpu.patch leaves it."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: pinned memory works")
    from nemo_rl.models.policy.workers import dtensor_policy_worker as worker

    state = {"w": torch.ones(2, 3), "step": torch.tensor(1.0)}
    with pytest.raises(RuntimeError, match=r"NVIDIA driver|CUDA|accelerator"):
        worker.get_cpu_state_dict(state.items(), pin_memory=True)
    copied = worker.get_cpu_state_dict(state.items(), pin_memory=False)
    assert torch.equal(copied["w"], state["w"]) and copied["w"].data_ptr() != state["w"].data_ptr()


# The one workaround NeMo-RL's DPO loop needs on the CPU harness (see the test above): every process of this test
# (the driver and NeMo-RL's Ray workers, which inherit PYTHONPATH from it) imports this sitecustomize, which makes
# the v1 worker's get_cpu_state_dict copy into ordinary (unpinned) memory. Nothing of NeMo-RL or the harness is
# edited; on a GPU the copies stay pinned.
UNPINNED_SITECUSTOMIZE = """
import importlib.abc, importlib.machinery, sys

WORKER = "nemo_rl.models.policy.workers.dtensor_policy_worker"


class _UnpinnedCopies(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != WORKER:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            pinned = module.get_cpu_state_dict
            module.get_cpu_state_dict = lambda state, pin_memory=False: pinned(state, pin_memory=False)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _UnpinnedCopies())
"""


@pytest.mark.nemo_rl
@pytest.mark.slow
def test_nemo_rls_sft_then_dpo_chain_trains_on_cpu_through_our_driver(ray_gpu_head, tmp_path):
    """The tiny SFT -> DPO chain on NeMo-RL: SFT (sft_train, 4 steps), then DPO (dpo.setup + dpo_train, DTensor v1
    worker, float32, 6 steps, validation every 3) starting from SFT's final/, which is also its reference model."""
    from tests.helpers import NEMO_RL_TINY

    shim = tmp_path / "unpinned"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(UNPINNED_SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}
    sft = tmp_path / "sft"
    sft_args = ["train", f"recipe={NEMO_RL_TINY}", *NEMO_RL_HARNESS, "stage.max_steps=4", "run.save_every=4",
                f"run.output_dir={sft}"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "alia_nemo.cli", *sft_args], capture_output=True, text=True, env=env,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "dpo"
    args = ["train", f"recipe={TINY}", *NEMO_RL_HARNESS, "stage.max_steps=6", "run.save_every=3",
            "run.eval_every=3", f"model.pretrained={sft / 'final'}", f"model.tokenizer={sft / 'final'}",
            f"run.output_dir={out}"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "alia_nemo.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # NeMo-RL was given SFT's final/ as the policy (and so as the reference it copies at start).
    assert yaml.safe_load((out / "nemo_rl_dpo.yaml").read_text())["policy"]["model_name"] == str(sft / "final")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"] == str(out / "nemo_rl_dpo.yaml")
    assert yaml.safe_load((out / "nemo_rl_dpo.yaml").read_text())["dpo"]["max_num_steps"] == 6
    rows = read_jsonl(out / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in evals] == [3, 6]
    assert all(math.isfinite(r["loss"]) and "rewards/accuracy" in r and "rewards/margin" in r for r in train)
    # Step 1: the policy is its reference, so both rewards are 0, the loss ln 2 and no pair is "won" yet.
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert (train[0]["rewards/margin"], train[0]["rewards/accuracy"]) == (0.0, 0.0)
    # The toy rule (chosen in normal case, rejected in UPPERCASE) is learnt: loss down, margin and accuracy up.
    assert train[-1]["loss"] < train[0]["loss"] - 0.2
    assert train[-1]["rewards/margin"] > 0.5 and train[-1]["rewards/accuracy"] >= 0.9
    assert evals[-1]["eval_rewards/margin"] > evals[0]["eval_rewards/margin"] > 0
    assert evals[-1]["eval_loss"] < math.log(2) and all("eval_rewards/accuracy" in r for r in evals)
    # Checkpoints and final/: the newest one through NeMo-RL's converter.
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_3", "step_6"]
    export = json.loads((out / "final" / "alia_export.json").read_text())
    assert (export["source"], export["step"]) == (str(out / "checkpoints" / "step_6"), 6)
    assert (out / "final" / "model.safetensors").is_file() and (out / "loss.png").is_file()
    assert summary["train"]["global_step"] == 6 and summary["train"]["consumed_samples"] == 6 * 16
    assert summary["masked_overlong"] == {"train": 0, "validation": 0}
    assert "[alia-nemo] done: 6 steps" in proc.stdout
