"""CPT 32k -> CPT 160k -> SFT -> export -> eval in one command, restartable.

The run directory keeps ``pipeline.json``: per step the resolved config and its hash, inputs, start and
end, status and output. A rerun skips finished steps whose config is unchanged, resumes an interrupted
one (the engines continue from the newest checkpoint in the step's output directory), and refuses to go
on when a finished step's config changed, unless told to redo from there (``--from STEP``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alia_nemo.config_schema import ConfigError

STATE = "pipeline.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PipelineStage(_Strict):
    recipe: str | None = None
    from_: str | None = Field(None, alias="from", description="the stage whose final/ model this one starts from")
    overrides: list[str] = []


class ExportStep(_Strict):
    from_: str = Field(alias="from")


class NiahStep(_Strict):
    lengths: list[int] = Field(min_length=1)
    depths: list[float] = Field(min_length=1)


class EvalStep(_Strict):
    niah: NiahStep
    harness: bool = False


class PipelineConfig(_Strict):
    name: str
    run_dir: str
    stages: dict[str, PipelineStage] = Field(min_length=1)
    export: ExportStep
    eval: EvalStep


def pipeline_files() -> dict[str, Path]:
    from alia_nemo.config_compose import config_root

    return {p.stem: p for p in sorted((config_root() / "conf" / "pipeline").glob("*.yaml"))}


def load_pipeline(name: str) -> PipelineConfig:
    files = pipeline_files()
    if name not in files:
        raise ConfigError(f"unknown pipeline {name!r}; available: {sorted(files)}")
    try:
        spec = PipelineConfig.model_validate(yaml.safe_load(files[name].read_text()))
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"pipeline {name!r} is invalid:\n  " + "\n  ".join(lines)) from None
    names = list(spec.stages)
    for i, (stage, st) in enumerate(spec.stages.items()):
        if st.from_ is not None and st.from_ not in names[:i]:
            raise ConfigError(f"pipeline {name!r}: stage {stage} starts from {st.from_!r}, not an earlier stage")
    if spec.export.from_ not in spec.stages:
        raise ConfigError(f"pipeline {name!r}: export.from={spec.export.from_!r} is not a stage")
    return spec


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class Pipeline:
    """One pipeline run in ``run_dir``; :meth:`run` executes the selected steps."""

    def __init__(self, spec: PipelineConfig, run_dir: Path | None = None):
        self.spec = spec
        self.run_dir = Path(run_dir or spec.run_dir).expanduser().resolve()
        self.steps = [*spec.stages, "export", "eval"]
        self.state_path = self.run_dir / STATE
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    def _save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, default=str))
        tmp.replace(self.state_path)

    def stage_overrides(self, stage: str) -> list[str]:
        st = self.spec.stages[stage]
        out = [f"recipe={st.recipe}"] if st.recipe else []
        out += [*st.overrides, f"run.output_dir={self.run_dir / stage}"]
        if st.from_:
            start = self.run_dir / st.from_ / "final"
            out += [f"model.pretrained={start}", f"model.tokenizer={start}"]
        return out

    def plan(self, step: str) -> tuple[Any, str, dict[str, Any]]:
        """(the step's config, its hash, its inputs)."""
        from alia_nemo.config_compose import load_config

        if step in self.spec.stages:
            cfg = load_config(self.stage_overrides(step))
            inputs = {"model": cfg.model.pretrained or f"random init ({cfg.model.arch})", "data": cfg.data.name}
            return cfg, _hash(cfg.model_dump(mode="json")), inputs
        if step == "export":
            src = self.spec.export.from_
            inputs = {"source": str(self.run_dir / src / "final"), "source_hash": self.state.get(src, {}).get("hash")}
            return None, _hash(inputs), inputs
        inputs = {"model": str(self.run_dir / "export"), "export_hash": self.state.get("export", {}).get("hash"),
                  "eval": self.spec.eval.model_dump()}  # fmt: skip
        return None, _hash(inputs), inputs

    def run(self, from_step: str | None = None, only: str | None = None, log=print) -> dict[str, Any]:
        for name, opt in (("--from", from_step), ("--only", only)):
            if opt is not None and opt not in self.steps:
                raise ConfigError(f"{name} {opt}: not a step of {self.spec.name}; steps: {self.steps}")
        start = self.steps.index(from_step) if from_step else 0
        for i, step in enumerate(self.steps):
            rec = self.state.get(step, {})
            if only is not None and step != only:
                if i < self.steps.index(only) and rec.get("status") != "finished":
                    raise ConfigError(f"--only {only}: earlier step {step} has not finished; run the pipeline first")
                continue
            cfg, digest, inputs = self.plan(step)
            forced = (from_step is not None and i >= start) or only == step
            if i < start and rec.get("status") != "finished":
                raise ConfigError(f"--from {from_step}: earlier step {step} has not finished")
            if i < start:
                continue
            if rec.get("status") == "finished" and not forced:
                if rec.get("hash") == digest:
                    log(f"[alia-nemo] pipeline: {step} finished earlier, skipped")
                    continue
                raise ConfigError(
                    f"step {step} finished with another configuration (hash {rec.get('hash', '?')[:12]}, now "
                    f"{digest[:12]}); its output would not match. Redo from it with --from {step}, or restore the "
                    "configuration"
                )
            if rec.get("status") in ("running", "failed") and rec.get("hash") != digest and not forced:
                raise ConfigError(
                    f"step {step} was interrupted under another configuration; its checkpoints do not match. "
                    f"Redo it with --from {step}"
                )
            resuming = rec.get("status") in ("running", "failed") and rec.get("hash") == digest
            log(f"[alia-nemo] pipeline: {'resuming' if resuming else 'running'} {step}")
            self.state[step] = {
                "status": "running", "hash": digest, "inputs": inputs, "started": time.time(),
                "attempts": rec.get("attempts", 0) + 1, "config": cfg.model_dump(mode="json") if cfg else None,
            }  # fmt: skip
            if forced:  # later steps were built on the old output: they must run again
                for later in self.steps[i + 1 :]:
                    if later in self.state:
                        self.state[later]["status"] = "stale"
            self._save()
            try:
                output = self._execute(step, cfg)
            except BaseException as exc:
                self.state[step].update(status="failed", ended=time.time(), error=f"{type(exc).__name__}: {exc}")
                self._save()
                raise
            self.state[step].update(status="finished", ended=time.time(), **output)
            self._save()
        return self.state

    def _execute(self, step: str, cfg) -> dict[str, Any]:
        if step in self.spec.stages:
            from alia_nemo.engines import run_stage

            summary = run_stage(cfg)
            train = summary.get("train", {})
            return {"output": str(self.run_dir / step / "final"), "resumed_from": train.get("resumed_from"),
                    "global_step": train.get("global_step")}  # fmt: skip
        if step == "export":
            from alia_nemo.export import export

            return {"output": str(export(self.run_dir / self.spec.export.from_ / "final", self.run_dir / "export"))}
        from alia_nemo import niah

        model = self.run_dir / "export"
        backend = niah.TransformersBackend(str(model))
        e = self.spec.eval.niah
        trials = niah.run(backend.chat, backend.tokenizer, niah.default_haystack(), e.lengths, e.depths)
        files = niah.write_results(trials, self.run_dir / "eval", {"model": str(model), "temperature": 0.0})
        out = {"output": str(files["json"]), "niah_mean_score": sum(t.score for t in trials) / len(trials)}
        if self.spec.eval.harness:
            from alia_nemo import harness

            out["harness_status"] = harness.run(harness.command(self.run_dir / "eval" / "harness", str(model)))
        return out
