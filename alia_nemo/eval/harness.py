"""The card's benchmark task lists for lm-evaluation-harness, and the command that runs them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from alia_nemo.errors import ConfigError


def task_config(path: Path | None = None) -> dict[str, Any]:
    """``conf/eval/harness.yaml``: 0-shot task lists per language."""
    from alia_nemo.config.compose import config_root

    return yaml.safe_load((path or config_root() / "conf" / "eval" / "harness.yaml").read_text())


def command(
    out: Path, model_dir: str | None = None, endpoint: str | None = None, served_model: str | None = None,
    languages: list[str] | None = None, limit: int | None = None,
) -> list[str]:  # fmt: skip
    """The ``lm_eval`` argument list for the card's tasks against a local export or an OpenAI-compatible server."""
    cfg = task_config()
    langs = languages or list(cfg["tasks"])
    unknown = sorted(set(langs) - set(cfg["tasks"]))
    if unknown:
        raise ConfigError(f"no task list for {unknown}; choose from {sorted(cfg['tasks'])}")
    tasks = [t for lang in langs for t in cfg["tasks"][lang]]
    if bool(model_dir) == bool(endpoint):
        raise ConfigError("give exactly one of --model DIR (an export) or --endpoint URL (OpenAI-compatible)")
    if model_dir:
        model = ["--model", "hf", "--model_args", f"pretrained={model_dir},dtype=bfloat16"]
    else:
        if not served_model:
            raise ConfigError("--endpoint needs --served-model (the model name the server exposes)")
        base = endpoint.rstrip("/")
        url = base if base.endswith("/completions") else base + "/completions"
        model = [
            "--model",
            "local-completions",
            "--model_args",
            f"model={served_model},base_url={url},tokenizer_backend=None",
        ]
    args = ["lm_eval", *model, "--tasks", ",".join(tasks), "--num_fewshot", str(cfg["num_fewshot"]),
            "--output_path", str(out), "--log_samples"]  # fmt: skip
    if limit:
        args += ["--limit", str(limit)]
    return args


def run(args: list[str]) -> int:
    """Run lm_eval (an optional extra); a clear error where it is not installed."""
    if shutil.which(args[0]) is None:
        raise ConfigError("lm-evaluation-harness is not installed: pip install 'alia-nemo[eval]' (or lm-eval)")
    return subprocess.run(args).returncode
