"""The guarded run directory (alia_nemo.engines.run_dir) through `alia-nemo train`: each case reproduces a failure seen
before the guards (issue 14) and checks the documented behaviour instead."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alia_nemo.cli import main
from tests.helpers import read_jsonl, save_nan_tiny_model

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "alia_nemo.cli"]
SHORT = ["stage.max_steps=4", "run.save_every=2", "run.keep_checkpoints=null"]


def _train(capsys, out: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["train", f"run.output_dir={out}", *SHORT, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished 4-step run (checkpoints at steps 2 and 4, final/), copied by the tests that change it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = subprocess.run([*CLI, "train", f"run.output_dir={out}", *SHORT], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    return out


def test_rerun_of_a_finished_run_is_a_no_op(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in (out / "final").iterdir()}
    metrics = (out / "metrics.jsonl").read_text()
    code, stdout, _ = _train(capsys, out)
    assert code == 0
    assert "is a finished run (summary.json, final/): nothing to do" in stdout
    assert "done: 4 steps" in stdout  # the finished run's own summary
    assert {p: p.stat().st_mtime_ns for p in (out / "final").iterdir()} == before
    assert (out / "metrics.jsonl").read_text() == metrics  # no extra step was trained
    assert not (out / ".alia-nemo.lock").exists()


def test_resume_under_another_configuration_is_refused_unless_forced(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    config = (out / "config.yaml").read_text()
    code, _, err = _train(capsys, out, "stage.lr=2e-4")
    assert code == 2
    assert "holds a run trained with another configuration (stage.lr: 0.003 -> 0.0002)" in err
    assert "run.resume=force" in err
    assert (out / "config.yaml").read_text() == config  # not overwritten

    # Watching keys may change: still the same run (finished, so nothing to do).
    code, stdout, _ = _train(capsys, out, "run.print_every=1", "run.log_every=2")
    assert code == 0 and "nothing to do" in stdout

    code, stdout, _ = _train(capsys, out, "stage.max_steps=6", "run.resume=force")
    assert code == 0, capsys.readouterr()
    assert "run.resume=force: continuing" in stdout
    kept = list(out.glob("config.replaced-*.yaml"))
    assert len(kept) == 1 and kept[0].read_text() == config
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["global_step"] == 6 and summary["train"]["resumed_from"] == "checkpoint-4"


def test_resume_false_over_checkpoints_is_refused(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    code, _, err = _train(capsys, out, "run.resume=false", "stage.max_steps=5")
    assert code == 2 and "already holds checkpoints of a run and run.resume=false" in err


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    weights = out / "checkpoints" / "checkpoint-4" / "model.safetensors"
    half = weights.stat().st_size // 2
    with weights.open("r+b") as f:
        f.truncate(half)
    code, stdout, err = _train(capsys, out)
    assert code == 0, err
    assert "skipping checkpoint" in stdout and "checkpoint-4" in stdout
    moved = list((out / "incomplete-checkpoints").glob("checkpoint-4-*"))
    assert len(moved) == 1 and (moved[0] / "model.safetensors").stat().st_size == half  # kept, not deleted
    result = json.loads((out / "train_result.json").read_text())
    assert result["resumed_from"] == "checkpoint-2" and result["global_step"] == 4
    assert (out / "checkpoints" / "checkpoint-4" / "model.safetensors").stat().st_size > half  # saved again, whole


def test_symlink_at_final_is_not_written_through(tmp_path, capsys):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "final").symlink_to(elsewhere, target_is_directory=True)
    code, _, err = _train(capsys, out)
    assert code == 2 and "final is a symbolic link" in err
    assert list(elsewhere.iterdir()) == []


def test_empty_output_dir_is_refused(capsys):
    assert main(["train", "run.output_dir="]) == 2
    assert "run.output_dir" in capsys.readouterr().err
    assert main(["train", "run.output_dir=  "]) == 2
    assert "run.output_dir is empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage.lr=inf", "stage.lr: Input should be a finite number"),
        ("stage.grad_clip=inf", "stage.grad_clip: Input should be a finite number"),
        ("stage.adam_eps=1e-300", "stage.adam_eps: Input should be greater than or equal to"),
        ("stage.lr=nan", "stage.lr: Input should be a finite number"),
        ("data.name=../../x", "data.name: '../../x' is not a plain name"),
    ],
)
def test_settings_that_can_only_produce_garbage_are_refused(override, message, tmp_path, capsys):
    assert main(["train", f"run.output_dir={tmp_path / 'run'}", override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_stops_with_the_step_and_no_final(tmp_path, capsys):
    start = save_nan_tiny_model(tmp_path / "nan-model")
    out = tmp_path / "run"
    code, _, err = _train(capsys, out, f"model.pretrained={start}")
    assert code == 1
    assert "failed: training loss became nan at step 1; stopped there and wrote no final/" in err
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    assert not list((out / "checkpoints").glob("checkpoint-*")) if (out / "checkpoints").exists() else True
    assert json.loads((out / "nonfinite.json").read_text())["step"] == 1
    # A rerun does not continue from a run whose weights may be non-finite.
    code, _, err = _train(capsys, out, f"model.pretrained={start}")
    assert code == 2 and "is a run whose loss went non-finite" in err


def test_second_train_into_a_busy_directory_stops_at_once(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([*CLI, "train", f"run.output_dir={out}", "stage.max_steps=400"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not read_jsonl_safe(out / "metrics.jsonl"):
            assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()[-3000:]
            time.sleep(0.2)
        second = subprocess.run([*CLI, "train", f"run.output_dir={out}", "stage.max_steps=400"],
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert second.returncode == 2, second.stderr[-3000:]
        lock = json.loads((out / ".alia-nemo.lock").read_text())
        assert f"is in use: a training run by PID {lock['pid']} on host {lock['host']}" in second.stderr
        assert first.poll() is None  # the first run goes on, undisturbed
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    begins = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "train_begin"]
    assert len(begins) == 1


def read_jsonl_safe(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    except (OSError, ValueError):
        return []


def _tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0


def test_disk_full_while_checkpointing_names_the_cause(tmp_path, capsys):
    disk = tmp_path / "small"
    if not _tmpfs(disk, "3m"):
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    try:
        code, _, err = _train(capsys, disk / "run")
        last = err.strip().splitlines()[-1]  # (Ray relays the worker's own traceback above it)
        assert code == 2, err
        assert last.startswith(f"alia-nemo train: error: {disk / 'run'}") and "no space left on device" in last
    finally:
        subprocess.run(["umount", str(disk)], check=False)
