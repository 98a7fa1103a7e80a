"""containers/alia-nemo.def parsed by a real Singularity-recipe parser (spython) plus our section checks,
shellcheck on every shell script and on the definition's shell sections, and the non-root parts of %post and
%test run for real (dash, setpriv) against a fake image layout."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from alia_nemo.config.compose import available_recipes

ROOT = Path(__file__).resolve().parents[1]
DEF = ROOT / "containers" / "alia-nemo.def"
SECTIONS = ("arguments", "labels", "help", "files", "post", "environment", "runscript", "test")


def _sections(text: str) -> dict[str, str]:
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^%(\w+)\s*$", line)
        if m:
            name = m.group(1)
            out[name] = ""
        elif name:
            out[name] += line + "\n"
    return out


def test_definition_parses_and_has_what_the_image_needs():
    from spython.main.parse.parsers import SingularityParser

    recipe = next(iter(SingularityParser(str(DEF)).recipe.values()))
    assert recipe.fromHeader.lower().startswith("nvcr.io/nvidia/nemo-rl:")
    assert recipe.cmd.strip() == 'exec alia-nemo "$@"'
    assert all(f.startswith("{{ ALIA_NEMO_SRC }}/") and " /opt/alia-nemo/" in f for f in recipe.files)
    env = {k: v.strip('"') for k, v in (e.split("=", 1) for e in recipe.environ)}
    assert env["HF_HUB_OFFLINE"] == "${HF_HUB_OFFLINE:-1}" and env["HF_HOME"].endswith("/cache/huggingface}")
    assert any(label.startswith("org.opencontainers.image.title alia-nemo") for label in recipe.labels)
    text = DEF.read_text()
    header = {k.lower(): v.strip() for k, v in re.findall(r"^(Bootstrap|From):(.*)$", text, re.MULTILINE)}
    assert header == {"bootstrap": "docker", "from": "nvcr.io/nvidia/nemo-rl:{{ NEMO_RL_TAG }}"}
    sections = _sections(text)
    assert set(SECTIONS) <= set(sections), set(SECTIONS) - set(sections)
    assert "NEMO_RL_TAG=v0.7.0" in sections["arguments"]
    assert "import nemo_rl, alia_nemo" in sections["test"]
    recipe_name = re.search(r"compile recipe=(\S+)", sections["test"]).group(1)
    assert recipe_name in available_recipes()


shellcheck = pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get)")


SCRIPTS = [
    "launchers/slurm/alia-ray.sbatch", "containers/build.sh", ".ci/run", "tests/run.sh", "tests/nemo_rl/harness.sh",
]  # fmt: skip


@shellcheck
@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_pass_shellcheck(script):
    proc = subprocess.run(["shellcheck", str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@shellcheck
@pytest.mark.parametrize("section", ["post", "environment", "runscript", "test"])
def test_definition_shell_sections_pass_shellcheck(section, tmp_path):
    body = _sections(DEF.read_text())[section]
    body = re.sub(r"\{\{\s*(\w+)\s*\}\}", r"\1", body)  # build-time placeholders are not shell
    script = tmp_path / f"{section}.sh"
    script.write_text("#!/bin/sh\n" + body)
    proc = subprocess.run(["shellcheck", "-s", "sh", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_every_shell_script_is_covered():
    scripts = {
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*")
        if p.suffix in (".sh", ".sbatch") and not any(part.startswith(".venv") for part in p.relative_to(ROOT).parts)
    }
    assert scripts == {s for s in SCRIPTS if s != ".ci/run"}


# --- %files: only what `pip install /opt/alia-nemo` needs ---------------------------------------------------------

LICENSE_GLOBS = ("LICEN[CS]E*", "COPYING*", "NOTICE*", "AUTHORS*")  # hatchling's default license-files


def _needed_sources() -> set[str]:
    """What building the wheel reads, from pyproject.toml: itself, the readme, the packages, force-includes."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", project["project"]["readme"], *wheel["packages"], *wheel.get("force-include", {})}
    return needed | {p.name for pattern in LICENSE_GLOBS for p in ROOT.glob(pattern)}


