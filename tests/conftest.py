"""Shared fixtures. Tests never touch the network: the hub is forced offline for the whole session."""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Build the test tokenizer and prepared mixtures into per-session caches, not the user's home."""
    os.environ["ALIA_NEMO_CACHE"] = str(tmp_path_factory.mktemp("alia_nemo_cache"))
    os.environ["ALIA_NEMO_PREPARED"] = str(tmp_path_factory.mktemp("alia_nemo_prepared"))
    yield


@pytest.fixture(scope="session")
def tok(_isolated_cache):
    """The built-in 1,024-piece test tokenizer with ALIA's special-token layout and our ChatML template."""
    from alia_nemo.model.tokenizer import build_test_tokenizer

    return build_test_tokenizer()


def pytest_collection_modifyitems(config, items):
    """Skip ``nemo_rl``-marked tests where NeMo-RL is not importable (everywhere but its container)."""
    if importlib.util.find_spec("nemo_rl") is not None:
        return
    skip = pytest.mark.skip(
        reason="nemo_rl not importable: run in the NeMo-RL container or with its source on PYTHONPATH"
    )
    for item in items:
        if item.get_closest_marker("nemo_rl") is not None:
            item.add_marker(skip)
