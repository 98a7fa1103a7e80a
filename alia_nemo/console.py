"""What a command shows on the console, and where everything else it prints goes.

A default ``alia-nemo train`` shows its own lines (``[alia-nemo] ...``: the run directory, data, resume, progress
with throughput and ETA, the result). Everything else its processes print goes only to the run's log,
``<run dir>/logs/console.log``, which also holds everything shown, so nothing is lost. ``--verbose`` (or
``ALIA_NEMO_VERBOSE=1``) shows it all on the console too. Where the noise of the embedded default job comes from
(Ray 2.60, transformers 5, megatron-core) and how each kind is handled:

- Lines printed by Ray's worker processes: Ray Train's controller (``Requesting resources``, ``Started training
  worker group``; on an external cluster also its C++ ``core_worker.cc`` note that the ``PreemptionWatcher`` actor
  keeps constructor arguments in the object store: the embedded cluster does not start that actor, see
  ``alia_nemo.engines.local._init_ray``), the detached ``PlacementGroupCleaner`` (``Failed to query Ray Train
  Controller actor state``, every few seconds for the whole run: it asks Ray's State API, which needs the
  dashboard the embedded cluster does not start; Ray has no switch for it), and the training workers' stderr
  (transformers' ``Writing model shards`` bars and ``[RANK 0] The used dataset had no length`` notes). Ray ships
  every line a worker writes to the driver (``log_to_driver``), where one handler of Ray's stream dispatcher
  prints them. :func:`route_worker_output` puts our handler in its place: every line goes to the log with Ray's
  ``(name pid=N)`` prefix, and only our own lines (and the raylet's, and the autoscaler's warnings) reach the
  console. Filtering here, in the driver, rather than silencing loggers inside the workers, is what keeps all of
  it in the log and covers what no logger emits (C++ core-worker lines, tqdm bars, print()).
- Python logging in the driver: Ray's token-authentication notice (``ray._private.authentication``; Ray's
  ``ray`` logger does not propagate and ``configure_logging=False`` leaves it without a handler, so Python's
  last-resort handler printed it), Ray Train's driver-side messages, transformers' own stderr handler, and
  ``warnings.warn`` calls (megatron-core's "Transformer Engine and Apex are not installed", ...). While a run is
  open they all go to the log through one handler on the root and ``ray`` loggers (warnings captured into
  logging, transformers' handler swapped for propagation); ``--verbose`` echoes warnings and errors to stderr.
- Everything the driver writes to ``sys.stdout`` / ``sys.stderr`` (our lines, NeMo-RL's, the data preparation's
  progress bars, Ray's error messages from the raylet) is shown as before and copied to the log.

What bypasses Python (a C library writing straight to file descriptor 2 of the driver) is shown and not logged.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO

VERBOSE_ENV = "ALIA_NEMO_VERBOSE"
MARK = "[alia-nemo]"  # how our own lines begin, on the driver and in the workers
LOG_NAME = Path("logs") / "console.log"  # inside the run directory

_verbose_flag = False
_current: RunConsole | None = None


def set_verbose(flag: bool) -> None:
    """Set by the CLI from ``--verbose`` for the command it runs."""
    global _verbose_flag
    _verbose_flag = bool(flag)


def verbose() -> bool:
    """True when everything should reach the console (``--verbose`` or ``ALIA_NEMO_VERBOSE=1``)."""
    return _verbose_flag or os.environ.get(VERBOSE_ENV) == "1"


def current() -> RunConsole | None:
    """The run console open in this process, if any."""
    return _current


class _Tee:
    """A text stream that writes to ``stream`` and copies everything into the run's log."""

    def __init__(self, stream: TextIO, console: RunConsole):
        self._stream = stream
        self._console = console

    def write(self, text: str) -> int:
        self._console.log(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the real stream's
        return getattr(self._stream, name)


class _LogHandler(logging.Handler):
    """Every record into the run's log; with ``echo``, warnings and errors to the real stderr too."""

    def __init__(self, console: RunConsole, echo: bool):
        super().__init__(logging.DEBUG)
        self.console = console
        self.echo = echo
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
            self.console.log(text)
            if self.echo and record.levelno >= logging.WARNING:
                self.console.show(text, err=True)
            else:
                self.console.suppressed += 1
        except Exception:  # a broken log must never break the run
            self.handleError(record)


class RunConsole:
    """The open log of one run and what its console shows (see the module docstring)."""

    def __init__(self, path: Path, show_all: bool):
        self.path = Path(path)
        self.show_all = show_all
        self.suppressed = 0  # lines kept out of the console (worker lines and log records not echoed)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8", errors="replace", buffering=1)
        self._stdout: TextIO = sys.stdout
        self._stderr: TextIO = sys.stderr

    def log(self, text: str) -> None:
        """Append ``text`` to the log (never raises: a full disk must not stop training)."""
        with self._lock, suppress(OSError, ValueError):
            self._file.write(text)

    def show(self, text: str, err: bool = False) -> None:
        """Write ``text`` to the real console only (it is logged by the caller)."""
        stream = self._stderr if err else self._stdout
        with suppress(OSError, ValueError):
            stream.write(text)
            stream.flush()

    def worker_lines(self, data: dict[str, Any]) -> None:
        """Ray's stream-dispatcher handler: one batch of lines a worker process printed (``data["lines"]``).

        All go to the log. The console gets our own lines (stdout), the raylet's (a worker killed for memory, a
        crashed process) and the autoscaler's warnings and errors (a request no node can fit), as Ray shows them.
        """
        pid, lines = data.get("pid"), data.get("lines", [])
        if pid == "autoscaler":  # its periodic status report is the monitor's log, never printed by Ray either
            lines = _autoscaler_events(lines)
        name = data.get("actor_name") or data.get("task_name")
        prefix = f"({name} pid={pid})" if name else f"({pid})" if pid in ("autoscaler", "raylet") else f"(pid={pid})"
        stream = "stderr" if data.get("is_err") else "stdout"
        for line in lines:
            self.log(f"{prefix} [{stream}] {line}\n")
            if line.lstrip().startswith(MARK):
                self.show(line.lstrip() + "\n")
            elif pid == "raylet" or (pid == "autoscaler" and ("Error" in line or "Warning" in line)):
                self.show(f"{prefix} {line}\n", err=True)
            else:
                self.suppressed += 1

    def close(self) -> None:
        with self._lock, suppress(OSError):
            self._file.close()


@contextmanager
def run_console(run_dir: Path, header: str) -> Iterator[RunConsole]:
    """Open ``run_dir``'s log (appended to on every attempt) and route the process' output as described above.

    ``header`` starts this attempt's part of the log. When the run fails the console gets one line naming the log.
    """
    global _current
    show_all = verbose()
    console = RunConsole(Path(run_dir) / LOG_NAME, show_all)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    console.log(f"===== {stamp} pid {os.getpid()}: {header}\n")
    previous, _current = _current, console
    # Logging first: a handler a library creates now (transformers' own) must hold the real stderr, not our copy.
    undo = _route_logging(_LogHandler(console, echo=show_all))
    old_out, old_err = sys.stdout, sys.stderr
    tees = _Tee(old_out, console), _Tee(old_err, console)
    sys.stdout, sys.stderr = tees
    try:
        yield console
        console.log(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} done\n")
    except BaseException as exc:
        console.log(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} stopped: {type(exc).__name__}: {exc}\n")
        # A failed run, not a usage error (exit code 2: its one line says all there is to say) or an interrupt.
        if isinstance(exc, Exception) and getattr(exc, "exit_code", 1) != 2:
            console.show(f"{MARK} the run's full output, Ray's and the libraries' messages included: {console.path}\n",
                         err=True)  # fmt: skip
        raise
    finally:
        undo()
        sys.stdout, sys.stderr = old_out, old_err
        _untee_handlers(tees)
        _current = previous
        console.close()


def _untee_handlers(tees: tuple[_Tee, ...]) -> None:
    """Point log handlers created during the run at the streams our copies wrapped.

    A ``StreamHandler`` keeps the ``sys.stderr`` of the moment it was made (Ray makes one when it is first
    imported, which is inside a run): left alone it would write through a closed log to the old stream.
    """
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values())]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and any(stream is tee for tee in tees):
                handler.setStream(stream._stream)


