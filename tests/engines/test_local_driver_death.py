"""A driver killed with SIGKILL takes its Ray training workers with it: nothing more is written into the run.

Ray 2.60 on Linux already stops them by itself (the embedded gcs_server and raylet share the driver's fate), so
the end-to-end test guards the outcome; the tests with a stand-in driver prove the workers' own watchdog.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from alia_nemo.engines.local import DriverWatch
from alia_nemo.locks import identity

CLI = [sys.executable, "-m", "alia_nemo.cli"]
MARKER = "ALIA_NEMO_TEST_RUN"  # in the driver's environment, and so in every process its embedded Ray starts


def run_processes(marker: str) -> list[psutil.Process]:
    """Every live process of the run: those whose environment carries ``MARKER=marker``."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(MARKER) == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _names(procs: list[psutil.Process]) -> list[str]:
    names = []
    for p in procs:
        try:
            names.append(f"{p.pid}:{' '.join(p.cmdline())[:60]}")
        except psutil.Error:
            continue
    return names


def train_workers(marker: str) -> list[psutil.Process]:
    """The run's Ray Train workers (the processes that write checkpoints and ``final/``)."""
    out = []
    for p in run_processes(marker):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "ray" not in p.relative_to(root).parts[:1]}


# A stand-in Ray worker: the engine's watchdog, then "training" that writes a file every 50 ms.
WORKER = """
import json, sys, time
from pathlib import Path
from alia_nemo.engines.local import start_driver_watchdog
start_driver_watchdog(json.loads(sys.argv[1]), Path(sys.argv[2]), interval_s=0.2)
while True:
    Path(sys.argv[3]).write_text(str(time.time()))
    time.sleep(0.05)
"""
# A stand-in driver: says who it is (as run_local passes it to the workers), then waits to be killed.
DRIVER = (
    "import json, time; from alia_nemo.locks import identity; print(json.dumps(identity()), flush=True); "
    "time.sleep(300)"
)


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_watchdog_exits_the_worker_when_its_driver_is_killed(tmp_path, reaped):
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        who = driver.stdout.readline()
        tick = tmp_path / "tick"
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, who, str(tmp_path / ".alia-nemo.lock"), str(tick)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 60
        while not tick.exists():
            assert worker.poll() is None and time.time() < deadline, worker.stdout.read()
            time.sleep(0.05)
        time.sleep(1.0)
        assert worker.poll() is None  # a live driver: the worker keeps going

        killed_at = time.time()
        driver.kill()
        if reaped:
            driver.wait()  # else a zombie until the finally below: dead all the same
        assert worker.wait(timeout=10) == 1
        assert time.time() - killed_at < 5
        assert f"the driver (PID {driver.pid} on {json.loads(who)['host']}) is gone" in worker.stdout.read()
        last = tick.stat().st_mtime
        time.sleep(0.5)
        assert tick.stat().st_mtime == last  # nothing written after the exit
    finally:
        for proc in (driver, worker):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait()


def test_driver_on_this_host_is_judged_by_its_pid(tmp_path):
    lock = tmp_path / ".alia-nemo.lock"
    assert DriverWatch(identity(), lock).gone() is None
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        other = {**identity(), "pid": sleeper.pid, "start_ticks": None}
        assert DriverWatch(other, lock).gone() is None
        reused = {**identity(), "start_ticks": identity()["start_ticks"] + 1}  # same PID, another process
        assert DriverWatch(reused, lock).gone() == f"PID {os.getpid()} no longer runs"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert DriverWatch(other, lock).gone() == f"PID {sleeper.pid} no longer runs"


def test_driver_on_another_host_is_judged_by_its_lock(tmp_path):
    lock = tmp_path / ".alia-nemo.lock"
    driver = {**identity(), "host": "elsewhere"}
    watch = DriverWatch(driver, lock, stale_s=1.0)
    assert watch.gone() is None  # no lock: no way to tell, keep going
    lock.write_text(json.dumps({**driver, "token": "t", "what": "training run"}))
    os.utime(lock, (0, 0))  # an mtime far in the past is no verdict (clocks of hosts differ); a still one is
    assert watch.gone() is None
    time.sleep(0.3)
    os.utime(lock)  # a heartbeat
    assert watch.gone() is None
    time.sleep(0.3)
    assert watch.gone() is None
    time.sleep(0.8)
    assert "has not been refreshed for" in watch.gone()
    lock.write_text(json.dumps({**driver, "pid": driver["pid"] + 1}))  # taken over by a new run
    assert "is held by another process" in DriverWatch(driver, lock).gone()


@pytest.mark.slow
def test_killed_driver_stops_its_training_workers(tmp_path):
    out = tmp_path / "run"
    marker = uuid.uuid4().hex
    args = [*CLI, "train", f"run.output_dir={out}", "run.save_every=5", "stage.epochs=4"]  # 72 steps, ~35 s
    driver = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, MARKER: marker},
    )
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "checkpoint-5" / "trainer_state.json").is_file():
            assert driver.poll() is None and time.time() < deadline, "training ended or stalled before checkpoint-5"
            time.sleep(0.05)
        assert train_workers(marker), "no Ray Train worker found while training"

        killed_at = time.time()
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone: not its process group, not Ray
        driver.wait()
        while train_workers(marker):
            assert time.time() - killed_at < 15, f"workers still run: {_names(train_workers(marker))}"
            time.sleep(0.2)
        stopped_after = time.time() - killed_at

        # Nothing writes into the run any more, and it was really interrupted.
        before = _files(out)
        time.sleep(10)
        assert _files(out) == before
        assert not (out / "final").exists()
        assert not (out / "checkpoints" / "checkpoint-70").exists()
        print(f"workers stopped {stopped_after:.1f} s after the driver was killed")
        lingering = _names(run_processes(marker))
        print(f"Ray processes of the run still alive 10 s later: {lingering}")
    finally:
        # The killed driver's embedded Ray (gcs_server, raylet, their helpers) and anything else of the run:
        # processes this test started, found by the marker in their environment.
        for proc in run_processes(marker):
            try:
                proc.kill()
            except psutil.Error:
                continue
        if driver.poll() is None:
            driver.kill()
            driver.wait()