def test_files_copies_exactly_what_the_package_needs():
    from spython.main.parse.parsers import SingularityParser

    recipe = next(iter(SingularityParser(str(DEF)).recipe.values()))
    copied = {}
    for line in recipe.files:
        src, dst = line.rsplit(maxsplit=1)
        assert src.startswith("{{ ALIA_NEMO_SRC }}/"), f"{line}: sources are paths under the checkout"
        rel = src.removeprefix("{{ ALIA_NEMO_SRC }}/")
        assert dst == f"/opt/alia-nemo/{rel}", f"{line}: copy to the same path under /opt/alia-nemo"
        copied[rel] = dst
    assert set(copied) == _needed_sources()
    assert {"pyproject.toml", "README.md", "alia_nemo", "conf", "recipes"} <= set(copied)
    for rel in copied:
        assert (ROOT / rel).exists(), rel
        assert not {".git", "tests", "outputs", "__pycache__"} & set(Path(rel).parts), rel
        assert not any(part.startswith((".venv", ".pytest", ".ruff")) for part in Path(rel).parts), rel
    # The bytecode that whole directories bring along is dropped before the install.
    assert "find /opt/alia-nemo -name __pycache__" in _sections(DEF.read_text())["post"]


# --- %post and %test: the image works for a non-root user ----------------------------------------------------------

BLOCK = "python-for-every-user"
PYDIR = "cpython-3.13.13-linux-x86_64-gnu"  # uv's managed CPython, as NeMo-RL's image installs it
MINOR = "cpython-3.13-linux-x86_64-gnu"  # uv's minor-version link that uv venvs point through
WORKER = "nemo_rl.models.policy.workers.megatron_policy_worker.MegatronPolicyWorker"


def _post_block() -> str:
    post = _sections(DEF.read_text())["post"]
    m = re.search(rf"^\s*# >>> {BLOCK}\b.*?^\s*# <<< {BLOCK}\s*$", post, re.MULTILINE | re.DOTALL)
    assert m, f"%post has no '# >>> {BLOCK}' ... '# <<< {BLOCK}' block"
    return m.group(0)


def test_post_makes_python_usable_without_root():
    post = _sections(DEF.read_text())["post"]
    block = _post_block()
    for needed in ("${ALIA_ROOT_HOME:-/root}", "${ALIA_UV_PYTHON_DIR:-/opt/uv-python}", "${ALIA_VENV_ROOT:-/opt}",
                   'readlink -f "$link"', "pyvenv.cfg", 'mv "$pydir"', 'chmod -R a+rX "$venv"'):  # fmt: skip
        assert needed in block, needed
    # The venvs are fixed before pip runs (so the install already uses the moved interpreter); everything ends up
    # readable by every user whatever the umask.
    assert post.index(block) < post.index("pip install")
    assert "umask 022" in post.split(block)[0]
    assert re.search(r'^\s*chmod -R a\+rX /opt/alia-nemo \$\{venv_prefix:\+"\$venv_prefix"\}$', post, re.MULTILINE)


def test_test_section_reruns_the_checks_as_nobody():
    test = _sections(DEF.read_text())["test"]
    assert 'if [ "$(id -u)" -eq 0 ]' in test
    assert "setpriv --reuid=" in test and "--clear-groups" in test and "nobody" in test
    assert f"/opt/ray_venvs/{WORKER}" in test and "/opt/nemo_rl_venv" in test
    assert 'HOME="$h"' in test and 'cd "$HOME"' in test  # a HOME (and cwd) the user can write / enter


