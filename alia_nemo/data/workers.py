"""Parallel data preparation: an ordered map over batches, in-process, on local cores, or across a Ray cluster.

``prepare`` hands batches of conversations or documents to :meth:`Workers.imap` and reads the results back in
submission order, so the prepared bytes never depend on how many workers there were. At most ``ahead``
batches are in flight (memory stays flat whatever the data's size); a consumer that stops early (a selection
that has enough) leaves the rest unread. Each worker holds its own copy of the tokenizer, sent once (its Rust
core, :class:`PortableTokenizer`: a worker needs neither transformers nor torch).

Backends (``data.workers``; the cluster is ``engine.ray_address`` or ``RAY_ADDRESS``, as for the engines):

- ``inline``: the calling process (``data.workers=1``, and the default for small data: starting processes
  would cost more than they save);
- ``processes``: local processes (``spawn``), one per core by default;
- ``ray``: one Ray actor per worker (default: one per CPU of the cluster), so ``alia-nemo submit --run
  prepare`` tokenises on every node of the allocation.

The functions mapped take ``(tokenizer, item)`` and must be importable module-level functions.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

from alia_nemo.errors import AliaError

Backend = Literal["inline", "processes", "ray"]
# Below this much work (conversations, or documents of ~1k tokens), starting worker processes (each imports
# transformers and loads the tokenizer, a few seconds) costs more than it saves: auto runs in-process.
SMALL_WORK = 20_000

_TOKENIZER: Any = None  # a worker process's tokenizer (processes backend)


class WorkersError(AliaError, RuntimeError):
    """Workers that can not be started (a Ray cluster that can not be reached); names the fix."""


def local_cores() -> int:
    """CPU cores this process may run on (the SLURM / cgroup affinity, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose(workers: int, work: int, address: str | None) -> tuple[Backend, int]:
    """The backend and worker count for ``data.workers`` (0: auto) and ``work`` items.

    With a cluster address, workers run there (0: one per CPU of the cluster, counted once connected);
    otherwise on local cores. ``workers=1`` and auto with little work run in-process.
    """
    if workers == 1 or (workers == 0 and work < SMALL_WORK):
        return "inline", 1
    if address:
        return "ray", workers
    return ("processes", workers or local_cores()) if (workers or local_cores()) > 1 else ("inline", 1)


class PortableTokenizer:
    """What the worker tasks use of a fast Hugging Face tokenizer, without transformers (or torch) in the worker.

    The Rust tokenizer (``backend_tokenizer``) and the special tokens: unpickling a transformers tokenizer imports
    transformers and torch, about 200 MB per worker process; this imports only ``tokenizers``. Calling it encodes
    like the transformers wrapper does (``encode_batch``; the same ids, the tests compare the written bytes).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.backend_tokenizer = tokenizer.backend_tokenizer
        self.bos_token = tokenizer.bos_token
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        encoded = self.backend_tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encoded]}


def portable(tokenizer: Any) -> Any:
    """The tokenizer to send to workers: :class:`PortableTokenizer` for a fast tokenizer, else itself."""
    return PortableTokenizer(tokenizer) if getattr(tokenizer, "backend_tokenizer", None) is not None else tokenizer


def _init_process(tokenizer: Any) -> None:
    # One tokenizer thread per worker: the parallelism is the workers'; nested thread pools only contend.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _TOKENIZER
    _TOKENIZER = tokenizer


def _call_in_process(fn: Callable[[Any, Any], Any], item: Any) -> Any:
    return fn(_TOKENIZER, item)


class _RayWorker:
    """A Ray actor holding one tokenizer (made a remote class when the Ray backend starts)."""

    def __init__(self, tokenizer: Any) -> None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.tokenizer = tokenizer

    def run(self, fn: Callable[[Any, Any], Any], item: Any) -> Any:
        return fn(self.tokenizer, item)


class Workers:
    """An ordered, bounded parallel map (see the module docstring); use as a context manager.

    Args:
        tokenizer: sent once to each worker; the mapped functions receive it first.
        workers: ``data.workers`` (0: auto, 1: in-process, N: that many).
        work: how many items the job has (auto stays in-process below :data:`SMALL_WORK`).
        address: a Ray cluster to run on (``engine.ray_address`` or ``RAY_ADDRESS``); None: local.
    """

    def __init__(self, tokenizer: Any, workers: int = 0, work: int = 0, address: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.backend, self.size = choose(workers, work, address)
        self.address = address
        self._pool: Any = None
        self._actors: list[Any] = []
        self._next = 0

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """One line for the log: where the work runs."""
        if self.backend == "inline":
            return "in this process"
        if self.backend == "processes":
            return f"{self.size} local processes"
        return f"{self.size or 'every CPU of the'} Ray actor(s) on {self.address}"

    def _start(self) -> None:
        if self.backend == "processes" and self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the parent may hold Ray's, tokenizers' or tqdm's threads and locks.
            self._pool = ProcessPoolExecutor(
                self.size, mp_context=multiprocessing.get_context("spawn"), initializer=_init_process,
                initargs=(portable(self.tokenizer),),
            )  # fmt: skip
        elif self.backend == "ray" and not self._actors:
            self._start_ray()

    def _start_ray(self) -> None:
        import ray

        if not ray.is_initialized():
            try:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            except Exception as exc:  # ConnectionError, ValueError for a malformed address, ...
                raise WorkersError(
                    f"could not connect to the Ray cluster at {self.address!r} to prepare data ({exc}); start it, fix "
                    "engine.ray_address / RAY_ADDRESS (a GCS address such as HEAD:6379, or 'auto' inside a Ray job), "
                    "or unset it to prepare on this machine's cores"
                ) from None
        if not self.size:
            self.size = max(1, int(ray.cluster_resources().get("CPU", 1)))
        actor = ray.remote(num_cpus=1)(_RayWorker)
        ref = ray.put(portable(self.tokenizer))
        self._actors = [actor.remote(ref) for _ in range(self.size)]

    def _submit(self, fn: Callable[[Any, Any], Any], item: Any) -> Any:
        if self.backend == "processes":
            return self._pool.submit(_call_in_process, fn, item)
        actor = self._actors[self._next % len(self._actors)]
        self._next += 1
        return actor.run.remote(fn, item)

    def _result(self, handle: Any) -> Any:
        if self.backend == "processes":
            return handle.result()
        import ray

        return ray.get(handle)

    def imap(
        self, fn: Callable[[Any, Any], Any], items: Iterable[Any], ahead: int | None = None
    ) -> Iterator[tuple[Any, Any]]:
        """``(item, fn(tokenizer, item))`` for each item, in order, with at most ``ahead`` (default 2 x workers)
        pending.

        Items are drawn from ``items`` only as results are consumed, so a lazy iterable stays lazy.
        """
        if self.backend == "inline":
            for item in items:
                yield item, fn(self.tokenizer, item)
            return
        self._start()
        ahead = ahead or 2 * self.size
        pending: deque = deque()
        source = iter(items)
        try:
            for item in source:
                pending.append((item, self._submit(fn, item)))
                if len(pending) >= ahead:
                    done, handle = pending.popleft()
                    yield done, self._result(handle)
            while pending:
                done, handle = pending.popleft()
                yield done, self._result(handle)
        finally:
            for _, handle in pending:  # a consumer that stopped early: the rest is not needed
                if self.backend == "processes":
                    handle.cancel()

    def close(self) -> None:
        """Stop the workers (the Ray connection, if this object made it, stays for the caller's process)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._actors:
            import ray

            for a in self._actors:
                ray.kill(a)
            self._actors = []


def cluster_address(cfg: Any) -> str | None:
    """The Ray cluster prepare runs on: ``engine.ray_address``, else ``RAY_ADDRESS``; None: this machine."""
    address = getattr(getattr(cfg, "engine", None), "ray_address", None) or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        # A job API address (what `alia-nemo submit` takes) is not one a driver can join: prepare locally.
        print(f"[alia-nemo] RAY_ADDRESS={address} is a job API address; preparing on this machine", file=sys.stderr)
        return None
    return address
