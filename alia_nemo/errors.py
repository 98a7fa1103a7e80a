"""The project's one error base class, and how an OS error becomes one line a user can act on.

Every error a user can cause or fix (a config key, a data row, a file, a busy directory, a full disk)
is an :class:`AliaError`; the CLI prints its message on one line and exits with its ``exit_code``:
2 for bad input or environment, 1 for a run that started and failed (non-finite loss, a failed
conversion). Anything else reaching the CLI is a bug: exit 1 with a one-line report (``--debug``
shows the traceback).
"""

from __future__ import annotations

import errno


class AliaError(Exception):
    """An error whose message names the problem (file, key, row) and the fix."""

    exit_code = 2


class ConfigError(AliaError, ValueError):
    """A configuration that can not be used; the message names each bad key and how to fix it."""


class LockedError(AliaError):
    """Another process (on this host or another one sharing the filesystem) holds the directory."""


_FIXES = {
    errno.ENOSPC: "no space left on device; free space there or point the output (run.output_dir, "
    "data.prepared_root, --out) at a filesystem with room",
    errno.EDQUOT: "disk quota exceeded; free space or point the output at another filesystem",
    errno.EACCES: "permission denied; choose a path you can write (run.output_dir, data.prepared_root, --out) "
    "or fix its permissions",
    errno.EPERM: "operation not permitted; choose a path you own or fix its permissions",
    errno.EROFS: "read-only filesystem; point the output at a writable path",
    errno.ENOENT: "no such file or directory; check the path",
    errno.ENOTDIR: "a path component is not a directory; check the path",
    errno.EISDIR: "is a directory where a file was expected; check the path",
    errno.EEXIST: "already exists; choose another path or remove it yourself",
    errno.ENAMETOOLONG: "file name too long; shorten the path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
}


def describe_os_error(exc: OSError) -> str:
    """One line for an OS error: the path(s) involved, what happened and what to do."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    what = _FIXES.get(exc.errno or -1, exc.strerror or str(exc))
    return f"{paths}: {what}" if paths else f"{what} ({exc})"
