"""``alia-nemo --version``: this package's version and the versions of what a bug report needs to name.

Versions come from installed package metadata, so nothing heavy is imported. NeMo-RL comes from its container or a
source checkout on ``PYTHONPATH`` (often without metadata), so its package is located and its version read from its
source; the PyPI ``nemo-rl`` name is an empty placeholder, which is why a package that can not be found counts as
not importable even when a distribution of that name is installed.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import alia_nemo

# The distributions whose versions change how a run behaves (the engines' numerics, the tokenizer, the scheduler).
DEPENDENCIES = ("torch", "transformers", "ray")


def _distribution_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def nemo_rl_version() -> str | None:
    """NeMo-RL's version where its package can be found here, else None.

    Located, never imported: importing ``nemo_rl`` runs its container checks, and only the engine and the plugins
    import it (tests/test_import_contracts.py). The version is read from its ``package_info.py`` (MAJOR, MINOR, PATCH,
    PRE_RELEASE) without running it, else from installed metadata.
    """
    try:
        spec = importlib.util.find_spec("nemo_rl")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or []:
        info = Path(location) / "package_info.py"
        if info.is_file():
            parts = _constants(info, ("MAJOR", "MINOR", "PATCH", "PRE_RELEASE"))
            if all(k in parts for k in ("MAJOR", "MINOR", "PATCH")):
                return f"{parts['MAJOR']}.{parts['MINOR']}.{parts['PATCH']}{parts.get('PRE_RELEASE', '')}"
    return _distribution_version("nemo-rl") or _distribution_version("nemo_rl") or "(version unknown)"


def _constants(path: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """Module-level ``NAME = <literal>`` assignments of a Python file, read with ``ast`` (nothing is executed)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return {}
    found: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in names and isinstance(node.value, ast.Constant):
                found[name] = node.value.value
    return found


def versions() -> dict[str, str | None]:
    """alia-nemo, python, torch, transformers, ray and nemo-rl (None: not installed / not importable)."""
    out: dict[str, str | None] = {
        "alia-nemo": _distribution_version("alia-nemo") or alia_nemo.__version__,
        "python": platform.python_version(),
    }
    out.update({name: _distribution_version(name) for name in DEPENDENCIES})
    out["nemo-rl"] = nemo_rl_version()
    return out


def version_text() -> str:
    """What ``alia-nemo --version`` prints: ``alia-nemo <version>`` first, then one line per dependency."""
    lines = []
    for name, version in versions().items():
        if version is None:
            why = "not importable (engine=nemo_rl runs in its container)" if name == "nemo-rl" else "not installed"
            lines.append(f"{name} {why}")
        else:
            lines.append(f"{name} {version}")
    return "\n".join(lines) + "\n"


class VersionAction(argparse.Action):
    """``--version``: print :func:`version_text` and exit 0 (computed only when asked, unlike argparse's own)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any):
        kwargs.setdefault("help", "print the versions of alia-nemo, python, torch, transformers, ray and NeMo-RL")
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        print(version_text(), end="")  # stdout, as argparse's own --version (parser.exit would write to stderr)
        parser.exit(0)
