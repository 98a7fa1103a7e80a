"""What a user meets first (issue 19): a quiet, informative console, and everything else in the run's log.

The fast tests check the pieces (progress rates, the console's routing of Ray's worker lines, log records and
warnings, ``model-info``); the slow ones run ``alia-nemo train`` on the tiny default job through a subprocess, as a
user would, and read what it printed and what it logged.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from alia_nemo import console
from alia_nemo.engines.nemo_rl import MetricsRecorder
from alia_nemo.engines.progress import Progress, duration

CLI = [sys.executable, "-m", "alia_nemo.cli"]
# Printed by Ray, Ray Train or the libraries during a default run; none of it may reach the console.
NOISE = (
    "Failed to query Ray Train Controller",
    "PreemptionWatcher",
    "Token authentication is enabled",
    "Requesting resources",
    "Started training worker group",
    "Writing model shards",
    "The used dataset had no length",
    "Transformer Engine and Apex are not installed",
    "UserWarning",
    "(TrainController pid=",
    "(RayTrainWorker pid=",
    "(PlacementGroupCleaner pid=",
)
PROGRESS = re.compile(r"^\[alia-nemo\] step (\d+)/(\d+) loss [\d.]+ lr \S+ \| [\d,]+ tok/s \| ETA \S+$", re.M)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# progress lines ---------------------------------------------------------------------------------------------------


def test_progress_measures_from_the_end_of_the_warm_up_step():
    clock = Clock()
    progress = Progress(total_steps=101, clock=clock)
    progress.begin(step=0, tokens=0)
    clock.now += 30  # the first step: model set-up and first batches
    assert progress.suffix(1, tokens=1_000) == ""  # no rate worth showing yet
    clock.now += 10  # 10 steps, 20,000 tokens, in 10 s
    assert progress.suffix(11, tokens=21_000) == " | 2,000 tok/s | ETA 1m30s"  # 90 steps left at 1 s per step
    clock.now += 40  # slower: 10 steps in 40 s; since step 1, 20 steps in 50 s
    assert progress.suffix(21, tokens=41_000) == " | 500 tok/s | ETA 3m20s"  # 80 steps left x 2.5 s
    clock.now += 5
    assert progress.suffix(101, tokens=200_000) == " | 31,800 tok/s | took 1m25s"


def test_progress_of_a_resumed_attempt_counts_from_its_checkpoint():
    clock = Clock()
    progress = Progress(total_steps=200, clock=clock)
    progress.begin(step=150, tokens=1_500_000)  # the checkpoint's step and token count
    clock.now += 5
    assert progress.suffix(151, tokens=1_510_000) == ""
    clock.now += 19
    assert progress.suffix(170, tokens=1_700_000) == " | 10,000 tok/s | ETA 30s"
    assert Progress(10, clock=clock).suffix(3, tokens=None) == ""  # never begun: begins, no rate from one point


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (185, "3m05s"), (7380, "2h03m"), (86400 + 4 * 3600, "1d04h")],
)
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_nemo_rl_recorder_prints_the_same_progress_lines(tmp_path, capsys):
    rec = MetricsRecorder(tmp_path / "metrics.jsonl", total_steps=4, print_every=2)
    for step in range(1, 5):
        rec.log_metrics({"loss": 2.0 / step, "lr": 1e-3, "global_valid_toks": 500}, step, "train")
    rec.log_metrics({"val_loss": 1.5}, 4, "validation")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" loss")[0] for line in lines] == [
        "[alia-nemo] step 1/4",
        "[alia-nemo] step 2/4",
        "[alia-nemo] step 4/4",
        "[alia-nemo] step 4 validation",
    ]
    assert re.fullmatch(r"\[alia-nemo\] step 2/4 loss 1\.0000 lr 0\.001 \| [\d,]+ tok/s \| ETA \S+", lines[1])
    assert "| took " in lines[2] and lines[3] == "[alia-nemo] step 4 validation loss 1.5000"
    # DPO rows show margin and accuracy; without print_every (a test's recorder, a bare config) nothing is printed.
    dpo = MetricsRecorder(tmp_path / "dpo.jsonl", reward_scale=0.5, total_steps=2, print_every=1)
    dpo.log_metrics({"loss": 0.6, "accuracy": 0.75, "rewards_chosen_mean": 1.0, "rewards_rejected_mean": 0.2}, 1,
                    "train")  # fmt: skip
    assert capsys.readouterr().out.startswith("[alia-nemo] step 1/2 loss 0.6000 margin 0.4000 accuracy 0.7500 lr 0")
    MetricsRecorder(tmp_path / "quiet.jsonl").log_metrics({"loss": 1.0}, 1, "train")
    assert capsys.readouterr().out == ""


# the run console --------------------------------------------------------------------------------------------------


def _worker(lines: list[str], name: str = "RayTrainWorker", err: bool = False, pid: int | str = 4242) -> dict:
    return {"lines": lines, "pid": pid, "actor_name": name, "is_err": err, "ip": "127.0.0.1", "job": "01000000"}


def test_worker_lines_reach_the_log_and_only_ours_the_console(tmp_path, capsys):
    with console.run_console(tmp_path, "test") as con:
        con.worker_lines(_worker(["[alia-nemo] step 1/3 loss 2.0000 lr 0.001", "Writing model shards: 100%"]))
        con.worker_lines(_worker(["Failed to query Ray Train Controller actor state."], "PlacementGroupCleaner", True))
        con.worker_lines({"lines": ["Node status", "Resources"], "pid": "autoscaler", "is_err": False})  # status
        con.worker_lines({"lines": ["A worker died or was killed"], "pid": "raylet", "is_err": True})
        print("[alia-nemo] from the driver")
    out, err = capsys.readouterr()
    assert out == "[alia-nemo] step 1/3 loss 2.0000 lr 0.001\n[alia-nemo] from the driver\n"
    assert err == "(raylet) A worker died or was killed\n"
    assert con.suppressed == 2
    log = (tmp_path / "logs" / "console.log").read_text()
    assert "(RayTrainWorker pid=4242) [stdout] [alia-nemo] step 1/3 loss 2.0000" in log
    assert "(RayTrainWorker pid=4242) [stdout] Writing model shards: 100%" in log
    assert "(PlacementGroupCleaner pid=4242) [stderr] Failed to query Ray Train Controller actor state." in log
    assert "Node status" not in log  # the autoscaler's periodic report: Ray never prints it either
    assert "[alia-nemo] from the driver" in log and log.startswith("===== ") and log.rstrip().endswith("done")
    assert not isinstance(sys.stdout, console._Tee) and console.current() is None  # all put back


def test_log_records_and_warnings_go_to_the_log_unless_verbose(tmp_path, capsys):
    last_resort, handlers = logging.lastResort, list(logging.getLogger("ray").handlers)
    with console.run_console(tmp_path / "quiet", "test"):
        logging.getLogger("ray._private.authentication").warning("Token authentication is enabled")
        logging.getLogger("megatron.core").warning("megatron says")
        warnings.warn("Transformer Engine and Apex are not installed", UserWarning, stacklevel=1)
    assert capsys.readouterr().err == ""
    log = (tmp_path / "quiet" / "logs" / "console.log").read_text()
    for text in ("Token authentication is enabled", "megatron says", "Transformer Engine and Apex"):
        assert text in log
    console.set_verbose(True)
    try:
        with console.run_console(tmp_path / "loud", "test"):
            logging.getLogger("megatron.core").warning("megatron says")
    finally:
        console.set_verbose(False)
    assert "megatron says" in capsys.readouterr().err
    assert "megatron says" in (tmp_path / "loud" / "logs" / "console.log").read_text()
    assert logging.lastResort is last_resort and logging.getLogger("ray").handlers == handlers  # all put back


def test_a_failed_run_names_its_log_and_a_usage_error_does_not(tmp_path, capsys):
    from alia_nemo.errors import ConfigError

    with pytest.raises(RuntimeError), console.run_console(tmp_path / "a", "test"):
        raise RuntimeError("worker died")
    assert f"full output, Ray's and the libraries' messages included: {tmp_path / 'a' / 'logs' / 'console.log'}" in (
        capsys.readouterr().err
    )
    with pytest.raises(ConfigError), console.run_console(tmp_path / "b", "test"):
        raise ConfigError("bad key")
    assert capsys.readouterr().err == ""
    assert "stopped: ConfigError: bad key" in (tmp_path / "b" / "logs" / "console.log").read_text()


def _warned_inside_quiet_libraries() -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with console.quiet_libraries():
            warnings.warn("Apex is not installed", UserWarning, stacklevel=1)
    return [str(w.message) for w in caught]


def test_quiet_libraries_hides_warnings_unless_verbose(capsys):
    assert _warned_inside_quiet_libraries() == []
    with console.quiet_libraries():
        logging.getLogger("megatron.core").warning("megatron says")  # no handler of its own: not printed either
    assert capsys.readouterr().err == ""
    console.set_verbose(True)
    try:
        assert _warned_inside_quiet_libraries() == ["Apex is not installed"]
    finally:
        console.set_verbose(False)


def test_model_info_prints_only_its_json():
    proc = subprocess.run([*CLI, "model-info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == "alia_tiny"
    assert proc.stderr == ""  # megatron-core's import-time warnings are not shown


@pytest.mark.slow
def test_model_info_verbose_shows_the_library_warnings():
    proc = subprocess.run([*CLI, "model-info", "--verbose"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and json.loads(proc.stdout)["model"] == "alia_tiny"
    assert "Transformer Engine and Apex are not installed" in proc.stderr


# real runs ----------------------------------------------------------------------------------------------------------


def _train(out: Path, *extra: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``alia-nemo train`` on the default job, 1 epoch (17 steps), stdout and stderr in one stream, in order."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("ALIA_NEMO_VERBOSE", "RAY_AUTH_MODE")}
    env.update(env_extra or {})
    argv = [*CLI, "train", f"run.output_dir={out}", "stage.epochs=1", "run.print_every=5", "run.save_every=5",
            "run.keep_checkpoints=null", *extra]  # fmt: skip
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("quiet") / "run"
    return out, _train(out).stdout


@pytest.mark.slow
def test_default_train_is_quiet_and_says_where_when_and_how_fast(quiet_run):
    out, text = quiet_run
    lines = text.splitlines()
    assert lines[0] == f"[alia-nemo] run directory: {out} (full log: logs/console.log)"
    for noise in NOISE:
        assert noise not in text, noise
    progress = PROGRESS.findall(text)
    assert [int(step) for step, _ in progress] == [5, 10, 15] and {total for _, total in progress} == {"17"}
    assert re.search(r"^\[alia-nemo\] step 1/17 loss [\d.]+ lr \S+$", text, re.M)  # warm-up step: no rates yet
    assert re.search(r"^\[alia-nemo\] step 17/17 loss [\d.]+ lr \S+ \| [\d,]+ tok/s \| took \S+$", text, re.M)
    assert "[alia-nemo] done: 17 steps" in text
    # The log holds what was shown and what was not: Ray Train's controller, the token notice, the workers' stderr.
    log = (out / "logs" / "console.log").read_text()
    for line in lines:
        if line.startswith("[alia-nemo] step "):
            assert line in log
    assert "(TrainController pid=" in log and "Started training worker group" in log
    assert "Token authentication is enabled" in log
    assert "(RayTrainWorker pid=" in log and "Writing model shards" in log


@pytest.mark.slow
def test_rerun_of_a_finished_run_says_already_finished(quiet_run):
    out, _ = quiet_run
    proc = _train(out)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"[alia-nemo] run directory: {out}")
    assert f"[alia-nemo] already finished: {out} is a finished run" in proc.stdout
    assert f"its model is {out / 'final'}" in proc.stdout
    assert "Ray" not in proc.stdout and "step 5/17" not in proc.stdout  # nothing started, nothing trained


@pytest.mark.slow
def test_resume_says_from_where_and_verbose_shows_everything(quiet_run, tmp_path):
    finished, _ = quiet_run
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    for name in ("final", "checkpoints/checkpoint-17"):
        shutil.rmtree(out / name)
    (out / "summary.json").unlink()
    log_before = (out / "logs" / "console.log").read_text()
    proc = _train(out, "--verbose")
    text = proc.stdout
    assert text.splitlines()[0].startswith(f"[alia-nemo] run directory: {out}")
    assert "[alia-nemo] resuming from checkpoint-15 (step 15 of 17)" in text
    assert text.index("resuming from checkpoint-15") < text.index("Started training worker group")  # before Ray
    # --verbose: Ray's and the libraries' lines on the console, as Ray prints them.
    assert "Token authentication is enabled" in text
    assert "(TrainController pid=" in text and "(RayTrainWorker pid=" in text
    assert "[alia-nemo] done: 17 steps" in text
    log = (out / "logs" / "console.log").read_text()
    assert log.startswith(log_before)  # earlier attempts' parts kept, this one appended
    added = log[len(log_before) :]
    assert added.count("===== ") == 2 and "Started training worker group" in added