def _autoscaler_events(lines: list[str]) -> list[str]:
    """The autoscaler's event lines among ``lines``, picked as Ray's own printer picks them."""
    try:
        from ray._private.worker import filter_autoscaler_events

        return list(filter_autoscaler_events(lines))
    except Exception:  # another Ray, or no GCS to ask which autoscaler runs: drop them, as they are not ours
        return []


def _route_logging(handler: logging.Handler) -> Any:
    """Send the driver's log records (and warnings) to ``handler`` only; returns what undoes it."""
    # "ray" does not propagate (Ray's setting): ours replaces its handlers (Ray's stderr one, added at import), and
    # ray.init(configure_logging=False) clears them: records of Ray's loggers then reach Python's last-resort
    # handler, which becomes ours too.
    root, ray_logger, last_resort = logging.getLogger(), logging.getLogger("ray"), logging.lastResort
    ray_handlers = list(ray_logger.handlers)
    root.addHandler(handler)
    ray_logger.handlers = [handler]
    logging.lastResort = handler
    captured = _capture_warnings()
    hf = _transformers_logging()
    if hf is not None:  # its own stderr handler, not propagating: swap it for ours
        hf.disable_default_handler()
        hf.enable_propagation()

    def undo() -> None:
        logging.lastResort = last_resort
        root.removeHandler(handler)
        ray_logger.handlers = ray_handlers
        captured()
        if hf is not None:
            hf.disable_propagation()
            hf.enable_default_handler()

    return undo


