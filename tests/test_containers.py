"""containers/alia-nemo.def parsed by a real Singularity-recipe parser (spython) plus our section checks,
and shellcheck on every shell script and on the definition's shell sections."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from alia_nemo.config_compose import available_recipes

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
    assert any(f.startswith("{{ ALIA_NEMO_SRC }} /opt/alia-nemo") for f in recipe.files)
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
