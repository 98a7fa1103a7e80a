"""Engines run a composed stage: ``local`` (Ray Train + transformers) here; ``nemo_rl`` on GPU clusters."""

from __future__ import annotations

from typing import Any

from alia_nemo.config_schema import AliaConfig
from alia_nemo.errors import AliaError


class TrainingError(AliaError, RuntimeError):
    """A run that started but must not be reported as a success (e.g. its loss went non-finite)."""

    exit_code = 1


def run_stage(cfg: AliaConfig) -> dict[str, Any]:
    """Dispatch a stage to the engine its config names (after checking offline nodes have its models)."""
    from alia_nemo.model_cache import require_cached

    require_cached(cfg)
    if cfg.engine.name == "local":
        from alia_nemo.engines.local import run_local

        return run_local(cfg)
    if cfg.engine.name == "nemo_rl":
        from alia_nemo.engines.nemo_rl import run_nemo_rl

        return run_nemo_rl(cfg)
    raise NotImplementedError(f"engine {cfg.engine.name!r} is not available yet")
