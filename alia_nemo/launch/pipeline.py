"""CPT 32k -> CPT 160k -> SFT -> export -> eval in one command, restartable.

The run directory keeps ``pipeline.json``: per step the resolved config and its hash, inputs, start and
end, status and output. A rerun skips finished steps whose config is unchanged, resumes an interrupted
one (the engines continue from the newest checkpoint in the step's output directory), and refuses to go
on when a finished step's config changed, unless told to redo from there (``--from STEP``).

``pipeline.json`` alone is not trusted: before a finished step is skipped its output is checked (a model
directory with its config, tokenizer and weights whose safetensors headers parse and match the file sizes;
the evaluation's results). A step whose output is missing or incomplete is run again, with every step that
consumes its output. A ``pipeline.json`` that does not parse is never overwritten: the run stops and says so.
The run directory is locked (:class:`alia_nemo.locks.DirLock`) while a pipeline runs in it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alia_nemo.errors import AliaError, ConfigError
from alia_nemo.locks import DirLock

STATE = "pipeline.json"
# The name every alia-nemo writer locks a directory with, so a `train` pointed at a pipeline's directory collides too.
LOCK_NAME = ".alia-nemo.lock"
STATUSES = ("running", "failed", "finished", "stale")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class PipelineStateError(AliaError):
    """``pipeline.json`` can not be read as a pipeline's record; it is left untouched for the user."""


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
    from alia_nemo.config.compose import config_root

    return {p.stem: p for p in sorted((config_root() / "conf" / "pipeline").glob("*.yaml"))}


def load_pipeline(name: str) -> PipelineConfig:
    """The pipeline ``conf/pipeline/NAME.yaml``, or the pipeline file at a path (``recipe=PATH`` as for recipes: it ends
    in .yaml/.yml or contains a ``/``; e.g. a copy from ``alia-nemo recipes copy``), validated."""
    from alia_nemo.config.compose import is_recipe_path, recipe_path

    files = pipeline_files()
    if is_recipe_path(name):
        path = recipe_path(name, "pipeline")
    elif name not in files:
        raise ConfigError(f"unknown pipeline {name!r}; available: {sorted(files)}")
    else:
        path = files[name]
    try:
        spec = PipelineConfig.model_validate(yaml.safe_load(path.read_text()))
    except yaml.YAMLError as exc:  # a hand-edited copy
        raise ConfigError(f"pipeline {name!r}: {path} is not valid YAML: {exc}") from None
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


def _json_problem(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path} is missing"
    except (ValueError, UnicodeDecodeError):
        return f"{path} is not valid JSON"
    return None if isinstance(data, dict) else f"{path} is not a JSON object"


def model_dir_problem(model_dir: Path) -> str | None:
    """Why ``model_dir`` is not a complete Hugging Face model directory (None when it is).

    Its weights and ``config.json`` as :func:`alia_nemo.model.checkpoints.weights_problem` checks them (every shard's
    safetensors header parses and matches the file's size), and a tokenizer: ``tokenizer_config.json`` and a
    non-empty vocabulary file.
    """
    from alia_nemo.model.checkpoints import weights_problem

    problem = weights_problem(model_dir) or _json_problem(model_dir / "tokenizer_config.json")
    if problem:
        return problem
    if not any((model_dir / name).is_file() and (model_dir / name).stat().st_size for name in TOKENIZER_FILES):
        return f"{model_dir} has no tokenizer vocabulary ({', '.join(TOKENIZER_FILES)})"
    return None


def eval_dir_problem(eval_dir: Path, spec: EvalStep) -> str | None:
    """Why the eval step's outputs in ``eval_dir`` are missing or incomplete (None when they are complete)."""
    results = eval_dir / "niah.json"
    problem = _json_problem(results)
    if problem:
        return problem
    trials = json.loads(results.read_text(encoding="utf-8")).get("trials")
    cells = {(float(length), float(depth)) for length in spec.niah.lengths for depth in spec.niah.depths}
    try:
        done = {(float(t["length"]), float(t["depth"])) for t in trials}
    except (KeyError, TypeError, ValueError):
        return f"{results} has malformed trials"
    if not cells <= done:
        return f"{results} has {len(cells & done)} of the {len(cells)} trials"
    if not (eval_dir / "niah.png").is_file():
        return f"{eval_dir / 'niah.png'} is missing"
    if spec.harness and not (eval_dir / "harness").is_dir():
        return f"{eval_dir / 'harness'} is missing"
    return None


