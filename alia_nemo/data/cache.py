"""The prepared-data cache: one directory per input hash, built once, atomically, across hosts.

An artifact (a prepared mixture, a packed corpus) lives in ``<prepared_root>/<name>-<key16>``, where the key
hashes everything that shapes it: the configuration, local files by their content's sha256 (never their
mtime), the tokenizer, and the code of every module the artifact's builder imports (:func:`code_version`
walks the import graph, so an edit anywhere in that code is a new key). :func:`build_cached` builds into a
temporary directory under a heartbeated lock (:class:`alia_nemo.locks.DirLock`), writes ``manifest.json``
last and renames the directory into place: an interrupted build never looks complete, a concurrent build of
the same key is waited for and reused, and temporary directories of builders that died are removed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alia_nemo.errors import AliaError, LockedError
from alia_nemo.locks import STALE_S, DirLock, holder_alive, read_lock

HASH_CHUNK = 1 << 20  # sha256 of local files in 1 MiB reads: flat memory, near disk speed
WAIT_S = 6 * 3600.0  # longest wait for another live process building the same cache entry
POLL_S = 1.0  # how often a waiting prepare looks at the other build's lock
_HASHES: dict[tuple, str] = {}  # sha256 of files already hashed by this process, by identity and times


class CacheError(AliaError, ValueError):
    """A cache entry that can not be placed, read or waited for; names the directory and the fix."""


def sha256_file(path: str) -> str:
    """The sha256 of a file's content, read in :data:`HASH_CHUNK` pieces.

    Remembered for this process under the file's identity and times (device, inode, size, mtime and
    ctime): a rewrite, even one that keeps size and mtime (``os.utime``), changes the ctime, so it is hashed
    again. Across processes nothing is trusted: every ``prepare`` hashes its inputs once.
    """
    st = os.stat(path)
    sig = (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if sig in _HASHES:
        return _HASHES[sig]
    digest = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    _HASHES[sig] = digest.hexdigest()
    return _HASHES[sig]


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def module_file(name: str) -> Path | None:
    """The source file of package module ``name`` (``alia_nemo.x.y``), or None when it is not one."""
    root = Path(__file__).resolve().parents[1]  # alia_nemo/
    parts = name.split(".")[1:]
    for path in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
        if (parts and path.is_file()) or (not parts and path.name == "__init__.py" and path.is_file()):
            return path
    return None


# Configuration modules are not code a cache depends on: the validated configuration enters every key as data.
NOT_CODE = ("alia_nemo.config",)


def package_modules(module: str) -> list[str]:
    """``module`` and every ``alia_nemo`` module it imports, directly or not, at the top or inside functions.

    Read from the source (``ast``), so lazily imported modules count too: they shape what a builder writes.
    The configuration package (:data:`NOT_CODE`) is left out: its values are hashed into the key instead.
    """
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name.startswith(NOT_CODE):
            continue
        path = module_file(name)
        if path is None:  # a name imported from a module (a function, a class), not a module
            continue
        seen.add(name)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("alia_nemo")]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("alia_nemo"):
                todo.append(node.module)
                todo += [f"{node.module}.{a.name}" for a in node.names]  # submodules imported by name
    return sorted(seen)


def code_version(module: str) -> str:
    """Package version plus a hash of the source of ``module`` and every package module it depends on.

    A cache key includes it so that an edit to any code that shapes an artifact (its builder, the reader, the
    chat template, the schema) is a new key: stale prepared data is never reused.
    """
    from alia_nemo import __version__

    digest = hashlib.sha256()
    for name in package_modules(module):
        digest.update(name.encode() + b"\0" + module_file(name).read_bytes() + b"\0")  # type: ignore[union-attr]
    return f"{__version__}+{digest.hexdigest()[:12]}"


def file_fingerprint(path: str) -> dict[str, Any]:
    """What a cache key records of a local file: its path, size and content hash (never its mtime, which
    an edit can keep)."""
    return {"path": str(Path(path).resolve()), "size": os.stat(path).st_size, "sha256": sha256_file(path)}


def cache_dir(root: Path, name: str, suffix: str, key: str, error: type[AliaError] | None = None) -> Path:
    """``root / f"{name}-{suffix}"``, refused unless that is one entry directly inside ``root``.

    ``name`` comes from the configuration (``key``, e.g. ``data.name``): it must never place a cache, or what
    a rebuild deletes, outside ``prepared_root``. The error (``error``, default :class:`CacheError`)
    names the key and the fix. The configuration checks names too; this guards every other caller.
    """
    entry = f"{name}-{suffix}"
    parts = Path(entry).parts
    inside = (
        len(parts) == 1
        and parts[0] not in (".", "..")
        and os.sep not in entry
        and (os.altsep is None or os.altsep not in entry)
        and "\0" not in entry
    )
    if inside:
        base = Path(os.path.abspath(root))
        inside = Path(os.path.abspath(base / entry)).parent == base
    if not inside:
        raise (error or CacheError)(
            f"{key}={name!r} would place the prepared data outside {root} (at {root / entry}); set {key} to a "
            "plain name (letters, digits, '.', '_', '-'; no '/' or '..')"
        )
    return root / entry


def _lock_path(root: Path, key: str) -> Path:
    return root / f".lock-{key[:16]}"


def clean_stale_tmp(root: Path, key: str, stale_s: float = STALE_S) -> list[Path]:
    """Remove the temporary build directories of ``key`` whose builder is provably gone; return them.

    A build's temporary directory is ``.tmp-<key16>-<token12>``, the token being that of the lock
    (``.lock-<key16>``) its builder holds. It is kept while that lock names it and its holder is alive
    (:func:`alia_nemo.locks.holder_alive`: the same host and PID namespace with the PID running, or, from
    another host or container, a heartbeat younger than ``stale_s``); any other is a leftover of a build that
    was killed, and is removed.
    """
    info = read_lock(_lock_path(root, key))
    live = str(info.get("token", ""))[:12] if info and holder_alive(info, stale_s) else None
    removed = []
    for tmp in root.glob(f".tmp-{key[:16]}-*"):
        if live and tmp.name == f".tmp-{key[:16]}-{live}":
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def build_cached(
    root: Path,
    final: Path,
    key: str,
    build: Callable[[Path], None],
    *,
    what: str,
    error: type[AliaError],
    wait_s: float = WAIT_S,
    poll_s: float = POLL_S,
) -> Path:
    """``final`` once it is complete (it holds ``manifest.json``), built at most once per key across processes.

    The builder holds ``<root>/.lock-<key16>`` (a heartbeated :class:`~alia_nemo.locks.DirLock`), clears
    stale temporary directories of the key, runs ``build(tmp)`` (which writes ``manifest.json`` last) and
    renames ``tmp`` to ``final``. Another process wanting the same key meanwhile waits, saying once per
    holder whom it waits for, and returns ``final`` when that build is done (or builds it itself if the
    holder died: its lock is then stale and taken over). After ``wait_s`` seconds of a live holder it
    raises ``error``.
    """
    if (final / "manifest.json").is_file():
        return final  # identical inputs: nothing to do
    root.mkdir(parents=True, exist_ok=True)
    lock = DirLock(_lock_path(root, key), what)
    deadline = time.monotonic() + wait_s
    announced = None
    while True:
        try:
            lock.acquire()
            break
        except LockedError:
            info = read_lock(lock.path) or {}
        if (final / "manifest.json").is_file():
            return final
        holder = (info.get("host", "?"), info.get("pid", "?"))
        if holder != announced:
            print(
                f"[alia-nemo] waiting for PID {holder[1]} on host {holder[0]}, which is building {final.name} "
                f"(lock {lock.path}); its result is used when it is done",
                file=sys.stderr,
                flush=True,
            )
            announced = holder
        if time.monotonic() > deadline:
            raise error(
                f"gave up after {wait_s:.0f} s waiting for PID {holder[1]} on host {holder[0]} to finish building "
                f"{final} (lock {lock.path}, heartbeat {info.get('age_s', 0):.0f} s ago); wait for it, stop it, or "
                "use another data.prepared_root"
            )
        time.sleep(poll_s)
    try:
        if (final / "manifest.json").is_file():
            return final  # finished by the holder we waited for
        clean_stale_tmp(root, key)
        tmp = root / f".tmp-{key[:16]}-{lock.token[:12]}"
        tmp.mkdir()
        print(f"[alia-nemo] building {final} (lock {lock.path})", file=sys.stderr, flush=True)
        try:
            build(tmp)
            if final.exists() and not (final / "manifest.json").is_file():
                shutil.rmtree(final)  # an incomplete directory under the final name (not ours): replace it
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / "manifest.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # complete already (a builder after a lost lock): keep it
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()
    return final


def read_manifest(directory: Path, error: type[AliaError] | None = None) -> dict[str, Any]:
    """A prepared directory's ``manifest.json``; ``error`` (default :class:`CacheError`) when it is absent or
    unreadable, naming the directory and the fix (prepared data is only ever rebuilt, never repaired)."""
    path = Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise (error or CacheError)(
            f"{directory} is not prepared data (no manifest.json); run alia-nemo prepare"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise (error or CacheError)(
            f"{path} is corrupt ({exc}); delete {directory} and run alia-nemo prepare again"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise (error or CacheError)(f"{path} has no file list; delete {directory} and run alia-nemo prepare again")
    return manifest
