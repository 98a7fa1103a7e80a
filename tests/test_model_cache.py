"""Offline compute nodes: a run whose hub model is not cached fails at once, naming it and the fix."""

from __future__ import annotations

import pytest

from alia_nemo.cli import main
from alia_nemo.config_compose import load_config
from alia_nemo.config_schema import ConfigError
from alia_nemo.model_cache import fetch, hub_ids, missing_from_cache, require_cached


def _fake_cache(root, repo: str, files: list[str]) -> None:
    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("abc123")
    for f in files:
        (snap / f).write_text("{}")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_missing_hub_model_is_named_with_the_fetch_command(hub_cache):
    cfg = load_config(["model=alia_40b", "stage=sft"])
    assert hub_ids(cfg) == ["BSC-LT/ALIA-40b"]
    with pytest.raises(ConfigError, match=r"BSC-LT/ALIA-40b not in the Hugging Face cache.*alia-nemo fetch"):
        require_cached(cfg)
    _fake_cache(hub_cache, "BSC-LT/ALIA-40b", ["config.json", "tokenizer_config.json"])
    assert missing_from_cache(cfg) == []
    require_cached(cfg)


def test_local_and_builtin_models_need_nothing(tmp_path, hub_cache, capsys):
    cfg = load_config([f"model.pretrained={tmp_path}", f"model.tokenizer={tmp_path}"])
    assert hub_ids(cfg) == [] and missing_from_cache(cfg) == []
    assert main(["fetch"]) == 0 and "nothing to fetch" in capsys.readouterr().out


def test_fetch_refuses_offline(hub_cache, capsys):
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        fetch(load_config(["model=alia_40b", "stage=sft"]))
    assert main(["fetch", "model=alia_40b", "stage=sft"]) == 2
    assert "HF_HUB_OFFLINE=0 alia-nemo fetch" in capsys.readouterr().err
