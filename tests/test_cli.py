"""The ``alia-nemo`` dispatcher: help, show, model-info, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alia_nemo.cli import main
from alia_nemo.config.schema import validate_config

COMMANDS = ["train", "show", "prepare", "model-info", "plan", "compile", "submit", "fetch", "pipeline"]
OPTION_COMMANDS = ["jobs", "export", "eval"]  # they take options, not configuration overrides


@pytest.mark.parametrize("command", COMMANDS + OPTION_COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"alia-nemo {command}" in out
    if command in COMMANDS:
        assert "OVERRIDE" in out and "+key=value" in out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS + OPTION_COMMANDS)


def test_show_prints_valid_resolved_yaml(capsys):
    assert main(["show", "stage.lr=0.002", "model=alia_7b"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    cfg = validate_config(data)
    assert (cfg.stage.lr, cfg.model.arch) == (0.002, "alia_7b")
    assert "${" not in json.dumps(data)  # fully resolved


def test_show_lists_recipes(capsys):
    assert main(["show", "--list-recipes"]) == 0
    assert "sft-alia-tiny-1n0g-dp2" in capsys.readouterr().out.split()


def test_model_info_40b_exact(capsys):
    assert main(["model-info", "model=alia_40b"]) == 0
    report = json.loads(capsys.readouterr().out)
    for method in ("analytic", "transformers_meta", "megatron_core_meta"):
        assert report[method] == {"total": 40_433_885_184, "embedding": 2_097_152_000}, method
    assert report["agree"] is True and report["model"] == "alia_40b"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "+stage.lrr=1"], "stage.lrr: unknown key"),
        (["train", "stage.lr=abc"], "stage.lr: Input should be a valid number"),
        (["model-info", "model=alia_13b"], "Could not find 'model/alia_13b'"),
        (
            ["train", "data=jsonl", "data.files=[/nonexistent.jsonl]", "run.output_dir=/tmp/alia-nemo-never"],
            "does not exist; fix data.files",
        ),
    ],
)
def test_errors_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"alia-nemo {argv[0]}: error:") and message in err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "alia-nemo"
    proc = subprocess.run([str(script), "show", "engine.num_workers=2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["engine"]["num_workers"] == 2


def test_prepare_dry_run_reads_nothing(capsys):
    assert main(["prepare", "data=sft_mixture", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["total"] == 712_213 and len(plan["datasets"]) == 20
    assert plan["datasets"]["wildchat-curated-deepseekv3"]["missing_files"]
    assert main(["prepare", "data=sft_mixture", "--dry-run"]) == 0
    table = capsys.readouterr().out
    assert "712,213" in table and "aya-dataset" in table and "(MISSING)" in table


def test_prepare_missing_internal_files_is_a_clear_error(capsys):
    assert main(["prepare", "data=sft_mixture"]) == 2
    err = capsys.readouterr().err
    assert "9 dataset(s) of mixture 'sft_mixture' have missing files" in err and "data.internal_dir" in err


def test_prepare_builds_the_sample(capsys):
    assert main(["prepare", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["totals"]["selected"] == 282 and out["totals"]["val"] == 18
    assert Path(out["prepared"], "manifest.json").is_file()


def test_errors_are_one_line_with_their_exit_code_and_debug_shows_the_traceback(monkeypatch, capsys, tmp_path):
    import errno

    import alia_nemo.cli as cli
    from alia_nemo.engines import TrainingError
    from alia_nemo.errors import ConfigError

    def failing(exc):
        def fn(args):
            raise exc

        return fn

    cases = [
        (ConfigError("stage.lr: bad"), 2, "alia-nemo show: error: stage.lr: bad"),
        (TrainingError("loss became nan at step 3"), 1, "alia-nemo show: failed: loss became nan at step 3"),
        (OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt")), 2,
         f"alia-nemo show: error: {tmp_path / 'ckpt'}: no space left on device; free space"),
        (PermissionError(errno.EACCES, "Permission denied", "/scratch/x"), 2,
         "alia-nemo show: error: /scratch/x: permission denied; choose a path you can write"),
        (KeyError("boom"), 1, "alia-nemo show: internal error: KeyError: 'boom' (this is a bug in alia-nemo; rerun "
         "with --debug"),
    ]  # fmt: skip
    for exc, code, line in cases:
        monkeypatch.setattr(cli, "_cmd_show", failing(exc))
        assert cli.main(["show"]) == code
        err = capsys.readouterr().err
        assert err.startswith(line) and err.count("\n") == 1 and "Traceback" not in err, err
    assert cli.main(["show", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith(
        "alia-nemo show: internal error: KeyError"
    )
