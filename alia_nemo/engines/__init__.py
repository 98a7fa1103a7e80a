"""Engines run a composed stage: ``local`` (Ray Train + transformers) here; ``nemo_rl`` on GPU clusters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alia_nemo.config.schema import AliaConfig
from alia_nemo.errors import AliaError


class TrainingError(AliaError, RuntimeError):
    """A run that started but must not be reported as a success (e.g. its loss went non-finite)."""

    exit_code = 1


NONFINITE = "nonfinite.json"  # in run.output_dir: the step where the loss went non-finite (a rerun refuses)


def nonfinite_error(output_dir: Path | None, which: str, value: float, step: int) -> TrainingError:
    """Record (in ``output_dir``, when given) and describe a loss that became non-finite at ``step``."""
    if output_dir is not None:
        record = {"step": step, "which": which, "value": str(value)}
        (Path(output_dir) / NONFINITE).write_text(json.dumps(record) + "\n")
    return TrainingError(
        f"{which} became {value} at step {step}; stopped there and wrote no final/. Checkpoints from this step "
        "on may hold non-finite weights: lower stage.lr, check stage.adam_eps / stage.grad_clip and the data, and "
        "start a new run.output_dir"
    )


# Free space below this on the run's filesystem, after a failure we can not otherwise explain, means a full disk:
# torch and safetensors report a failed write as a RuntimeError that does not say why.
LOW_SPACE_BYTES = 64 * 2**20


def explain_failure(exc: BaseException, output_dir: Path) -> BaseException:
    """The error to report for a failed run: the worker's own error, not Ray's wrapper around it.

    A non-finite loss (recorded by a worker in ``output_dir``), our errors and OS errors raised in a worker
    (a full disk while saving a checkpoint) are found among the wrapped causes; a failure with the run's
    disk (nearly) full becomes ENOSPC; anything else is returned as it was.
    """
    import errno
    import shutil

    from alia_nemo.errors import AliaError

    record = Path(output_dir) / NONFINITE
    if record.is_file():
        r = json.loads(record.read_text())
        return nonfinite_error(None, r["which"], r["value"], r["step"])
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (AliaError, OSError)) and e is not exc:
            return e
        todo.extend(getattr(e, "worker_failures", {}).values())
        todo.extend(x for x in (getattr(e, "cause", None), e.__cause__, e.__context__) if isinstance(x, BaseException))
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        return exc
    if free < LOW_SPACE_BYTES:
        return OSError(errno.ENOSPC, f"No space left on device ({free:,} bytes free)", str(output_dir))
    return exc


def run_stage(cfg: AliaConfig) -> dict[str, Any]:
    """Dispatch a stage to the engine its config names, inside its guarded run directory.

    Checks first that offline nodes have the stage's models; a finished run is left as it is (its summary is
    returned, nothing is trained or rewritten). See :mod:`alia_nemo.engines.run_dir` for the guards.
    """
    from alia_nemo.console import LOG_NAME, run_console
    from alia_nemo.engines.run_dir import open_run, run_path
    from alia_nemo.model.hub_cache import require_cached

    # First, before data preparation and Ray: where everything (the full log included) goes.
    out = run_path(cfg)
    print(f"[alia-nemo] run directory: {out} (full log: {LOG_NAME})", flush=True)
    require_cached(cfg)
    if cfg.engine.name not in ("local", "nemo_rl"):
        raise NotImplementedError(f"engine {cfg.engine.name!r} is not available yet")
    with open_run(cfg) as run, run_console(run.path, f"{cfg.stage.name} / {cfg.model.arch} on {cfg.engine.name}"):
        if run.finished is not None:
            print(
                f"[alia-nemo] already finished: {run.path} is a finished run (summary.json, final/): nothing to do; "
                f"its model is {run.path / 'final'}. To train again, choose a new run.output_dir; to train it "
                "further, change the stage and set run.resume=force",
                flush=True,
            )
            return {**run.finished, "already_finished": True}
        if cfg.engine.name == "local":
            from alia_nemo.engines.local import run_local

            return run_local(cfg)
        from alia_nemo.engines.nemo_rl import run_nemo_rl

        return run_nemo_rl(cfg)