def _record_problem(rec: Any) -> str | None:
    """Why a step's record in ``pipeline.json`` has the wrong shape (None when it is fine)."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__} where the step's record (an object) belongs"
    if rec.get("status") not in STATUSES:
        return f"status {rec.get('status')!r} is not one of {', '.join(STATUSES)}"
    if not isinstance(rec.get("hash", ""), str):
        return "its hash is not a string"
    if not isinstance(rec.get("attempts", 0), int):
        return "its attempts count is not a number"
    return None


class Pipeline:
    """One pipeline run in ``run_dir``; :meth:`run` executes the selected steps."""

    def __init__(self, spec: PipelineConfig, run_dir: Path | None = None):
        self.spec = spec
        self.run_dir = Path(run_dir or spec.run_dir).expanduser().resolve()
        self.steps = [*spec.stages, "export", "eval"]
        self.state_path = self.run_dir / STATE
        self._loaded_text: str | None = None
        self.resuming = False  # whether the step being executed continues an interrupted attempt
        self.state: dict[str, Any] = self._load_state()

    def _read_state_text(self) -> str | None:
        try:
            return self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise self._state_error("it is not UTF-8 text") from None

    def _load_state(self) -> dict[str, Any]:
        """``pipeline.json``, checked for shape; a damaged one stops the run (the user's record: never replaced)."""
        text = self._read_state_text()
        if text is None:
            self._loaded_text = None
            return {}
        try:
            state = json.loads(text)
        except ValueError as exc:
            raise self._state_error(f"invalid JSON: {exc}") from None
        if not isinstance(state, dict):
            raise self._state_error(f"a JSON {type(state).__name__} where an object of steps belongs")
        for step, rec in state.items():
            why = _record_problem(rec)
            if why:
                raise self._state_error(f"step {step!r}: {why}")
        self._loaded_text = text
        return state

    def _state_error(self, why: str) -> PipelineStateError:
        path = self.state_path
        return PipelineStateError(
            f"{path} is not a valid pipeline record ({why}); it is left untouched. Repair it or restore it from a "
            f"backup, or move it aside (mv {path} {path}.bad) to start the record over: every step then runs "
            "again, each stage resuming from (or finding finished) its run directory"
        )

    def _save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.state, indent=2, default=str)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.state_path)
        self._loaded_text = text

    def stage_overrides(self, stage: str) -> list[str]:
        """The overrides that compose ``stage``'s config: its recipe, its own overrides, its directory, its start."""
        st = self.spec.stages[stage]
        out = [f"recipe={st.recipe}"] if st.recipe else []
        out += [*st.overrides, f"run.output_dir={self.run_dir / stage}"]
        if st.from_:
            start = self.run_dir / st.from_ / "final"
            out += [f"model.pretrained={start}", f"model.tokenizer={start}"]
        return out

    def plan(self, step: str) -> tuple[Any, str, dict[str, Any]]:
        """(the step's config, its hash, its inputs)."""
        from alia_nemo.config.compose import load_config
        from alia_nemo.config.resolve import resolve

        if step in self.spec.stages:
            cfg = load_config(self.stage_overrides(step))
            stage = resolve(cfg)  # the numbers the step is planned with (rows, steps, tokens), recorded with it
            inputs = {"model": stage.start_model, "data": cfg.data.name, "global_batch_size": stage.global_batch_size,
                      "steps": stage.steps, "tokens": stage.tokens}  # fmt: skip
            return cfg, _hash(cfg.model_dump(mode="json")), inputs
        if step == "export":
            src = self.spec.export.from_
            inputs = {"source": str(self.run_dir / src / "final"), "source_hash": self.state.get(src, {}).get("hash")}
            return None, _hash(inputs), inputs
        inputs = {"model": str(self.run_dir / "export"), "export_hash": self.state.get("export", {}).get("hash"),
                  "eval": self.spec.eval.model_dump()}  # fmt: skip
        return None, _hash(inputs), inputs

    def output_path(self, step: str) -> Path:
        """Where ``step`` writes its output: a stage's ``final/``, ``export/``, ``eval/``."""
        return self.run_dir / step / "final" if step in self.spec.stages else self.run_dir / step

    def output_problem(self, step: str) -> str | None:
        """Why ``step``'s output on disk is missing or incomplete (None when it is complete)."""
        path = self.output_path(step)
        return eval_dir_problem(path, self.spec.eval) if step == "eval" else model_dir_problem(path)

    def upstream(self, step: str) -> str | None:
        """The step whose output ``step`` consumes (None for a stage that starts from scratch)."""
        if step in self.spec.stages:
            return self.spec.stages[step].from_
        return self.spec.export.from_ if step == "export" else "export"

    def dependents(self, step: str) -> list[str]:
        """The later steps built, directly or not, on ``step``'s output."""
        out: list[str] = []
        for later in self.steps[self.steps.index(step) + 1 :]:
            if self.upstream(later) in (step, *out):
                out.append(later)
        return out

    def run(self, from_step: str | None = None, only: str | None = None, log: Callable[[str], Any] = print) -> dict:
        """Run the steps in order: skip finished ones whose config is unchanged and output complete, resume an
        interrupted one, redo one whose output is gone (and what consumes it). ``from_step`` redoes from a step,
        ``only`` runs one step. The run directory stays locked throughout: a second pipeline there stops at once.
        """
        for name, opt in (("--from", from_step), ("--only", only)):
            if opt is not None and opt not in self.steps:
                raise ConfigError(f"{name} {opt}: not a step of {self.spec.name}; steps: {self.steps}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with DirLock(self.run_dir / LOCK_NAME, "pipeline"):
            if self._read_state_text() != self._loaded_text:
                self.state = self._load_state()  # another pipeline wrote it after we read it: take its record
            return self._run(from_step, only, log)

    def _require_input(self, step: str, option: str) -> None:
        """``--from``/``--only`` start at ``step``: the output it consumes must be complete."""
        up = self.upstream(step)
        problem = self.output_problem(up) if up is not None else None
        if problem:
            raise ConfigError(
                f"{option} {step}: its input, the output of step {up}, is incomplete ({problem}); redo from it "
                f"with --from {up}"
            )

    def _run(self, from_step: str | None, only: str | None, log: Callable[[str], Any]) -> dict[str, Any]:
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
            if step in (from_step, only):
                self._require_input(step, "--only" if only else "--from")
            redo = False
            if rec.get("status") == "finished" and not forced:
                if rec.get("hash") != digest:
                    raise ConfigError(
                        f"step {step} finished with another configuration (hash {rec.get('hash', '?')[:12]}, now "
                        f"{digest[:12]}); its output would not match. Redo from it with --from {step}, or restore "
                        "the configuration"
                    )
                problem = self.output_problem(step)
                if problem is None:
                    log(f"[alia-nemo] pipeline: {step} finished earlier, skipped")
                    continue
                # pipeline.json says finished, the disk says otherwise (deleted, truncated): trust the disk.
                log(f"[alia-nemo] pipeline: {step} is recorded as finished but its output is incomplete ({problem}); "
                    "running it again")  # fmt: skip
                redo = True
            if rec.get("status") in ("running", "failed") and rec.get("hash") != digest and not forced:
                raise ConfigError(
                    f"step {step} was interrupted under another configuration; its checkpoints do not match. "
                    f"Redo it with --from {step}"
                )
            self.resuming = rec.get("status") in ("running", "failed") and rec.get("hash") == digest and not forced
            log(f"[alia-nemo] pipeline: {'resuming' if self.resuming else 'running'} {step}")
            self.state[step] = {
                "status": "running", "hash": digest, "inputs": inputs, "started": time.time(),
                "attempts": rec.get("attempts", 0) + 1, "config": cfg.model_dump(mode="json") if cfg else None,
            }  # fmt: skip
            if forced or redo:  # later steps were built on the old output: they must run again
                for later in self.dependents(step):
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
        """Run one step; returns what its record keeps (output path, and per step its own numbers)."""
        if step in self.spec.stages:
            from alia_nemo.engines import run_stage

            summary = run_stage(cfg)
            train = summary.get("train", {})
            return {"output": str(self.run_dir / step / "final"), "resumed_from": train.get("resumed_from"),
                    "global_step": train.get("global_step")}  # fmt: skip
        if step == "export":
            from alia_nemo.model.export import export

            # force: export/ is this pipeline's own output; export replaces only a previous export, nothing else.
            source = self.run_dir / self.spec.export.from_ / "final"
            return {"output": str(export(source, self.run_dir / "export", force=True))}
        from alia_nemo.eval import niah

        model = self.run_dir / "export"
        e = self.spec.eval.niah
        haystack = niah.default_haystack()
        settings = {"model": str(model), "tokenizer": str(model), "temperature": 0.0, "max_new_tokens": 64,
                    "lengths": e.lengths, "depths": e.depths, "haystack": niah.settings_digest(haystack),
                    "judge": None}  # fmt: skip
        # Trials finished by an interrupted attempt are kept; a fresh run of the step (a new export) starts over.
        store = niah.TrialStore(self.run_dir / "eval", settings, fresh=not self.resuming)
        backend = niah.TransformersBackend(str(model))
        trials = niah.run(backend.chat, backend.tokenizer, haystack, e.lengths, e.depths, store=store)
        files = niah.write_results(trials, self.run_dir / "eval", {"model": str(model), "temperature": 0.0})
        out = {"output": str(files["json"]), "niah_mean_score": sum(t.score for t in trials) / len(trials)}
        if self.spec.eval.harness:
            from alia_nemo.eval import harness

            out["harness_status"] = harness.run(harness.command(self.run_dir / "eval" / "harness", str(model)))
        return out


def _stage_numbers(summary_path: Path) -> str:
    """A stage's last training loss, validation loss and (DPO) preference accuracy from its ``summary.json``, as
    ``(last loss 1.234, ...)``; empty when the file is missing or holds none of them."""
    try:
        train = json.loads(summary_path.read_text(encoding="utf-8")).get("train") or {}
    except (OSError, ValueError, AttributeError):
        return ""
    if not isinstance(train, dict):
        return ""
    # The local engine logs last_accuracy, the NeMo-RL engine last_rewards/accuracy: the same number.
    accuracy = train.get("last_accuracy", train.get("last_rewards/accuracy"))
    parts = [f"{label} {value:.3f}" if "accuracy" not in label else f"{label} {value:.2f}"
             for label, value in (("last loss", train.get("last_loss")), ("validation loss", train.get("eval_loss")),
                                  ("preference accuracy", accuracy),
                                  ("validation accuracy", train.get("eval_rewards/accuracy")))
             if isinstance(value, (int, float))]  # fmt: skip
    return f" ({', '.join(parts)})" if parts else ""


def _niah_numbers(results: Path) -> str:
    """``mean score S over N trials`` from ``niah.json`` (its mean_score, else the trials' mean); "" if unreadable."""
    try:
        data = json.loads(results.read_text(encoding="utf-8"))
        trials = data.get("trials") or []
        scores = [float(t["score"]) for t in trials if isinstance(t, dict) and t.get("score") is not None]
        mean = data.get("mean_score", sum(scores) / len(scores) if scores else None)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return ""
    return f"mean score {float(mean):.3f} over {len(trials)} trials" if mean is not None else ""


def summary_lines(pipe: Pipeline) -> list[str]:
    """What a finished (or partly run) pipeline produced, one line per output, read from the run directory: each
    stage's ``final/`` with its last loss (and DPO accuracy), the export, the NIAH picture with its mean score, and the
    harness results. Outputs not there yet are left out; the NIAH line ends the list, as it is what one looks at."""
    lines = []
    for stage in pipe.spec.stages:
        final = pipe.output_path(stage)
        if final.is_dir():
            lines.append(f"{stage}: {final}{_stage_numbers(pipe.run_dir / stage / 'summary.json')}")
    export = pipe.output_path("export")
    if export.is_dir():
        lines.append(f"export: {export}")
    eval_dir = pipe.output_path("eval")
    if pipe.spec.eval.harness and (eval_dir / "harness").is_dir():
        from alia_nemo.eval.harness import results_files

        found = results_files(eval_dir / "harness")
        status = pipe.state.get("eval", {}).get("harness_status")
        exit_note = f" (lm_eval exit {status})" if isinstance(status, int) and status else ""
        lines.append(f"harness results: {found[-1] if found else eval_dir / 'harness'}{exit_note}")
    if (eval_dir / "niah.json").is_file():
        numbers = _niah_numbers(eval_dir / "niah.json")
        picture = eval_dir / "niah.png"
        lines.append(f"NIAH: {numbers + ', ' if numbers else ''}picture {picture if picture.is_file() else '(missing)'}"
                     f", results {eval_dir / 'niah.json'}")  # fmt: skip
    return lines
