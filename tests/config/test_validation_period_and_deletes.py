"""Issue 19: every stage validates periodically by default (``run.eval_every: auto``), ``~key`` deletes any key the
schema knows (its default then applies), and a default run directory carries the recipe's name."""

from __future__ import annotations

import re

import pytest

from alia_nemo.config.compose import available_recipes, load_config
from alia_nemo.config.resolve import describe, eval_period, resolve
from alia_nemo.config.schema import AUTO_VALIDATIONS, AliaConfig
from alia_nemo.errors import ConfigError

# ------------------------------------------------------------------------------------------- run.eval_every


def test_the_default_job_validates_about_ten_times():
    cfg = load_config([])
    stage = resolve(cfg)
    assert cfg.run.eval_every == "auto" and AUTO_VALIDATIONS == 10
    assert (stage.steps, stage.val_rows, stage.eval_every) == (204, 18, 21)  # 9 in the run + the final one
    assert "validation every 21 steps and at the end: 10 points" in describe(cfg, stage)


@pytest.mark.parametrize(
    ("setting", "steps", "val_rows", "expected"),
    [
        ("auto", 204, 18, 21),
        ("auto", 4, 4, 1),  # a 4-step CPT smoke stage validates every step: still a curve
        ("auto", 10, 4, 1),
        ("auto", 1391, 3529, 140),  # the card's SFT stage
        ("auto", None, 18, None),  # plain JSONL: steps known only once the data is read
        ("auto", 0, 18, 1),  # a stage whose data fills no global batch (refused before training)
        ("auto", 204, 0, 0),  # nothing held out: nothing to validate on
        (None, 204, 18, 0),  # null: only at the end
        (7, 204, 18, 7),
        (7, 204, 0, 0),
    ],
)
def test_eval_period(setting, steps, val_rows, expected):
    assert eval_period(setting, steps, val_rows) == expected


def test_the_trainer_gets_the_resolved_period(tmp_path):
    from alia_nemo.engines.hf_training import training_arguments

    cfg = load_config([f"run.output_dir={tmp_path}"])
    args = training_arguments(cfg, resolve(cfg), tmp_path, use_cpu=True, report_to=[])
    assert (args.eval_strategy.value, args.eval_steps) == ("steps", 21)
    cfg = load_config([f"run.output_dir={tmp_path}", "run.eval_every=null"])
    args = training_arguments(cfg, resolve(cfg), tmp_path, use_cpu=True, report_to=[])
    assert args.eval_strategy.value == "no"  # the engine still validates once at the end (train_sft)


def _compiled_val_period(recipe: str, tmp_path) -> int:
    from alia_nemo.engines.nemo_rl_prepare import compile_stage

    cfg = load_config([f"recipe={recipe}", f"run.output_dir={tmp_path}"])
    config = compile_stage(cfg, prepare=False, materialise=False, progress=False).config
    return config["dpo" if cfg.stage.kind == "dpo" else "sft"]["val_period"]


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ("sft-alia-tiny-1n1g-dtensor", 10),  # recipes that set run.eval_every keep it
        ("dpo-alia-tiny-1n1g-dtensor", 10),
        ("sft-alia-40b-16n4g-megatron-tp4pp4cp4-actckpt", 100),
        ("cpt160k-alia-40b-16n4g-megatron-tp4pp2cp8-actckpt", 200),
        ("cpt32k-alia-tiny-1n1g-dtensor", 1),  # auto: 10 steps (was 0: validation only at the end)
        ("cpt160k-alia-tiny-1n1g-dtensor", 1),  # auto: 4 steps
    ],
)
def test_nemo_rl_val_period(recipe, expected, tmp_path):
    assert _compiled_val_period(recipe, tmp_path) == expected


