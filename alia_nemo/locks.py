"""Exclusive locks on directories that work across hosts sharing a filesystem (Lustre, GPFS, NFS).

A lock is a small JSON file created with ``O_CREAT | O_EXCL`` (atomic on every shared filesystem we
target, unlike ``fcntl`` on some NFS/Lustre mounts) naming its holder: host, PID, PID namespace,
process start time. While held, a thread refreshes the file's mtime every ``heartbeat_s`` seconds.

A lock is stale, and may be taken over, when its holder is provably gone: on the same host and PID
namespace, the PID no longer runs the same process; anywhere else (another node, another container),
the heartbeat is older than ``stale_s``. A live holder is never displaced.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from alia_nemo.errors import LockedError

HEARTBEAT_S = 5.0
STALE_S = 60.0


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused PID from the holder)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def identity() -> dict[str, Any]:
    """Who this process is, as a lock file records it."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_namespace": _pid_namespace(),
        "start_ticks": _start_ticks(os.getpid()),
    }


def read_lock(path: Path) -> dict[str, Any] | None:
    """The lock file's holder record (with ``age_s``, seconds since its last heartbeat); None if there is none."""
    try:
        st = path.stat()
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        info = {}  # half-written or foreign: judged by its heartbeat alone
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
    if not isinstance(info, dict):
        info = {}
    info["age_s"] = max(0.0, time.time() - st.st_mtime)
    return info


def holder_alive(info: dict[str, Any], stale_s: float = STALE_S) -> bool:
    """True unless the holder is provably gone (see the module docstring)."""
    me = identity()
    same_process_space = info.get("host") == me["host"] and info.get("pid_namespace") == me["pid_namespace"]
    if same_process_space and isinstance(info.get("pid"), int):
        ticks = _start_ticks(info["pid"])
        return ticks is not None and (info.get("start_ticks") in (None, ticks))
    return info.get("age_s", 0.0) <= stale_s


class DirLock:
    """An exclusive, heartbeated lock file; use as a context manager.

    ``what`` says what the lock protects in the error another process gets ("training run", "cache build").
    """

    def __init__(self, path: Path, what: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.path = Path(path)
        self.what = what
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> DirLock:
        """Take the lock, taking over a stale one; raise :class:`LockedError` naming a live holder."""
        record = json.dumps({**identity(), "token": self.token, "what": self.what, "since": time.time()})
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = read_lock(self.path)
                if info is None:
                    continue  # released meanwhile: try again
                if holder_alive(info, self.stale_s):
                    raise LockedError(
                        f"{self.path.parent} is in use: a {info.get('what', 'process')} by PID {info.get('pid', '?')} "
                        f"on host {info.get('host', '?')} holds {self.path} (heartbeat {info['age_s']:.0f} s ago). "
                        f"Wait for it to finish, or use another directory. If that process is gone, the lock "
                        f"is taken over by itself {self.stale_s:.0f} s after its last heartbeat."
                    ) from None
                self._take_over(info)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record)
            self._thread = threading.Thread(target=self._beat, name=f"alia-lock-{self.path.name}", daemon=True)
            self._thread.start()
            return self
        raise LockedError(f"could not take {self.path}: other processes keep racing for it; try again")

    def _take_over(self, info: dict[str, Any]) -> None:
        """Move a stale lock aside, and put it back if it turns out to be a fresh one taken meanwhile."""
        aside = self.path.with_name(f"{self.path.name}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = read_lock(aside) or {}
        if moved.get("token") != info.get("token"):
            os.rename(aside, self.path)  # someone else's fresh lock: give it back
            return
        print(f"[alia-nemo] took over the stale lock {self.path} of PID {info.get('pid')} on {info.get('host')}",
              file=sys.stderr)  # fmt: skip
        aside.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if json.loads(self.path.read_text()).get("token") != self.token:
                    self.lost = True
                    return
                os.utime(self.path)
            except (OSError, ValueError):
                self.lost = True
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        info = read_lock(self.path)
        if info is not None and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
