"""One resolution of a stage: its rules, and `show`, `plan`, `compile` and `prepare` reporting the same numbers."""

from __future__ import annotations

import json
import math
import re

import pytest

from alia_nemo.cli import main
from alia_nemo.config.compose import available_recipes, load_config
from alia_nemo.config.resolve import resolve, steps_for_tokens, validation_count
from alia_nemo.errors import ConfigError

RECIPES = available_recipes()


def _run(argv: list[str], capsys) -> str:
    assert main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_validation_count_is_ceil_and_zero_only_for_zero():
    assert [validation_count(n, 0.005) for n in (0, 1, 199, 200, 201, 712_213)] == [0, 1, 1, 1, 2, 3562]
    assert validation_count(10, 0.0) == 0 and validation_count(10, 0.25) == 3


def test_card_sft_steps_drop_the_last_partial_batch():
    r = resolve(load_config(["recipe=sft-alia-40b-16n4g-megatron-tp4pp4cp4-actckpt"]))
    assert (r.train_rows, r.global_batch_size) == (712_213, 512)
    assert r.steps_per_epoch == r.steps == 712_213 // 512 == 1391  # not ceil (1392): NeMo-RL drops the remainder
    assert r.layout == {"tp": 4, "pp": 4, "cp": 4, "dp": 1} and r.grad_accumulation == 512
    assert r.tokens == 1391 * 512 * 32768 and r.sequence_divisor == 2 * 4 * 4


def test_cpt_windows_and_steps_from_the_token_budget():
    r = resolve(load_config(["recipe=cpt160k-alia-40b-16n4g-megatron-tp4pp2cp8-actckpt"]))
    assert r.steps == steps_for_tokens(36_800_000_000, r.global_batch_size, 163_840)
    assert r.train_tokens == r.steps * r.global_batch_size * 163_840 and r.train_rows == r.steps * r.global_batch_size
    assert r.hf_overrides["rope_parameters"]["factor"] == 40.0 and r.hf_overrides["max_position_embeddings"] == 163_840


def test_a_manifest_replaces_the_requested_counts():
    cfg = load_config([])  # tiny SFT on the bundled sample: 282 conversations requested, global batch 16
    planned = resolve(cfg)
    prepared = resolve(cfg, {"name": "s", "key": "k" * 64, "totals": {"selected": 250, "repeated": 6, "val": 9}})
    assert (planned.train_rows, planned.steps_per_epoch) == (282, 282 // 16)
    assert (prepared.train_rows, prepared.val_rows, prepared.steps_per_epoch) == (256, 9, 16)
    assert prepared.steps == 16 * cfg.stage.epochs and prepared.counted_from == "prepared mixture s-kkkkkkkkkkkkkkkk"


def test_too_little_data_is_refused_when_training_not_when_showing():
    cfg = load_config(["stage=sft"])  # the card's batch of 512 over the 282-conversation sample
    r = resolve(cfg)
    assert (r.steps_per_epoch, r.steps) == (0, 0)
    with pytest.raises(ConfigError, match=r"282 training conversations .* do not fill one global batch of 512"):
        r.check_trainable()


def test_layout_and_batch_rules_are_checked_once_for_both_engines():
    with pytest.raises(ConfigError, match=r"not a multiple of stage.micro_batch_size x data-parallel size"):
        load_config(["engine.num_workers=3"])
    with pytest.raises(ConfigError, match=r"has 16 GPUs, not a multiple of TP x PP x CP = 12"):
        load_config(["recipe=sft-alia-7b-4n4g-megatron-tp2pp2cp2-actckpt", "engine.tensor_parallel=3"])


def _show_numbers(text: str) -> dict[str, int]:
    derived = text[text.index("# derived:") :]
    numbers = {}
    for key, pattern in {
        "global_batch_size": r"global batch (\d+)",
        "steps": r"steps ([\d,]+)",
        "train_rows": r"training \w+ ([\d,]+)",
        "tokens_per_step": r"tokens per update ([\d,]+)",
        "dp": r"DP(\d+)",
        "grad_accumulation": r", (\d+) micro-batches",
    }.items():
        m = re.search(pattern, derived)
        if m:
            numbers[key] = int(m.group(1).replace(",", ""))
    return numbers


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_command_reports_the_same_numbers(recipe, tmp_path, capsys):
    cfg = load_config([f"recipe={recipe}"])
    r = resolve(cfg)
    want = {
        "global_batch_size": r.global_batch_size,
        "steps": r.steps,
        "train_rows": r.train_rows,
        "tokens_per_step": r.tokens_per_step,
        "dp": r.layout["dp"],
        "grad_accumulation": r.grad_accumulation,
    }
    assert _show_numbers(_run(["show", f"recipe={recipe}"], capsys)) == want
    if cfg.cluster.gpus_per_node:
        planned = json.loads(_run(["plan", f"recipe={recipe}", "--json"], capsys))
        assert planned["steps"] == r.steps and planned["global_batch"] == r.global_batch_size
        assert planned["resolved"] == r.as_dict()
    if cfg.engine.name == "nemo_rl":
        out = _run(["compile", f"recipe={recipe}", "--no-prepare", "--json", "--out", str(tmp_path / "c.yaml"),
                    f"run.output_dir={tmp_path / 'run'}"], capsys)  # fmt: skip
        compiled = json.loads(out)
        assert compiled["max_num_steps"] == r.steps and compiled["train_rows"] == r.train_rows
        assert compiled["layout"] == r.layout and compiled["grad_accumulation"] == r.grad_accumulation
        text = (tmp_path / "c.yaml").read_text()
        assert f"max_num_steps: {r.steps}\n" in text and f"train_global_batch_size: {r.global_batch_size}\n" in text
        assert f"val_period: {r.eval_every}\n" in text  # run.eval_every as resolved (auto: about 10 per run)
    if cfg.data.format != "messages_jsonl":
        dry = json.loads(_run(["prepare", f"recipe={recipe}", "--dry-run", "--json"], capsys))
        if r.kind == "cpt":
            assert dry["train_tokens"] == r.train_tokens == math.ceil(r.train_tokens / r.seq_length) * r.seq_length
        else:
            assert dry["total"] == r.train_rows