def _capture_warnings() -> Any:
    """Route ``warnings.warn`` into logging (``py.warnings``) until the returned function is called."""
    already = getattr(warnings.showwarning, "__module__", "") == "logging"
    logging.captureWarnings(True)
    return (lambda: None) if already else (lambda: logging.captureWarnings(False))


def _transformers_logging() -> Any:
    """transformers' logging utilities, where transformers is installed."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    return hf_logging


def route_worker_output() -> bool:
    """After ``ray.init(log_to_driver=True)``: print Ray's worker lines through the open run console.

    Replaces Ray's ``ray_print_logs`` handler of its stream dispatcher (``ray._private.ray_logging``, Ray 2.x);
    ``ray.shutdown()`` removes it again, ``ray.init()`` adds Ray's back. Returns False, leaving Ray's printing as it
    is, with ``--verbose`` (Ray's handler prints to ``sys.stdout``/``sys.stderr``, which the console copies into
    the log), without an open run console, or should a Ray version lack the dispatcher.
    """
    console = _current
    if console is None or console.show_all:
        return False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", console.worker_lines)
    return True


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep the libraries' warnings (``warnings.warn``, log records, transformers' handler) off the console.

    For commands without a run directory (``model-info``): megatron-core warns at import that Transformer
    Engine and Apex are missing, which says nothing about the counts. With ``--verbose`` nothing is hidden.
    """
    if verbose():
        yield
        return
    hf = _transformers_logging()
    sink = logging.NullHandler()  # a handler on the root logger: Python's last-resort printing stays off
    root = logging.getLogger()
    root.addHandler(sink)
    level = hf.get_verbosity() if hf is not None else None
    if hf is not None:
        hf.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeHandler(sink)
        if hf is not None:
            hf.set_verbosity(level)