def test_every_recipe_validates_periodically():
    for recipe in available_recipes():
        cfg = load_config([f"recipe={recipe}"])
        stage = resolve(cfg)
        assert stage.val_rows and stage.eval_every and stage.steps, recipe
        assert -(-stage.steps // stage.eval_every) >= 3, (recipe, stage.steps, stage.eval_every)  # a curve


@pytest.mark.parametrize("value", ["0", "-3", "sometimes", "true"])
def test_bad_eval_every_is_one_clear_line(value):
    with pytest.raises(ConfigError) as err:
        load_config([f"run.eval_every={value}"])
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and lines[1].strip().startswith("run.eval_every: takes a number of steps (> 0), auto")


# --------------------------------------------------------------------------------------------------- ~key


def test_deleting_a_key_documented_in_the_readme_composes():
    cfg = load_config(["~run.eval_every"])
    assert cfg.run.eval_every == AliaConfig.model_fields["run"].annotation.model_fields["eval_every"].default == "auto"


def test_deleting_a_schema_key_no_yaml_holds_means_its_default():
    cfg = load_config(["stage.adam_eps=1e-6", "~stage.adam_eps"])  # set, then deleted: the schema default
    assert cfg.stage.adam_eps == 1e-8
    deleted = load_config(["~stage.rope.theta", "~engine.torch_threads", "~data.allow_missing_internal"])
    assert deleted.model_dump(exclude={"run"}) == load_config([]).model_dump(exclude={"run"})  # run: its time differs


def test_deleting_a_yaml_key_removes_it_before_interpolation():
    cfg = load_config(["data=sft_mixture", "~data.datasets.aya-dataset"])
    assert "aya-dataset" not in cfg.data.datasets and len(cfg.data.datasets) == 19
    # stage.warmup_steps is in conf/stage/sft.yaml (5); deleted, the schema's 0 applies
    assert load_config(["~stage.warmup_steps"]).stage.warmup_steps == 0


def test_a_setting_after_a_deletion_wins():
    assert load_config(["~run.eval_every", "run.eval_every=7"]).run.eval_every == 7
    assert load_config(["run.eval_every=7", "~run.eval_every"]).run.eval_every == "auto"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("~stage.foo", "~stage.foo: no such key"),
        ("~stage.rope.fator", "~stage.rope.fator: no such key"),
        ("~engine.backend", "~engine.backend: no such key"),  # a NeMo-RL key, and the engine is local
        ("~data.files", "~data.files: no such key"),  # a data=jsonl key, and the data is a mixture
        ("~run.eval_every=5", "~run.eval_every=5: run.eval_every is 'auto', not 5; nothing was deleted"),
    ],
)
def test_deleting_an_unknown_key_is_an_error_naming_it(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([override])


def test_the_cli_accepts_the_readme_deletion(capsys):
    from alia_nemo.cli import main

    assert main(["show", "~run.eval_every"]) == 0
    assert "eval_every: auto" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ run directories


def test_default_run_directory_names_the_recipe_or_the_stage_and_model():
    assert re.fullmatch(r"outputs/\d{8}-\d{6}-sft_tiny-alia_tiny", load_config([]).run.output_dir)
    cfg = load_config(["recipe=sft-alia-tiny-1n0g-dp2"])  # a recipe without a run.output_dir of its own
    assert re.fullmatch(r"outputs/\d{8}-\d{6}-sft-alia-tiny-1n0g-dp2", cfg.run.output_dir)
    cfg = load_config(["stage=dpo_tiny", "data=dpo_sample"])
    assert re.fullmatch(r"outputs/\d{8}-\d{6}-dpo_tiny-alia_tiny", cfg.run.output_dir)
    # recipes that name their directory keep it
    assert load_config(["recipe=sft-alia-tiny-1n1g-dtensor"]).run.output_dir == "outputs/sft-alia-tiny-1n1g-dtensor"


def test_a_recipe_file_names_the_run_directory_by_its_file_name(tmp_path):
    from alia_nemo.config.compose import run_name

    assert run_name("sft-alia-tiny-1n0g-dp2", "sft_tiny", "alia_tiny") == "sft-alia-tiny-1n0g-dp2"
    assert run_name(str(tmp_path / "my.recipe.yaml"), "sft_tiny", "alia_tiny") == "my.recipe"
    assert run_name(None, "sft_tiny", "alia_tiny") == "sft_tiny-alia_tiny"
