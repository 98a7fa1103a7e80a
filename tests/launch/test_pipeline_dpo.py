"""A DPO stage appended after SFT in a pipeline: it starts from SFT's final/ (its reference model), and export and
eval take its result. The tiny chain runs end to end on CPU (local engine); the file checks are fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alia_nemo.launch.pipeline import Pipeline, PipelineConfig, load_pipeline


def test_dpo_pipelines_append_dpo_after_sft():
    for name in ("alia-tiny-instruct-dpo", "alia-40b-instruct-dpo"):
        spec = load_pipeline(name)
        assert list(spec.stages)[-2:] == ["sft", "dpo"] and spec.stages["dpo"].from_ == "sft"
        assert spec.export.from_ == "dpo"
        pipe = Pipeline(spec, Path("/tmp/unused"))
        cfg, digest, inputs = pipe.plan("dpo")
        assert cfg.stage.kind == "dpo" and cfg.data.format == "preference"
        # The reference model is the start model: SFT's final/, tokenizer included.
        assert cfg.model.pretrained == cfg.model.tokenizer == "/tmp/unused/sft/final"
        assert inputs["model"] == "/tmp/unused/sft/final" and len(digest) == 64
        assert pipe.upstream("export") == "dpo" and pipe.dependents("sft") == ["dpo", "export", "eval"]


def test_dpo_appended_to_a_finished_sft_run_reruns_only_dpo_export_and_eval(tmp_path, monkeypatch, tok):
    """`--from dpo` in a finished alia-tiny-instruct directory: CPT and SFT are kept, DPO, export and eval run."""
    from tests.launch.test_pipeline_faults import _eval_dir, _model_dir

    executed: list[str] = []

    def execute(self, step, cfg):
        executed.append(step)
        if step == "eval":
            _eval_dir(self.output_path(step), self)
        else:
            _model_dir(self.output_path(step), tok)
        return {"output": str(self.output_path(step))}

    monkeypatch.setattr(Pipeline, "_execute", execute)
    run_dir = tmp_path / "pipe"
    Pipeline(load_pipeline("alia-tiny-instruct"), run_dir).run(log=lambda *_: None)
    assert executed == ["cpt32k", "cpt160k", "sft", "export", "eval"]
    executed.clear()
    state = Pipeline(load_pipeline("alia-tiny-instruct-dpo"), run_dir).run(from_step="dpo", log=lambda *_: None)
    assert executed == ["dpo", "export", "eval"]
    assert state["dpo"]["inputs"]["model"] == str(run_dir / "sft" / "final")
    assert state["export"]["inputs"]["source"] == str(run_dir / "dpo" / "final")


@pytest.mark.slow
def test_tiny_sft_then_dpo_then_export_and_eval(tmp_path):
    """SFT from scratch -> DPO on the toy pairs -> export -> NIAH, through the real local engine."""
    spec = load_pipeline("alia-tiny-instruct-dpo").model_dump(by_alias=True)
    spec["stages"] = {"sft": {"recipe": None, "overrides": ["stage.epochs=2", "run.save_every=100"]},
                      "dpo": spec["stages"]["dpo"]}  # fmt: skip
    spec["eval"]["niah"] = {"lengths": [256], "depths": [50]}
    run_dir = tmp_path / "pipe"
    pipe = Pipeline(PipelineConfig.model_validate(spec), run_dir)
    state = pipe.run(log=lambda *_: None)
    assert [state[s]["status"] for s in ("sft", "dpo", "export", "eval")] == ["finished"] * 4
    assert state["dpo"]["inputs"]["model"] == str(run_dir / "sft" / "final")
    dpo = json.loads((run_dir / "dpo" / "summary.json").read_text())
    train = dpo["train"]
    assert train["last_accuracy"] > 0.9 and train["last_margin"] > train["first_margin"]
    # export is DPO's model: the same weights as dpo/final, not SFT's.
    from safetensors.torch import load_file

    exported = load_file(str(run_dir / "export" / "model.safetensors"))
    dpo_final = load_file(str(run_dir / "dpo" / "final" / "model.safetensors"))
    sft_final = load_file(str(run_dir / "sft" / "final" / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight"
    assert (exported[key] == dpo_final[key]).all() and not (exported[key] == sft_final[key]).all()
    niah = json.loads((run_dir / "eval" / "niah.json").read_text())
    assert len(niah["trials"]) == 1