@pytest.mark.parametrize("section", ["post", "environment", "runscript", "test"])
def test_definition_shell_sections_parse_with_dash(section, tmp_path):
    """Apptainer runs the sections with the image's /bin/sh (dash on Ubuntu): no bashisms that dash rejects."""
    if shutil.which("dash") is None:
        pytest.skip("dash not installed")
    script = tmp_path / f"{section}.sh"
    script.write_text(re.sub(r"\{\{\s*(\w+)\s*\}\}", r"\1", _sections(DEF.read_text())[section]))
    proc = subprocess.run(["dash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


needs_root_and_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or shutil.which("dash") is None,
    reason="runs the sections for real: needs root (to switch to uid 65534 with setpriv), setpriv and dash",
)

FAKE_PYTHON = '#!/bin/sh\necho "python runs as uid $(id -u)"\n'
FAKE_ALIA_NEMO = """#!/bin/sh
out=
while [ $# -gt 0 ]; do
    if [ "$1" = --out ]; then out=$2; fi
    shift
done
echo "compiled: $out" > "$out"
echo "alia-nemo compile wrote $out"
"""


def _write_exe(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def _uv_venv(venv: Path, python: Path) -> None:
    """What `uv venv` makes: bin/python an absolute link to the interpreter, the other names link to it."""
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(python)
    (venv / "bin" / "python3").symlink_to("python")
    (venv / "bin" / "python3.13").symlink_to("python")
    (venv / "pyvenv.cfg").write_text(
        f"home = {python.parent}\nimplementation = CPython\nuv = 0.9.2\nversion_info = 3.13.13\n"
        "include-system-site-packages = false\n"
    )


@pytest.fixture
def image() -> Iterator[Path]:
    """A fake image tree, in a directory nobody can enter (pytest's tmp_path lies under a 0700 directory).

    root/ (0700, like /root) holds uv's CPython and its minor-version link; opt/ holds the venvs NeMo-RL's image
    has (its own and a Ray worker's, made by uv), a `python -m venv` style venv, and one on a system python.
    """
    base = Path(tempfile.mkdtemp(prefix="alia-image-", dir="/tmp"))
    base.chmod(0o755)
    uv = base / "root" / ".local" / "share" / "uv" / "python"
    _write_exe(uv / PYDIR / "bin" / "python3.13", FAKE_PYTHON)
    (uv / PYDIR / "bin" / "python3").symlink_to("python3.13")
    (uv / PYDIR / "bin" / "python").symlink_to("python3.13")
    stdlib = uv / PYDIR / "lib" / "python3.13" / "os.py"
    stdlib.parent.mkdir(parents=True)
    stdlib.write_text("")
    stdlib.chmod(0o600)
    (uv / MINOR).symlink_to(uv / PYDIR)
    (base / "root").chmod(0o700)
    opt = base / "opt"
    _uv_venv(opt / "nemo_rl_venv", uv / MINOR / "bin" / "python3.13")
    _uv_venv(opt / "ray_venvs" / WORKER, uv / MINOR / "bin" / "python3.13")
    tool = opt / "tool_venv"  # python -m venv: python3.13 is the absolute link, the others point at it
    (tool / "bin").mkdir(parents=True)
    (tool / "bin" / "python3.13").symlink_to(uv / PYDIR / "bin" / "python3.13")
    (tool / "bin" / "python").symlink_to("python3.13")
    (tool / "bin" / "python3").symlink_to("python3.13")
    (tool / "pyvenv.cfg").write_text(
        f"home = {uv / PYDIR / 'bin'}\ninclude-system-site-packages = false\nversion = 3.13.13\n"
        f"executable = {uv / PYDIR / 'bin' / 'python3.13'}\n"
    )
    _write_exe(base / "usr" / "bin" / "python3", FAKE_PYTHON)
    _uv_venv(opt / "system_venv", base / "usr" / "bin" / "python3")
    _write_exe(base / "bin" / "alia-nemo", FAKE_ALIA_NEMO)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def _as_nobody(*cmd: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *map(str, cmd)],
        capture_output=True, text=True, cwd="/", env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def _run_post_block(image: Path) -> subprocess.CompletedProcess:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "ALIA_ROOT_HOME": str(image / "root"),
        "ALIA_UV_PYTHON_DIR": str(image / "opt" / "uv-python"),
        "ALIA_VENV_ROOT": str(image / "opt"),
    }
    return subprocess.run(["dash", "-euc", _post_block()], capture_output=True, text=True, env=env)


def _run_test_section(image: Path) -> subprocess.CompletedProcess:
    env = {
        "PATH": f"{image / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
        "TMPDIR": "/tmp",
        "ALIA_TEST_NEMO_RL_VENV": str(image / "opt" / "nemo_rl_venv"),
        "ALIA_TEST_WORKER_VENV": str(image / "opt" / "ray_venvs" / WORKER),
    }
    body = _sections(DEF.read_text())["test"]
    return subprocess.run(["dash", "-c", body], capture_output=True, text=True, env=env, cwd="/")


def _snapshot(tree: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for p in sorted(tree.rglob("*")):
        if p.is_symlink():
            out[str(p)] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p)] = ("file", p.read_text(), stat.S_IMODE(p.stat().st_mode))
        else:
            out[str(p)] = ("dir", stat.S_IMODE(p.stat().st_mode))
    return out


