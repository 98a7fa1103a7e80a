"""Fixtures for the NeMo-RL plugin tests: the tiny one-GPU recipe compiled (sample mixture prepared)."""

from __future__ import annotations

import pytest

TINY = "sft-alia-tiny-1n1g-dtensor"


@pytest.fixture(scope="session")
def tiny_compiled(tmp_path_factory, _isolated_cache):
    """(composed config, compiled NeMo-RL config) of the tiny recipe, its mixture prepared and model written."""
    from alia_nemo.config_compose import load_config
    from alia_nemo.nemo_rl.compile import compile_stage

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config([f"recipe={TINY}", f"run.output_dir={out}"])
    return cfg, compile_stage(cfg, progress=False)
