"""The card's benchmark task lists for lm-evaluation-harness, and the command that runs them."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from alia_nemo.errors import ConfigError

# lm-eval's --batch_size: a count, "auto" or "auto:N" (re-tune N times).
_BATCH_SIZE = re.compile(r"[1-9][0-9]*|auto(:[1-9][0-9]*)?")


def task_config(path: Path | None = None) -> dict[str, Any]:
    """``conf/eval/harness.yaml``: 0-shot task lists per language."""
    from alia_nemo.config.compose import config_root

    return yaml.safe_load((path or config_root() / "conf" / "eval" / "harness.yaml").read_text())


def command(
    out: Path, model_dir: str | None = None, endpoint: str | None = None, served_model: str | None = None,
    languages: list[str] | None = None, limit: int | None = None, *, tasks: list[str] | None = None,
    include_path: str | None = None, device: str | None = None, batch_size: str | None = None,
    dtype: str | None = None,
) -> list[str]:  # fmt: skip
    """The ``lm_eval`` argument list against a local export or an OpenAI-compatible server.

    The card's task lists (``languages`` picks some) unless ``tasks`` names others, e.g. a group defined in
    ``include_path`` (a folder of task YAMLs). ``device``, ``batch_size`` and ``dtype`` (default bfloat16, the
    export's training precision) apply to a local export only; left out, lm-eval's defaults hold.
    """
    cfg = task_config()
    if tasks and languages:
        raise ConfigError("give --tasks (lm-eval task or group names) or --languages (the card's lists), not both")
    if tasks:
        names = tasks
    else:
        langs = languages or list(cfg["tasks"])
        unknown = sorted(set(langs) - set(cfg["tasks"]))
        if unknown:
            raise ConfigError(f"no task list for {unknown}; choose from {sorted(cfg['tasks'])}")
        names = [t for lang in langs for t in cfg["tasks"][lang]]
    if bool(model_dir) == bool(endpoint):
        raise ConfigError("give exactly one of --model DIR (an export) or --endpoint URL (OpenAI-compatible)")
    if batch_size is not None and not _BATCH_SIZE.fullmatch(batch_size):
        raise ConfigError(f"--batch-size {batch_size!r}: give a positive count, 'auto' or 'auto:N'")
    if model_dir:
        model = ["--model", "hf", "--model_args", f"pretrained={model_dir},dtype={dtype or 'bfloat16'}"]
        if device:
            model += ["--device", device]
    else:
        if device or dtype:
            raise ConfigError("--device and --dtype apply to --model DIR; the server at --endpoint chooses its own")
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
    args = ["lm_eval", *model, "--tasks", ",".join(names), "--num_fewshot", str(cfg["num_fewshot"]),
            "--output_path", str(out), "--log_samples"]  # fmt: skip
    if include_path:
        folder = Path(include_path)
        if not folder.is_dir():
            raise ConfigError(f"--include-path {include_path}: not a directory; give a folder of lm-eval task YAMLs")
        # Absolute, so the printed command works from any directory.
        args += ["--include_path", str(folder.resolve())]
    if batch_size:
        args += ["--batch_size", batch_size]
    if limit:
        args += ["--limit", str(limit)]
    return args


def run(args: list[str]) -> int:
    """Run lm_eval (an optional extra); a clear error where it is not installed.

    The lm-eval installed next to alia-nemo wins (``python -m lm_eval`` with this interpreter): an ``alia-nemo``
    started by its full path, without its environment on PATH, still finds it. Otherwise ``lm_eval`` on PATH.
    """
    if importlib.util.find_spec("lm_eval") is not None:
        return subprocess.run([sys.executable, "-m", "lm_eval", *args[1:]]).returncode
    if shutil.which(args[0]) is None:
        raise ConfigError("lm-evaluation-harness is not installed: pip install 'alia-nemo[eval]' (or lm-eval)")
    return subprocess.run(args).returncode


def results_files(out: Path) -> list[Path]:
    """lm-eval's results JSONs under ``out`` (it writes ``<model>/results_<time>.json`` per run), oldest first."""
    return sorted(out.glob("*/results_*.json"), key=lambda p: (p.stat().st_mtime, p.name))
