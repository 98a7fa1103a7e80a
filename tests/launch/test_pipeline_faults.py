"""`pipeline` trusts the disk, not just pipeline.json: a finished step whose output is gone or damaged is redone
(with what consumes it); a damaged pipeline.json stops the run untouched; a second pipeline in the same run
directory is refused. Fast: the run directory is built by hand and the step runner is replaced."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alia_nemo.cli import main
from alia_nemo.errors import ConfigError
from alia_nemo.launch.pipeline import LOCK_NAME, Pipeline, PipelineConfig, load_pipeline

NAME = "alia-tiny-instruct"
STEPS = ["cpt32k", "cpt160k", "sft", "export", "eval"]


def _model_dir(path: Path, tok) -> None:
    """A small but complete Hugging Face model directory: config, tokenizer, one safetensors file."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(8, 8), "b": torch.ones(8)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    tok.save_pretrained(str(path))


def _eval_dir(path: Path, pipe: Pipeline) -> None:
    path.mkdir(parents=True, exist_ok=True)
    e = pipe.spec.eval.niah
    trials = [{"length": n, "depth": d, "score": 1.0} for n in e.lengths for d in e.depths]
    (path / "niah.json").write_text(json.dumps({"trials": trials}))
    (path / "niah.png").write_bytes(b"\x89PNG fake")


@pytest.fixture
def fake_steps(monkeypatch, tok):
    """Replace the step runner: it records the step and writes a complete output for it."""
    executed: list[str] = []

    def execute(self, step, cfg):
        executed.append(step)
        if step == "eval":
            _eval_dir(self.output_path(step), self)
        else:
            _model_dir(self.output_path(step), tok)
        return {"output": str(self.output_path(step))}

    monkeypatch.setattr(Pipeline, "_execute", execute)
    return executed


@pytest.fixture
def finished(tmp_path, fake_steps):
    """A run directory where every step finished (recorded and on disk); the runner's log is reset."""
    run_dir = tmp_path / "pipe"
    Pipeline(load_pipeline(NAME), run_dir).run(log=lambda *_: None)
    assert fake_steps == STEPS
    fake_steps.clear()
    return run_dir


def _rerun(run_dir: Path) -> list[str]:
    lines: list[str] = []
    Pipeline(load_pipeline(NAME), run_dir).run(log=lines.append)
    return lines


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "pipeline.json").read_text())


def test_complete_outputs_are_skipped_and_the_lock_is_released(finished, fake_steps):
    lines = _rerun(finished)
    assert fake_steps == [] and lines == [f"[alia-nemo] pipeline: {s} finished earlier, skipped" for s in STEPS]
    assert not (finished / LOCK_NAME).exists()


# (what is done to a finished run directory, the steps then redone, what the one-line notice names)
DAMAGES = {
    "sft-final-deleted": (lambda d: shutil.rmtree(d / "sft" / "final"), ["sft", "export", "eval"], "final: missing"),
    "export-deleted": (lambda d: shutil.rmtree(d / "export"), ["export", "eval"], "export: missing"),
    "weights-deleted": (lambda d: (d / "export" / "model.safetensors").unlink(), ["export", "eval"], "no safetensors"),
    "tokenizer-deleted": (lambda d: (d / "export" / "tokenizer.json").unlink(), ["export", "eval"], "no tokenizer"),
    "config-broken": (lambda d: (d / "export" / "config.json").write_text("{oops"), ["export", "eval"], "config.json"),
    "eval-deleted": (lambda d: (d / "eval" / "niah.json").unlink(), ["eval"], "niah.json is missing"),
    "eval-incomplete": (lambda d: (d / "eval" / "niah.json").write_text('{"trials": []}'), ["eval"], "0 of the 6"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_missing_outputs_redo_the_step_and_what_consumes_it(finished, fake_steps, damage):
    harm, redone, problem = DAMAGES[damage]
    harm(finished)
    lines = _rerun(finished)
    assert fake_steps == redone
    step = redone[0]
    notice = [x for x in lines if "recorded as finished" in x]
    assert len(notice) == 1 and notice[0].startswith(
        f"[alia-nemo] pipeline: {step} is recorded as finished but its output is incomplete ("
    )
    assert problem in notice[0] and notice[0].endswith("; running it again") and "\n" not in notice[0]
    assert all(f"{s} finished earlier, skipped" in "\n".join(lines) for s in STEPS if s not in redone)
    state = _state(finished)
    assert all(state[s]["status"] == "finished" for s in STEPS)
    assert all(state[s]["attempts"] == (2 if s in redone else 1) for s in STEPS)


def test_truncated_or_corrupt_weights_are_detected(finished, fake_steps):
    weights = finished / "cpt160k" / "final" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])  # a copy or save cut short
    lines = _rerun(finished)
    assert fake_steps == ["cpt160k", "sft", "export", "eval"]
    assert any("cpt160k is recorded as finished" in x and "truncated" in x for x in lines)
    fake_steps.clear()
    shard = finished / "export" / "model.safetensors"
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header...}" + b"\0" * 64)
    lines = _rerun(finished)
    assert fake_steps == ["export", "eval"] and any("corrupt safetensors header" in x for x in lines)


