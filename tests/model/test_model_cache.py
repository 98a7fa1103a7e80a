"""Offline compute nodes: a run whose hub model is not cached fails at once, naming it and the fix."""

from __future__ import annotations

import re

import pytest

from alia_nemo.cli import main
from alia_nemo.config.compose import load_config
from alia_nemo.errors import ConfigError
from alia_nemo.model.hub_cache import fetch, hub_ids, is_local_path, missing_from_cache, require_cached


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
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    cfg = load_config([f"model.pretrained={tmp_path}", f"model.tokenizer={tmp_path}"])
    assert hub_ids(cfg) == [] and missing_from_cache(cfg) == []
    assert main(["fetch"]) == 0 and "nothing to fetch" in capsys.readouterr().out


def test_fetch_refuses_offline(hub_cache, capsys):
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        fetch(load_config(["model=alia_40b", "stage=sft"]))
    assert main(["fetch", "model=alia_40b", "stage=sft"]) == 2
    assert "HF_HUB_OFFLINE=0 alia-nemo fetch" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["model.pretrained", "model.tokenizer"])
@pytest.mark.parametrize("shape", ["/abs/alia-2b", "./models/x", "../x", "~/m", "models/me/alia-2b", "a-file"])
def test_missing_local_path_is_an_error_not_a_hub_id(key, shape, tmp_path, hub_cache, monkeypatch, capsys):
    """A local path that does not hold a model used to be looked up on the hub ("not in the cache", a 404):
    now it is named, with its key and the fix, before any run (even one allowed to download) or fetch."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    value = str(tmp_path / "nowhere" / "alia-2b") if shape.startswith("/abs") else shape
    why = "does not exist"
    if shape == "a-file":  # an existing file is a local path too, never a hub id
        (tmp_path / "a-file").write_text("not a model")
        why = "is a file, not a directory"
    overrides = [f"{key}='{value}'", "model.allow_download=true"]  # quoted: Hydra's grammar reserves a bare ~
    cfg = load_config(overrides)
    message = rf"{key}={re.escape(value)}: the local path .*{why}; set {key} to"
    with pytest.raises(ConfigError, match=message):
        require_cached(cfg)  # allow_download does not turn a path into a hub id
    with pytest.raises(ConfigError, match=message):
        hub_ids(cfg)
    assert main(["fetch", *overrides]) == 2
    assert f"alia-nemo fetch: error: {key}={value}: the local path" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["model.pretrained", "model.tokenizer"])
def test_local_directory_without_the_model_files_is_named(key, tmp_path, hub_cache):
    (tmp_path / "empty").mkdir()
    wanted = "has no config.json" if key == "model.pretrained" else "has none of tokenizer.json"
    with pytest.raises(ConfigError, match=rf"{key}=.*empty: the local path .*empty {wanted}"):
        require_cached(load_config([f"{key}={tmp_path / 'empty'}"]))


def test_org_name_hub_ids_are_still_hub_ids(tmp_path, hub_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not is_local_path("BSC-LT/salamandra-2b") and not is_local_path("gpt2")
    assert all(is_local_path(v) for v in ("/x", "./x", "../x", "~/x", "~", "a/b/c", ".", ".."))
    (tmp_path / "BSC-LT" / "local-copy").mkdir(parents=True)
    assert is_local_path("BSC-LT/local-copy")  # an org/name that exists here is the local directory, as before
    cfg = load_config(["model.pretrained=BSC-LT/salamandra-2b", "model.tokenizer=BSC-LT/salamandra-2b"])
    assert hub_ids(cfg) == ["BSC-LT/salamandra-2b"]
    with pytest.raises(ConfigError, match="BSC-LT/salamandra-2b not in the Hugging Face cache"):
        require_cached(cfg)
