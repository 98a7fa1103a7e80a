"""A training run's directory, guarded: one writer at a time, the same configuration on resume, a finished
run left alone, nothing written through a planted link.

Every engine runs inside :func:`open_run`, which
- refuses an empty ``run.output_dir`` (it would be the current directory) and a path that is a file;
- takes the directory's lock (:class:`alia_nemo.locks.DirLock`), so a second ``train`` into it stops at once,
  on this host or another one sharing the filesystem;
- refuses to resume under a different configuration than the run's ``config.yaml`` (only keys that change how
  a run is watched, not what it trains, may differ) unless ``run.resume=force``, which keeps the old file
  as ``config.replaced-<time>.yaml``;
- refuses ``run.resume=false`` where checkpoints exist (it would mix two runs' steps and checkpoints);
- reports a finished run (``summary.json`` and a sound ``final/``) so the caller does nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alia_nemo.config.schema import AliaConfig
from alia_nemo.errors import ConfigError
from alia_nemo.locks import DirLock

LOCK_NAME = ".alia-nemo.lock"
CONFIG_NAME = "config.yaml"
SUMMARY_NAME = "summary.json"
# Keys a resumed run may change: they decide how the run is watched or where it runs, not what it trains.
RESUMABLE_KEYS = (
    "run.resume",
    "run.print_every",
    "run.log_every",
    "run.save_every",
    "run.eval_every",  # validating more or less often reads the model, it never changes what is trained
    "run.keep_checkpoints",
    "run.output_dir",
    "engine.ray_address",
    "engine.torch_threads",
    "engine.logger",
)
# What the engines write into a run directory; a symbolic link at any of them would be written through.
RUN_OUTPUTS = ("final", "checkpoints", CONFIG_NAME, SUMMARY_NAME, "metrics.jsonl", "tokenizer", "loss.png",
               "data_report.json", "train_result.json", "tensorboard", "ray", "logs")  # fmt: skip


def run_path(cfg: AliaConfig) -> Path:
    """``run.output_dir`` as an absolute path; refuses an empty one (it would mean the current directory)."""
    raw = cfg.run.output_dir.strip()
    if not raw:
        raise ConfigError(
            "run.output_dir is empty; give the run a directory of its own, e.g. run.output_dir=outputs/my-run"
        )
    out = Path(raw).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.output_dir={raw} is a file, not a directory; choose a directory")
    return out


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b.c": value}`` (lists are values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key that decides what is trained and differs (see RESUMABLE_KEYS)."""
    a, b = flatten(old), flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def has_checkpoints(out: Path) -> bool:
    """True when the run directory holds a checkpoint of either engine."""
    ckpts = out / "checkpoints"
    return ckpts.is_dir() and any(p.name.startswith(("checkpoint-", "step_")) for p in ckpts.iterdir())


def final_problem(final: Path) -> str | None:
    """Why ``final/`` is not a complete model (None when it is)."""
    if not final.is_dir():
        return f"{final} does not exist"
    from alia_nemo.model.checkpoints import weights_problem

    return weights_problem(final)


@dataclass
class RunDir:
    """The guarded run directory :func:`open_run` yields."""

    path: Path
    finished: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _check_links(out: Path) -> None:
    for name in RUN_OUTPUTS:
        if (out / name).is_symlink():
            raise ConfigError(
                f"{out / name} is a symbolic link; alia-nemo writes only inside run.output_dir and will not "
                "write through it. Remove the link (or choose another run.output_dir)"
            )


def _check_nonfinite(out: Path) -> None:
    from alia_nemo.engines import NONFINITE

    record = out / NONFINITE
    if record.is_file():
        raise ConfigError(
            f"{out} is a run whose loss went non-finite ({record.read_text().strip()}); resuming would continue from "
            f"checkpoints that may hold non-finite weights. Start a new run.output_dir (or, if you removed the bad "
            f"checkpoints yourself, delete {record})"
        )


def _check_config(cfg: AliaConfig, out: Path) -> list[str]:
    """Compare with the run's recorded configuration; returns notes, raises on a refused mismatch."""
    path = out / CONFIG_NAME
    resumable = has_checkpoints(out) or (out / "final").exists()
    if not resumable:
        return []
    if not cfg.run.resume:
        raise ConfigError(
            f"{out} already holds checkpoints of a run and run.resume=false: training from scratch there would mix "
            "two runs' steps and checkpoints. Choose a new run.output_dir, or drop run.resume=false to continue"
        )
    if not path.is_file():
        return []
    try:
        old = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} can not be read ({exc}); restore it, or choose a new run.output_dir") from None
    diffs = config_differences(old if isinstance(old, dict) else {}, cfg.model_dump(mode="json"))
    if not diffs:
        return []
    if cfg.run.resume != "force":
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise ConfigError(
            f"{out} holds a run trained with another configuration ({shown}). Resuming it would mix the two. "
            "Choose a new run.output_dir, or set run.resume=force to continue this run with the new settings "
            "(its config.yaml is kept as config.replaced-<time>.yaml)"
        )
    kept = out / f"config.replaced-{time.strftime('%Y%m%dT%H%M%S')}.yaml"
    path.rename(kept)
    return [f"run.resume=force: continuing {out} with {len(diffs)} changed key(s); previous config kept as {kept.name}"]


def _finished(out: Path) -> dict[str, Any] | None:
    summary = out / SUMMARY_NAME
    if not summary.is_file() or final_problem(out / "final"):
        return None
    try:
        return json.loads(summary.read_text())
    except (ValueError, UnicodeDecodeError):
        return None  # an unreadable summary: train (resume) again, which rewrites it


@contextmanager
def open_run(cfg: AliaConfig) -> Iterator[RunDir]:
    """Guard ``run.output_dir`` for the duration of a run (see the module docstring)."""
    out = run_path(cfg)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = DirLock(out / LOCK_NAME, "training run")
    try:
        lock.acquire()
    except BaseException:
        if created:
            _remove_if_empty(out)
        raise
    try:
        _check_links(out)
        _check_nonfinite(out)
        notes = _check_config(cfg, out)
        from alia_nemo.config.compose import to_yaml

        run = RunDir(out, notes=notes)
        for note in notes:
            print(f"[alia-nemo] {note}", flush=True)
        run.finished = _finished(out) if not notes else None
        if run.finished is None:
            (out / CONFIG_NAME).write_text(to_yaml(cfg))
        yield run
    except BaseException:
        lock.release()
        from alia_nemo.console import LOG_NAME

        # Ours, from this call: a run that failed on its inputs (its console log says only that) leaves nothing.
        if created and {p.relative_to(out) for p in out.rglob("*")} <= {Path(CONFIG_NAME), LOG_NAME.parent, LOG_NAME}:
            (out / CONFIG_NAME).unlink(missing_ok=True)
            (out / LOG_NAME).unlink(missing_ok=True)
            _remove_if_empty(out / LOG_NAME.parent)
            _remove_if_empty(out)
        raise
    else:
        lock.release()


def _remove_if_empty(out: Path) -> None:
    """Remove a directory this run created if it holds nothing (a run that failed on its inputs)."""
    with suppress(OSError):
        out.rmdir()