@needs_root_and_setpriv
def test_post_block_makes_the_venv_pythons_runnable_by_nobody(image):
    venvs = [image / "opt" / "nemo_rl_venv", image / "opt" / "ray_venvs" / WORKER, image / "opt" / "tool_venv"]
    uv = image / "root" / ".local" / "share" / "uv" / "python"
    moved = image / "opt" / "uv-python" / PYDIR
    before = _as_nobody(venvs[0] / "bin" / "python")
    assert before.returncode != 0 and "Permission denied" in before.stderr, "the fake layout shows the problem"
    cfg_before = {v: (v / "pyvenv.cfg").read_text().splitlines() for v in venvs}

    proc = _run_post_block(image)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("moving ") == 1, proc.stdout  # one interpreter, shared by all the venvs

    for venv in venvs:
        for name in ("python", "python3", "python3.13"):
            run = _as_nobody(venv / "bin" / name)
            assert (run.returncode, run.stdout) == (0, "python runs as uid 65534\n"), (venv, name, run.stderr)
        lines = (venv / "pyvenv.cfg").read_text().splitlines()
        assert lines[0] == f"home = {moved / 'bin'}"
        assert lines[1:] == cfg_before[venv][1:]  # only `home` changes
    assert (moved / "bin" / "python3.13").is_file() and not moved.is_symlink()
    assert stat.S_IMODE((moved / "lib" / "python3.13" / "os.py").stat().st_mode) == 0o644
    assert _as_nobody("cat", moved / "lib" / "python3.13" / "os.py").returncode == 0
    # /root stays private, and root's uv still finds its interpreter through the old names.
    assert stat.S_IMODE((image / "root").stat().st_mode) == 0o700
    assert os.readlink(uv / PYDIR) == str(moved)
    assert Path(os.path.realpath(uv / MINOR / "bin" / "python3.13")) == moved / "bin" / "python3.13"
    # A venv on another interpreter is left alone.
    assert os.readlink(image / "opt" / "system_venv" / "bin" / "python") == str(image / "usr" / "bin" / "python3")

    # Idempotent: a second run moves nothing and changes nothing.
    snapshot = _snapshot(image / "opt")
    again = _run_post_block(image)
    assert again.returncode == 0, again.stderr
    assert "moving" not in again.stdout
    assert _snapshot(image / "opt") == snapshot


@needs_root_and_setpriv
def test_post_block_never_overwrites_an_interpreter_already_at_the_destination(image):
    (image / "opt" / "uv-python" / PYDIR).mkdir(parents=True)
    proc = _run_post_block(image)
    assert proc.returncode != 0
    assert f"{image}/opt/uv-python/{PYDIR} exists already" in proc.stderr
    assert (image / "root" / ".local" / "share" / "uv" / "python" / PYDIR / "bin" / "python3.13").is_file()


@needs_root_and_setpriv
def test_test_section_fails_for_root_only_pythons_and_passes_after_the_post_fix(image):
    broken = _run_test_section(image)
    assert broken.returncode != 0
    assert "checks passed as root" in broken.stdout  # root can run anything: the build-time view
    assert "again as nobody" in broken.stdout
    assert "nemo_rl_venv/bin/python" in broken.stderr and "is not executable by nobody" in broken.stderr

    assert _run_post_block(image).returncode == 0
    fixed = _run_test_section(image)
    assert fixed.returncode == 0, fixed.stderr
    assert "checks passed as root" in fixed.stdout and "checks passed as nobody" in fixed.stdout
    # The NeMo-RL venv's python (import check) and the Megatron worker venv's python both ran as nobody.
    assert fixed.stdout.count("python runs as uid 65534") == 2, fixed.stdout
    assert fixed.stdout.count("alia-nemo compile wrote") == 2
