"""``alia-nemo --version``, ``recipes`` (list, ``copy``), ``recipe=PATH``, ``validate`` and the offline hints of
``compile`` and ``prepare``: in-process through :func:`alia_nemo.cli.main`, offline, writing only under tmp_path."""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from alia_nemo.cli import main
from alia_nemo.config.compose import available_recipes, config_root, recipe_files
from alia_nemo.launch.pipeline import load_pipeline, pipeline_files
from alia_nemo.recipes import header_problems, parse_header

RECIPES = available_recipes()
PIPELINES = sorted(pipeline_files())
TINY = [r for r in RECIPES if "-alia-tiny-" in r]
BIG = [r for r in RECIPES if "-alia-40b-" in r]
# A hub id no cache holds: the tokenizer load fails exactly as for an uncached ALIA-40b on an offline node.
UNCACHED_TOKENIZER = "model.tokenizer=alia-nemo-tests/never-cached-tokenizer"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, and a working directory of its own that the test can check stays empty."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _resolved(argv: list[str], capsys) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


# --------------------------------------------------------------------------------------------- --version


def test_version_prints_this_package_and_what_matters(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"alia-nemo {metadata.version('alia-nemo')}"
    by_name = dict(line.split(" ", 1) for line in lines)
    assert list(by_name) == ["alia-nemo", "python", "torch", "transformers", "ray", "nemo-rl"]
    for name in ("torch", "transformers", "ray"):
        assert by_name[name] == metadata.version(name)
    assert re.fullmatch(r"3\.\d+\.\d+.*", by_name["python"])
    assert by_name["nemo-rl"]  # a version, or why not (outside NeMo-RL's container it is not importable)


def test_version_reads_nemo_rl_from_its_source_without_importing_it(tmp_path, monkeypatch, capsys):
    """NeMo-RL on PYTHONPATH (no metadata): its version comes from package_info.py, and nothing of it runs."""
    import importlib
    import sys

    package = tmp_path / "nemo_rl"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / "package_info.py").write_text('MAJOR = 0\nMINOR = 7\nPATCH = 0\nPRE_RELEASE = ""\nVERSION = (MAJOR,)\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    already = "nemo_rl" in sys.modules  # inside the NeMo-RL harness the real one may be loaded (also v0.7.0)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "nemo-rl 0.7.0" in capsys.readouterr().out.splitlines()
    assert already or "nemo_rl" not in sys.modules


# --------------------------------------------------------------------------------------------- headers, listing


@pytest.mark.parametrize("path", [*recipe_files().values(), *pipeline_files().values()], ids=lambda p: p.stem)
def test_every_recipe_and_pipeline_describes_itself(path):
    assert header_problems(path) == []


def test_header_parser_reads_purpose_and_joined_tested_lines():
    text = (
        "# my-recipe: what it is for:\n# more about it\n#\n# Launch:   alia-nemo train\n"
        "# Tested:   first line;\n#           second line.\n# Global batch 16 = ...\ndefaults: []\n"
    )
    header = parse_header(text)
    assert (header.name, header.purpose, header.tested) == ("my-recipe", "what it is for", "first line; second line.")
    assert parse_header("defaults: []\n") == type(header)("", "", "")  # no header at all: nothing parsed


def test_recipes_lists_every_recipe_and_pipeline(capsys):
    assert main(["recipes", "--json"]) == 0
    cat = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in cat["recipes"]] == RECIPES
    assert [e["name"] for e in cat["pipelines"]] == PIPELINES
    for entry in cat["recipes"] + cat["pipelines"]:
        for key in ("purpose", "stage", "model", "nodes_x_gpus", "engine", "tested"):
            assert isinstance(entry[key], str) and entry[key].strip(), (entry["name"], key)
    by_name = {e["name"]: e for e in cat["recipes"] + cat["pipelines"]}
    sft40b = by_name["sft-alia-40b-16n4g-megatron-tp4pp4cp4-actckpt"]
    assert (sft40b["stage"], sft40b["model"], sft40b["nodes_x_gpus"], sft40b["engine"]) == (
        "sft", "alia_40b", "16 x 4", "nemo_rl megatron"
    )  # fmt: skip
    assert sft40b["purpose"].startswith("the card's SFT") and "not yet run on GPUs" in sft40b["tested"]
    dp2 = by_name["sft-alia-tiny-1n0g-dp2"]
    assert (dp2["nodes_x_gpus"], dp2["engine"]) == ("1 x 0", "local x2")
    pipe = by_name["alia-40b-instruct"]
    assert pipe["steps"] == ["cpt32k", "cpt160k", "sft", "export", "eval"]
    assert [s["recipe"] for s in pipe["stages"]] == [
        st.recipe for st in load_pipeline("alia-40b-instruct").stages.values()
    ]
    assert (pipe["model"], pipe["nodes_x_gpus"]) == ("alia_40b", "16 x 4")
    # The plain listing: every name, purpose and tested-on text (wrapped) is there.
    assert main(["recipes"]) == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    for entry in cat["recipes"] + cat["pipelines"]:
        assert re.search(rf"^{re.escape(entry['name'])}\s", text, re.M), entry["name"]
        assert entry["purpose"] in flat and " ".join(entry["tested"].split()) in flat


