"""The README is tested, so it can not go stale: its marked command blocks run, its marked excerpts match.

Two kinds of fenced blocks are checked (the words after the language are ignored by Markdown renderers):

- ```` ```bash runnable ```` (``runnable slow`` for blocks that train): every command in the block runs, one after
  the other, in a fresh directory, with the project's ``alia-nemo`` on ``PATH``, the hub offline and a private
  cache. A command exits 0, unless its comment says it is ``rejected``: then it must exit 2 (a usage error).
- ```` ```bash excerpt ```` (or ``console excerpt``): the first line is a command (a leading ``$ `` is dropped), and
  its real output must contain the block's other lines, in order (each compared without surrounding blanks; rich
  tables are drawn at 130 columns).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(
    r"^```(?:bash|console) (?P<kind>runnable|excerpt)(?P<slow> slow)?\s*\n(?P<body>.*?)^```\s*$", re.M | re.S
)


@dataclass(frozen=True)
class Block:
    kind: str
    slow: bool
    line: int  # where the block starts in the README (1-based), for the test id and messages
    body: str


def blocks() -> list[Block]:
    """The README's marked blocks, in order."""
    text = README.read_text(encoding="utf-8")
    return [
        Block(m["kind"], bool(m["slow"]), text.count("\n", 0, m.start()) + 1, m["body"]) for m in FENCE.finditer(text)
    ]


def commands(body: str) -> list[str]:
    """The block's commands: comment-only lines skipped, backslash continuations joined."""
    out: list[str] = []
    pending = ""
    for raw in body.splitlines():
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def _env(tmp_path: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    env.update(
        COLUMNS="130",
        HF_HUB_OFFLINE="1",
        ALIA_NEMO_PREPARED=str(tmp_path / "prepared"),
        XDG_CACHE_HOME=str(tmp_path / "xdg"),
    )
    return env


def _run(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip


def _params(kind: str) -> list:
    found = [b for b in blocks() if b.kind == kind]
    return [pytest.param(b, id=f"line{b.line}", marks=[pytest.mark.slow] if b.slow else []) for b in found]


def test_the_readme_marks_blocks_to_check():
    """The markers are in use (a renamed fence would silently turn this file into a no-op)."""
    kinds = [b.kind for b in blocks()]
    assert kinds.count("runnable") >= 3 and kinds.count("excerpt") >= 1


@pytest.mark.parametrize("block", _params("runnable"))
def test_runnable_block(block: Block, tmp_path: Path):
    env = _env(tmp_path)
    for command in commands(block.body):
        expected = 2 if re.search(r"#.*\brejected\b", command) else 0
        proc = _run(command, tmp_path, env)
        assert proc.returncode == expected, (
            f"README line {block.line}: `{command}` exited {proc.returncode}, expected {expected}\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )


@pytest.mark.parametrize("block", _params("excerpt"))
def test_excerpt_matches_the_real_output(block: Block, tmp_path: Path):
    lines = [line.strip() for line in block.body.splitlines() if line.strip()]
    command, expected = lines[0].removeprefix("$ "), lines[1:]
    proc = _run(command, tmp_path, _env(tmp_path))
    assert proc.returncode == 0, f"README line {block.line}: `{command}` failed\n{proc.stderr[-2000:]}"
    actual = [line.strip() for line in proc.stdout.splitlines()]
    position = 0
    for want in expected:
        assert want in actual[position:], (
            f"README line {block.line}: the excerpt line {want!r} is not in the output of `{command}` "
            f"(after line {position}); the output is:\n" + "\n".join(actual[-40:])
        )
        position = actual.index(want, position) + 1
