"""`alia-nemo pipeline` ends with where everything is: each stage's final/ with its last numbers, the export, the
harness results when run, and last the NIAH picture with its mean score. Fast: the step runner is replaced by one
that writes complete outputs (as in test_pipeline_faults.py) and the summaries the engines would write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alia_nemo.cli import main
from alia_nemo.launch.pipeline import Pipeline, load_pipeline, summary_lines

# What each fake stage's summary.json holds under "train": the local engine's keys, and for DPO the NeMo-RL engine's
# spelling of the accuracy (last_rewards/accuracy) to show both engines' summaries are read.
TRAIN = {
    "cpt32k": {"last_loss": 4.25, "eval_loss": 4.5},
    "cpt160k": {"last_loss": 3.0},
    "sft": {"last_loss": 1.2345, "eval_loss": 1.5},
    "dpo": {"last_loss": 0.05, "eval_loss": 0.1, "last_rewards/accuracy": 0.96875, "eval_rewards/accuracy": 1.0},
}


def _model_dir(path: Path, tok) -> None:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(8, 8)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    tok.save_pretrained(str(path))


@pytest.fixture
def fake_steps(monkeypatch, tok):
    def execute(self, step, cfg):
        out = self.output_path(step)
        if step == "eval":
            out.mkdir(parents=True, exist_ok=True)
            e = self.spec.eval.niah
            trials = [{"length": n, "depth": d, "score": 1.0 if d < 100 else 0.5} for n in e.lengths for d in e.depths]
            mean = sum(t["score"] for t in trials) / len(trials)
            (out / "niah.json").write_text(json.dumps({"mean_score": mean, "trials": trials}))
            (out / "niah.png").write_bytes(b"\x89PNG fake")
            return {"output": str(out / "niah.json"), "niah_mean_score": mean}
        _model_dir(out, tok)
        if step in TRAIN:
            (self.run_dir / step / "summary.json").write_text(json.dumps({"train": TRAIN[step]}))
        return {"output": str(out)}

    monkeypatch.setattr(Pipeline, "_execute", execute)


def test_the_pipeline_ends_with_its_outputs_and_scores(fake_steps, tmp_path, capsys):
    run = tmp_path / "pipe"
    assert main(["pipeline", "recipe=alia-tiny-instruct", f"run_dir={run}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    done = next(i for i, line in enumerate(lines) if line.startswith("[alia-nemo] pipeline alia-tiny-instruct done"))
    assert lines[done + 1 :] == [
        f"[alia-nemo]   cpt32k: {run}/cpt32k/final (last loss 4.250, validation loss 4.500)",
        f"[alia-nemo]   cpt160k: {run}/cpt160k/final (last loss 3.000)",
        f"[alia-nemo]   sft: {run}/sft/final (last loss 1.234, validation loss 1.500)",
        f"[alia-nemo]   export: {run}/export",
        f"[alia-nemo]   NIAH: mean score 0.833 over 6 trials, picture {run}/eval/niah.png, "
        f"results {run}/eval/niah.json",
    ]
    # A rerun that skips everything still ends with the same summary.
    assert main(["pipeline", "recipe=alia-tiny-instruct", f"run_dir={run}"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == lines[-1]


def test_a_dpo_stage_shows_its_preference_accuracy(fake_steps, tmp_path, capsys):
    run = tmp_path / "pipe"
    assert main(["pipeline", "recipe=alia-tiny-instruct-dpo", f"run_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert (f"[alia-nemo]   dpo: {run}/dpo/final (last loss 0.050, validation loss 0.100, preference accuracy 0.97, "
            "validation accuracy 1.00)\n") in out  # fmt: skip
    assert out.splitlines()[-1].startswith("[alia-nemo]   NIAH: mean score 0.833")


def test_the_summary_lists_only_what_is_there(tmp_path, tok):
    pipe = Pipeline(load_pipeline("alia-tiny-instruct"), tmp_path / "pipe")
    assert summary_lines(pipe) == []
    _model_dir(pipe.output_path("sft"), tok)  # a stage without summary.json (killed before it was written)
    (pipe.run_dir / "eval").mkdir()
    (pipe.run_dir / "eval" / "niah.json").write_text("{not json")
    assert summary_lines(pipe) == [
        f"sft: {pipe.run_dir}/sft/final",
        f"NIAH: picture (missing), results {pipe.run_dir}/eval/niah.json",
    ]


def test_harness_results_are_listed_when_the_pipeline_runs_the_harness(tmp_path):
    spec = load_pipeline("alia-tiny-instruct").model_copy(deep=True)
    spec.eval.harness = True
    pipe = Pipeline(spec, tmp_path / "pipe")
    harness = pipe.run_dir / "eval" / "harness"
    (harness / "export").mkdir(parents=True)
    assert summary_lines(pipe) == [f"harness results: {harness}"]
    (harness / "export" / "results_2026-01-01T00-00-00.json").write_text("{}")
    pipe.state["eval"] = {"status": "failed", "harness_status": 1}
    assert summary_lines(pipe) == [
        f"harness results: {harness}/export/results_2026-01-01T00-00-00.json (lm_eval exit 1)"
    ]
