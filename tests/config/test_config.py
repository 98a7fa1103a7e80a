"""Every config group option and recipe composes and validates; bad keys, types and overrides fail clearly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from alia_nemo.config.compose import available_recipes, compose_dict, config_root, load_config, to_yaml
from alia_nemo.config.schema import AliaConfig, validate_config
from alia_nemo.errors import ConfigError

ROOT = config_root()
GROUPS = ("model", "stage", "data", "engine", "cluster")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def test_config_root_is_this_checkout():
    assert (ROOT / "conf" / "config.yaml").is_file() and (ROOT / "recipes").is_dir()


def _within(written: Any, composed: Any) -> bool:
    """Every value written in the YAML is in the composed section, at any depth (defaults may fill the rest)."""
    if isinstance(written, dict):
        return isinstance(composed, dict) and all(
            v is None or (k in composed and _within(v, composed[k])) for k, v in written.items()
        )
    return written == composed


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(group, option):
    raw = yaml.safe_load((ROOT / "conf" / group / f"{option}.yaml").read_text())
    # CPT stages take a text corpus and text corpora a CPT stage, DPO stages preference pairs and pairs a DPO stage:
    # compose each with a partner that fits.
    partner = {"cpt": ["data=cpt_sample"], "text_corpus": ["stage=cpt_32k_tiny"], "dpo": ["data=dpo_sample"],
               "preference": ["stage=dpo_tiny"]}  # fmt: skip
    cfg = load_config([f"{group}={option}", *partner.get(raw.get("kind", raw.get("format")), [])])
    assert isinstance(cfg, AliaConfig)
    # The option's own keys made it into the result unchanged (validation is recursive, not partial);
    # null keys a CPT stage derives (global batch, steps, RoPE factor) are checked in test_cpt_stages.
    section = cfg.model_dump()[group]
    for key, value in raw.items():
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}
        if value is None and raw.get("kind") == "cpt":
            continue
        if key != "defaults" and "${" not in str(value):
            assert _within(value, section[key]), (key, value, section[key])


@pytest.mark.parametrize("recipe", available_recipes())
def test_every_recipe_builds_and_documents_how_to_launch(recipe):
    cfg = load_config([f"recipe={recipe}"])
    assert cfg.recipe == recipe
    header = (ROOT / "recipes" / f"{recipe}.yaml").read_text()
    assert f"alia-nemo train recipe={recipe}" in header and "Tested:" in header
    stage, model = recipe.split("-")[0], recipe.split("-")[2]
    # The recipe's stage token is the stage name without its underscore (cpt_32k -> cpt32k).
    assert cfg.stage.name.replace("_", "").startswith(stage) and cfg.model.arch == f"alia_{model}"


def test_recipe_naming_convention():
    import re

    pattern = re.compile(r"^(sft|cpt32k|cpt160k|dpo)-alia-(tiny|2b|7b|40b)-\d+n\d+g-[a-z0-9]+(-[a-z0-9]+)*$")
    assert available_recipes() and all(pattern.match(r) for r in available_recipes())


def test_dp2_recipe_sets_two_workers_and_overrides_still_apply():
    assert load_config(["recipe=sft-alia-tiny-1n0g-dp2"]).engine.num_workers == 2
    cfg = load_config(["recipe=sft-alia-tiny-1n0g-dp2", "engine.num_workers=1", "stage.lr=0.01"])
    assert (cfg.engine.num_workers, cfg.stage.lr) == (1, 0.01)


def test_default_is_tiny_on_sample_cpu():
    cfg = load_config([])
    assert (cfg.model.arch, cfg.data.name, cfg.engine.name, cfg.cluster.gpus_per_node) == (
        "alia_tiny",
        "sample",
        "local",
        0,
    )
    sample = cfg.data.datasets["sample"]
    assert Path(sample.origin.files[0]).is_file() and sum(sample.counts.values()) == 282
    assert cfg.run.output_dir.startswith("outputs/")


def test_card_sft_hyperparameters():
    s = load_config(["model=alia_40b", "stage=sft"]).stage
    assert (s.lr, s.lr_scheduler, s.warmup_steps, s.global_batch_size, s.epochs, s.seq_length) == (
        1e-5,
        "cosine",
        5,
        512,
        1,
        32768,
    )


def test_override_grammar_add_and_delete():
    assert load_config(["stage.max_steps=7"]).stage.max_steps == 7
    # ~key deletes: the schema then fills its default or reports the key as missing.
    assert load_config(["~run.seed"]).run.seed == 42
    with pytest.raises(ConfigError, match=r"stage\.lr: required key is missing"):
        load_config(["~stage.lr"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+stage.learning_rate=1e-4"], r"stage\.learning_rate: unknown key"),
        (["+model.rope.foo=1"], r"model\.rope: unknown key"),
        (["+stage.rope.fator=2"], r"stage\.rope\.fator: unknown key"),
        (["stage.lr=fast"], r"stage\.lr: .*valid number.*'fast'"),
        (["stage.lr=-1"], r"stage\.lr: .*greater than 0"),
        (["engine.num_workers=0"], r"engine\.num_workers"),
        (["stage.lr_scheduler=linear"], r"stage\.lr_scheduler: .*'constant' or 'cosine'"),
        (["model.arch=alia_13b"], r"model\.arch: unknown architecture 'alia_13b'"),
        (["stage.global_batch_size=10", "stage.micro_batch_size=4"], r"not a multiple of"),
        (["learning_rate=1"], r"(?s)Could not override 'learning_rate'.*\+learning_rate=1"),
        (["model=alia_13b"], r"Could not find 'model/alia_13b'"),
        (["stage.lr=[1"], r"Hydra's grammar"),
        (["recipe=nope"], r"unknown recipe 'nope'; available recipes: \['cpt160k-alia-40b"),
    ],
)
def test_bad_overrides_fail_with_a_message_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


def test_schema_forbids_unknown_keys_at_every_depth():
    data = compose_dict([])
    data["run"]["outptu_dir"] = "x"
    data["stage"].setdefault("rope", {})["scale"] = 2
    with pytest.raises(ConfigError) as err:
        validate_config(data)
    assert "run.outptu_dir: unknown key" in str(err.value) and "stage.rope.scale: unknown key" in str(err.value)


def test_show_yaml_round_trips():
    cfg = load_config(["stage.lr=0.002"])
    again = validate_config(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg


def test_every_yaml_in_the_tree_parses():
    files = list((ROOT / "conf").rglob("*.yaml")) + list((ROOT / "recipes").glob("*.yaml"))
    assert len(files) >= 10
    for f in files:
        assert isinstance(yaml.safe_load(f.read_text()), dict), f