def test_cli_reports_the_redo_on_one_line(finished, fake_steps, capsys):
    shutil.rmtree(finished / "export")
    assert main(["pipeline", f"recipe={NAME}", f"run_dir={finished}"]) == 0
    out = capsys.readouterr().out
    assert f"export is recorded as finished but its output is incomplete ({finished / 'export'}: missing)" in out
    done = next(line for line in out.splitlines() if line.startswith(f"[alia-nemo] pipeline {NAME} done in "))
    assert fake_steps == ["export", "eval"] and "eval finished" in done  # the summary of outputs follows it


def test_only_and_from_refuse_an_incomplete_input(finished, fake_steps):
    shutil.rmtree(finished / "export")
    pipe = Pipeline(load_pipeline(NAME), finished)
    with pytest.raises(ConfigError, match=r"--only eval: its input, the output of step export, is incomplete .*"
                       r"--from export"):  # fmt: skip
        pipe.run(only="eval", log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"--from eval: its input, the output of step export"):
        pipe.run(from_step="eval", log=lambda *_: None)
    assert fake_steps == []
    pipe.run(from_step="export", log=lambda *_: None)
    assert fake_steps == ["export", "eval"]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"cpt32k": {"status": "finished", "hash": "ab', "invalid JSON"),
        ("[1, 2]", "a JSON list where an object of steps belongs"),
        ('{"sft": "finished"}', "step 'sft': a JSON str where the step's record"),
        ('{"sft": {"status": "done"}}', "step 'sft': status 'done' is not one of"),
        ('{"sft": {"status": "finished", "hash": 7}}', "step 'sft': its hash is not a string"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
    ],
    ids=["truncated", "list", "record-string", "bad-status", "bad-hash", "binary"],
)
def test_a_damaged_pipeline_json_stops_the_run_untouched(tmp_path, fake_steps, capsys, text, why):
    run_dir = tmp_path / "pipe"
    run_dir.mkdir()
    state = run_dir / "pipeline.json"
    state.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = state.read_bytes()
    assert main(["pipeline", f"recipe={NAME}", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"alia-nemo pipeline: error: {state} is not a valid ")
    assert why in err and f"mv {state} {state}.bad" in err and "left untouched" in err
    assert state.read_bytes() == before and fake_steps == []


def test_a_second_pipeline_in_the_same_directory_is_refused(tmp_path, fake_steps, capsys):
    run_dir = tmp_path / "pipe"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from alia_nemo.locks import DirLock\n"
         f"lock = DirLock(Path({str(run_dir / LOCK_NAME)!r}), 'pipeline').acquire()\nprint('held', flush=True)\n"
         "time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["pipeline", f"recipe={NAME}", f"run_dir={run_dir}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"a pipeline by PID {holder.pid}" in err and str(run_dir) in err
        assert fake_steps == [] and not (run_dir / "pipeline.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # Its holder gone (same host, PID no longer running): the stale lock is taken over and the run goes on.
    time.sleep(0.1)
    assert main(["pipeline", f"recipe={NAME}", f"run_dir={run_dir}"]) == 0
    assert fake_steps == STEPS and not (run_dir / LOCK_NAME).exists()


def test_only_the_steps_that_consume_a_redone_output_are_redone():
    spec = PipelineConfig.model_validate({
        "name": "branches", "run_dir": "/tmp/unused",
        "stages": {"a": {}, "b": {}, "c": {"from": "a"}},
        "export": {"from": "b"}, "eval": {"niah": {"lengths": [256], "depths": [50]}},
    })  # fmt: skip
    pipe = Pipeline(spec, Path("/tmp/unused-branches"))
    assert pipe.dependents("a") == ["c"]
    assert pipe.dependents("b") == ["export", "eval"]
    assert pipe.dependents("export") == ["eval"] and pipe.dependents("eval") == []


def test_redoing_export_replaces_the_pipelines_own_incomplete_export(tmp_path, tok):
    """The real export step, run again over a damaged export/ (what a redo does), replaces it."""
    from tests.helpers import save_peaked_tiny_model

    pipe = Pipeline(load_pipeline(NAME), tmp_path / "pipe")
    final = pipe.output_path("sft")
    save_peaked_tiny_model(final)
    tok.save_pretrained(str(final))
    pipe._execute("export", None)
    assert pipe.output_problem("export") is None
    (pipe.output_path("export") / "model.safetensors").unlink()
    assert "no safetensors weights" in pipe.output_problem("export")
    pipe._execute("export", None)
    assert pipe.output_problem("export") is None