def test_recipes_takes_no_overrides(offline, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["recipes", "stage.lr=1"])
    assert exit_.value.code == 2 and "invalid choice: 'stage.lr=1'" in capsys.readouterr().err
    assert main(["recipes", "copy", "sft-alia-tiny-1n0g-dp1", "r.yaml", "stage.lr=1"]) == 2
    assert "recipes takes no overrides (stage.lr=1)" in capsys.readouterr().err and not Path("r.yaml").exists()


@pytest.mark.parametrize("command", [["recipes"], ["recipes", "copy"], ["validate"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0 and f"alia-nemo {' '.join(command)}" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- copy, recipe=PATH


def _without_recorded_name(cfg: dict) -> dict:
    """The resolved config less what names the recipe: ``recipe`` and a default run directory derived from it."""
    cfg = json.loads(json.dumps(cfg))
    cfg.pop("recipe")
    cfg["run"].pop("output_dir")
    return cfg


@pytest.mark.parametrize("recipe", RECIPES)
def test_copied_recipe_composes_as_the_named_one(recipe, offline, capsys):
    assert main(["recipes", "copy", recipe, "copies/sub/mine.yaml"]) == 0
    out = capsys.readouterr().out
    copy = offline / "copies" / "sub" / "mine.yaml"
    assert f"alia-nemo validate recipe={Path('copies/sub/mine.yaml')}" in out
    assert copy.read_bytes() == recipe_files()[recipe].read_bytes()
    named = _resolved(["show", f"recipe={recipe}"], capsys)
    own_dir = (yaml.safe_load(copy.read_text()).get("run") or {}).get("output_dir")
    for given in ("copies/sub/mine.yaml", str(copy)):  # relative to the working directory, and absolute
        from_path = _resolved(["show", f"recipe={given}"], capsys)
        assert from_path["recipe"] == given  # recorded as given
        assert _without_recorded_name(from_path) == _without_recorded_name(named)
        if own_dir:  # a recipe's own run directory is kept (the default one is timestamped and named for it)
            assert from_path["run"]["output_dir"] == named["run"]["output_dir"] == own_dir


def test_recipe_path_is_composed_against_conf_wherever_it_lives(offline, capsys):
    """A copy named config.yaml (the base config's own name), a .yml one, and a copy beside a model/ folder that
    is not conf/'s: all compose as the recipe they copy."""
    named = _without_recorded_name(_resolved(["show", "recipe=sft-alia-2b-2n4g-megatron-cp2-actckpt"], capsys))
    (offline / "model").mkdir()
    (offline / "model" / "alia_2b.yaml").write_text("arch: alia_40b\n")
    for target in ("config.yaml", "other.yml", "./beside.yaml"):
        assert main(["recipes", "copy", "sft-alia-2b-2n4g-megatron-cp2-actckpt", target]) == 0
        capsys.readouterr()
        assert _without_recorded_name(_resolved(["show", f"recipe={target}"], capsys)) == named, target


def test_copy_refuses_to_overwrite_unless_forced(offline, capsys):
    target = offline / "a" / "b" / "r.yaml"  # parents created
    assert main(["recipes", "copy", "sft-alia-tiny-1n0g-dp2", str(target)]) == 0
    target.write_text("# my edits\n")
    assert main(["recipes", "copy", "sft-alia-tiny-1n0g-dp1", str(target)]) == 2
    err = capsys.readouterr().err
    assert "already exists; not overwritten" in err and "--force" in err and str(target) in err
    assert target.read_text() == "# my edits\n"
    assert main(["recipes", "copy", "sft-alia-tiny-1n0g-dp1", str(target), "--force"]) == 0
    assert target.read_bytes() == recipe_files()["sft-alia-tiny-1n0g-dp1"].read_bytes()
    # A directory keeps the recipe's file name; a path without a suffix gets .yaml.
    assert main(["recipes", "copy", "sft-alia-tiny-1n0g-dp1", "a"]) == 0
    assert (offline / "a" / "sft-alia-tiny-1n0g-dp1.yaml").is_file()
    assert main(["recipes", "copy", "sft-alia-tiny-1n0g-dp1", "plain"]) == 0
    assert (offline / "plain.yaml").is_file()
    capsys.readouterr()
    assert main(["recipes", "copy", "sft-alia-tiny-1n0g-dp1", "r.txt"]) == 2
    assert "must end in .yaml or .yml" in capsys.readouterr().err and not (offline / "r.txt").exists()
    assert main(["recipes", "copy", "no-such-recipe", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe or pipeline 'no-such-recipe'" in err and "alia-tiny-instruct" in err
    assert not (offline / "x.yaml").exists()


def test_copied_pipeline_loads_as_the_named_one(offline, capsys):
    assert main(["recipes", "copy", "alia-tiny-instruct", "pipes/mine.yaml"]) == 0
    assert "alia-nemo pipeline recipe=" in capsys.readouterr().out
    assert load_pipeline("pipes/mine.yaml") == load_pipeline("alia-tiny-instruct")
    # A pipeline is not a recipe: the commands that take recipes say where it goes.
    assert main(["validate", "recipe=pipes/mine.yaml"]) == 2
    assert "is a pipeline; run it with `alia-nemo pipeline recipe=pipes/mine.yaml`" in capsys.readouterr().err
    assert main(["show", "recipe=alia-tiny-instruct"]) == 2
    assert "alia-tiny-instruct is a pipeline" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["show", "validate", "pipeline"])
@pytest.mark.parametrize("given", ["/missing.yaml", "nowhere/recipe.yml", "nowhere/dir/"])
def test_a_missing_recipe_file_is_named(command, given, offline, capsys):
    assert main([command, f"recipe={given}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"alia-nemo {command}: error: recipe={given}: the ")
    assert str(Path(given).absolute()) in err and "does not exist" in err and "recipes copy" in err


def test_a_recipe_file_without_defaults_is_refused_with_the_fix(offline, capsys):
    Path("bare.yaml").write_text("stage:\n  lr: 1.0e-4\n")
    assert main(["show", "recipe=bare.yaml"]) == 2
    assert "has no defaults: list" in capsys.readouterr().err
    Path("bare.yaml").write_text("defaults: [config, _self_]\nstage:\n  lr: 1.0e-4\n")
    assert _resolved(["show", "recipe=bare.yaml"], capsys)["stage"]["lr"] == 1e-4


# --------------------------------------------------------------------------------------------- validate


@pytest.mark.parametrize("recipe", RECIPES)
def test_validate_every_recipe_offline_writes_nothing(recipe, offline, tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["validate", f"recipe={recipe}", f"run.output_dir={out_dir}"]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert text.startswith(f"[alia-nemo] OK: recipe={recipe} ") and "(nothing written)" in text
    assert re.search(r"resolved: [\d,]+ steps, global batch \d+ ", text)
    if "-dtensor" in recipe or "-megatron-" in recipe:  # engine=nemo_rl: compiled in memory
        assert re.search(r"compiled: \d+ keys \(NeMo-RL (SFT|DPO) config.*layout TP\d+ PP\d+ CP\d+ DP\d+.*memory", text)
    assert list(offline.iterdir()) == [] and not out_dir.exists()


def test_validate_plain_jsonl_leaves_counts_to_train(offline, capsys):
    assert main(["validate", "data=jsonl", "data.files=[mine.jsonl]"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("[alia-nemo] OK: conf/config.yaml data=jsonl data.files=[mine.jsonl] (nothing written)")
    assert "training conversations counted when the data is read" in text and "steps unknown until" in text
    assert list(offline.iterdir()) == []


def test_validate_reports_the_40b_memory_and_json(offline, capsys):
    argv = ["validate", "recipe=sft-alia-40b-16n4g-megatron-tp4pp4cp4-actckpt", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] and summary["compiled"]["layout"] == {"tp": 4, "pp": 4, "cp": 4, "dp": 1}
    assert summary["compiled"]["memory_gib"]["total"] < summary["compiled"]["memory_gib"]["budget"]
    assert summary["resolved"]["global_batch_size"] == 512 and summary["resolved"]["steps"] == 1391
    assert list(offline.iterdir()) == []


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["recipe=sft-alia-tiny-1n0g-dp1", "stage.lr=-1"], "stage.lr: Input should be greater than 0"),
        (["recipe=sft-alia-40b-16n4g-megatron-tp4pp4cp4-actckpt", "stage.lr=-1"], "stage.lr"),
        (["recipe=sft-alia-40b-16n4g-megatron-tp4pp4cp4-actckpt", "engine.pipeline_parallel=1"], "exceeds the"),
        (["recipe=sft-alia-tiny-1n0g-dp1", "+stage.lrr=1"], "stage.lrr: unknown key"),
    ],
)
def test_validate_exits_2_naming_the_problem_and_writes_nothing(overrides, named, offline, tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["validate", *overrides, f"run.output_dir={out_dir}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("alia-nemo validate: error:") and named in captured.err and not captured.out
    assert list(offline.iterdir()) == [] and not out_dir.exists()


# --------------------------------------------------------------------------------------------- offline hints


def test_compile_without_a_cached_tokenizer_names_no_prepare(offline, tmp_path, capsys):
    out = tmp_path / "compiled" / "sft40b.yaml"
    argv = ["compile", "recipe=sft-alia-40b-16n4g-megatron-tp4pp4cp4-actckpt", UNCACHED_TOKENIZER, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "alia-nemo-tests/never-cached-tokenizer" in err and "is neither a local directory nor in" in err
    assert "add --no-prepare: alia-nemo compile recipe=sft-alia-40b-16n4g-megatron-tp4pp4cp4-actckpt" in err
    assert not out.exists()
    assert main([*argv, "--no-prepare"]) == 0  # the advice works
    assert out.is_file()


def test_prepare_without_a_cached_tokenizer_names_fetch_and_dry_run(offline, capsys):
    assert main(["prepare", UNCACHED_TOKENIZER]) == 2
    err = capsys.readouterr().err
    assert (
        f"`alia-nemo fetch {UNCACHED_TOKENIZER}`" in err
        and f"`alia-nemo prepare --dry-run {UNCACHED_TOKENIZER}`" in err
    )
    assert main(["prepare", "--dry-run", UNCACHED_TOKENIZER]) == 0  # the advice works


def test_config_root_has_the_shipped_files():
    assert (config_root() / "conf" / "pipeline").is_dir() and RECIPES and PIPELINES and TINY and BIG
