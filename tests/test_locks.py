"""alia_nemo.locks: a live holder is never displaced, on this host or another; a provably gone one is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from alia_nemo.errors import LockedError
from alia_nemo.locks import DirLock, holder_alive, identity, read_lock


def _plant(path, age_s: float = 0.0, **fields) -> None:
    path.write_text(json.dumps({"token": "theirs", "what": "cache build", **fields}))
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_second_holder_is_refused_naming_the_first(tmp_path):
    lock = tmp_path / ".lock"
    with DirLock(lock, "training run"):
        with pytest.raises(LockedError) as err:
            DirLock(lock, "training run").acquire()
        me = identity()
        assert f"is in use: a training run by PID {me['pid']} on host {me['host']}" in str(err.value)
    assert not lock.exists()  # released


def test_dead_pid_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".lock"
    _plant(lock, **{**identity(), "pid": int(dead.stdout)})
    assert not holder_alive(read_lock(lock))
    with DirLock(lock, "training run") as held:
        assert json.loads(lock.read_text())["token"] == held.token


def test_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
    lock = tmp_path / ".lock"
    _plant(lock, **{**identity(), "start_ticks": identity()["start_ticks"] - 1})  # our PID, another process
    assert not holder_alive(read_lock(lock))


def test_other_host_or_pid_namespace_is_judged_by_its_heartbeat(tmp_path):
    lock = tmp_path / ".lock"
    # A live build on another node: its PID means nothing here, its heartbeat is fresh.
    _plant(lock, host="node-b", pid=1, pid_namespace="pid:[1]", age_s=5)
    with pytest.raises(LockedError, match="on host node-b"):
        DirLock(lock, "cache build").acquire()
    assert json.loads(lock.read_text())["token"] == "theirs"  # untouched
    # Same host name, another PID namespace (a container): still the heartbeat decides.
    _plant(lock, host=identity()["host"], pid=999999, pid_namespace="pid:[other]", age_s=5)
    with pytest.raises(LockedError):
        DirLock(lock, "cache build").acquire()
    # Its heartbeat stopped long ago: the holder is gone.
    _plant(lock, host="node-b", pid=1, pid_namespace="pid:[1]", age_s=120)
    with DirLock(lock, "cache build", stale_s=60):
        assert json.loads(lock.read_text())["host"] == identity()["host"]


def test_heartbeat_keeps_the_lock_fresh_and_release_leaves_others_alone(tmp_path):
    lock = tmp_path / ".lock"
    held = DirLock(lock, "training run", heartbeat_s=0.05).acquire()
    old = time.time() - 100
    os.utime(lock, (old, old))
    time.sleep(0.3)
    assert read_lock(lock)["age_s"] < 5
    _plant(lock, host="node-b")  # someone replaced it (an operator): ours is lost, theirs must survive release
    time.sleep(0.2)
    held.release()
    assert held.lost and json.loads(lock.read_text())["token"] == "theirs"
