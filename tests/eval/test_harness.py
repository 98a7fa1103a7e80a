"""The card's lm-evaluation-harness task lists and the command built from them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from alia_nemo.cli import main
from alia_nemo.errors import ConfigError
from alia_nemo.eval.harness import command, task_config

TASKS = Path(__file__).parent / "lm_eval_tasks"


def test_task_lists_are_the_cards_benchmarks_zero_shot():
    cfg = task_config()
    assert cfg["num_fewshot"] == 0
    assert {lang: cfg["tasks"][lang] for lang in ("es", "ca", "eu", "gl")} == {
        "es": ["spanish_bench"], "ca": ["catalan_bench"], "eu": ["basque_bench"], "gl": ["galician_bench"]}  # fmt: skip
    assert cfg["tasks"]["en"]


def test_command_for_an_export_and_an_endpoint(tmp_path):
    args = command(tmp_path, model_dir="/models/alia", languages=["es", "ca"], limit=5)
    assert args[:5] == ["lm_eval", "--model", "hf", "--model_args", "pretrained=/models/alia,dtype=bfloat16"]
    assert args[args.index("--tasks") + 1] == "spanish_bench,catalan_bench"
    assert args[args.index("--num_fewshot") + 1] == "0" and args[-2:] == ["--limit", "5"]
    remote = command(tmp_path, endpoint="http://h:8000/v1", served_model="alia")
    assert "model=alia,base_url=http://h:8000/v1/completions,tokenizer_backend=None" in remote
    with pytest.raises(ConfigError, match="exactly one of"):
        command(tmp_path)
    with pytest.raises(ConfigError, match="no task list for"):
        command(tmp_path, model_dir="/m", languages=["fr"])


def test_default_command_runs_every_card_list_in_order(tmp_path):
    cfg = task_config()
    args = command(tmp_path, model_dir="/models/alia")
    assert args[args.index("--tasks") + 1] == ",".join(t for lang in cfg["tasks"] for t in cfg["tasks"][lang])
    assert args[args.index("--output_path") + 1] == str(tmp_path) and "--log_samples" in args
    # The export loads in bfloat16, its training precision; lm-eval's own device and batch size hold unless asked.
    assert args[args.index("--model_args") + 1] == "pretrained=/models/alia,dtype=bfloat16"
    assert not {"--device", "--batch_size", "--include_path", "--limit"} & set(args)


def test_command_with_own_tasks_include_path_and_cpu_settings(tmp_path):
    args = command(tmp_path, model_dir="/m", tasks=["alia_tiny_mc", "arc_easy"], include_path=str(TASKS),
                   device="cpu", batch_size="8", dtype="float32")  # fmt: skip
    assert args[args.index("--model_args") + 1] == "pretrained=/m,dtype=float32"
    assert args[args.index("--tasks") + 1] == "alia_tiny_mc,arc_easy"
    assert args[args.index("--include_path") + 1] == str(TASKS.resolve())
    assert args[args.index("--device") + 1] == "cpu" and args[args.index("--batch_size") + 1] == "8"
    assert command(tmp_path, model_dir="/m", batch_size="auto:4")[-2:] == ["--batch_size", "auto:4"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model_dir": "/m", "tasks": ["t"], "languages": ["es"]}, "not both"),
        ({"model_dir": "/m", "include_path": "/no/such/dir"}, "not a directory"),
        ({"model_dir": "/m", "batch_size": "0"}, "--batch-size"),
        ({"model_dir": "/m", "batch_size": "big"}, "--batch-size"),
        ({"endpoint": "http://h:8000/v1", "served_model": "alia", "device": "cpu"}, "apply to --model"),
        ({"endpoint": "http://h:8000/v1", "served_model": "alia", "dtype": "float32"}, "apply to --model"),
        ({"endpoint": "http://h:8000/v1"}, "--served-model"),
    ],
)
def test_bad_harness_options_are_explained(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        command(tmp_path, **kwargs)


def test_cli_dry_run_prints_the_command_with_the_new_options(tmp_path, capsys):
    assert main(["eval", "harness", "--model", "/m", "--out", str(tmp_path), "--tasks", "alia_tiny_mc",
                 "--include-path", str(TASKS), "--device", "cpu", "--batch-size", "4", "--dtype", "float32",
                 "--dry-run"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "--tasks alia_tiny_mc " in printed and f"--include_path {TASKS.resolve()}" in printed
    assert "pretrained=/m,dtype=float32 --device cpu" in printed and "--batch_size 4" in printed
    assert main(["eval", "harness", "--model", "/m", "--out", str(tmp_path), "--dry-run"]) == 0
    assert "--tasks spanish_bench,catalan_bench,basque_bench,galician_bench,arc_easy," in capsys.readouterr().out


def test_harness_without_lm_eval_explains(tmp_path, capsys, monkeypatch):
    # lm-eval comes with the test extra; hide it from this interpreter and from PATH as where it is not installed.
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["eval", "harness", "--model", "/m", "--out", str(tmp_path)]) == 2
    assert "pip install 'alia-nemo[eval]'" in capsys.readouterr().err
    assert main(["eval", "harness", "--model", "/m", "--out", str(tmp_path), "--dry-run"]) == 0
