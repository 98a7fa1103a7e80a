"""The card's lm-evaluation-harness task lists and the command built from them."""

from __future__ import annotations

import shutil

import pytest

from alia_nemo.cli import main
from alia_nemo.errors import ConfigError
from alia_nemo.eval.harness import command, task_config


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


def test_harness_without_lm_eval_explains(tmp_path, capsys):
    if shutil.which("lm_eval"):
        pytest.skip("lm-eval is installed here")
    assert main(["eval", "harness", "--model", "/m", "--out", str(tmp_path)]) == 2
    assert "pip install 'alia-nemo[eval]'" in capsys.readouterr().err
    assert main(["eval", "harness", "--model", "/m", "--out", str(tmp_path), "--dry-run"]) == 0
