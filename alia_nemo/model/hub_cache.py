"""Models on offline compute nodes: fetch into the shared Hugging Face cache on a login node, and
check before a run that what it needs is there (a clear error instead of a hang on the network)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from alia_nemo.config.schema import AliaConfig
from alia_nemo.errors import ConfigError

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
# What makes a directory usable as a starting model or as a tokenizer (any one of the files).
LOCAL_FILES = {
    "model": ("config.json",),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"),
}


def is_local_path(value: str) -> bool:
    """Whether a model or tokenizer name is a local path rather than a hub id.

    A path starts with ``/``, ``./``, ``../`` or ``~`` (or is ``.``/``..``), has more than one ``/``, or exists on
    this machine; anything else (``org/name``, ``name``) is a hub id. A missing local path is then an error
    instead of a hub lookup that fails obscurely.
    """
    if value in (".", "..") or value.startswith(("/", "./", "../", "~")) or value.count("/") > 1:
        return True
    return Path(value).expanduser().exists()


def local_path_problem(key: str, value: str | None, kind: Literal["model", "tokenizer"]) -> str | None:
    """Why ``key=value`` can not be used when it is a local path (missing, a file, no model files), or None.

    None as well for null, ``builtin:`` names and hub ids. The message names the key, the path and the fix.
    """
    if not value or value.startswith("builtin:") or not is_local_path(value):
        return None
    path = Path(value).expanduser().absolute()
    wanted = LOCAL_FILES[kind]
    what = "a model directory with config.json" if kind == "model" else f"a tokenizer directory ({', '.join(wanted)})"
    if not path.exists():
        why = "does not exist"
    elif not path.is_dir():
        why = "is a file, not a directory"
    elif not any((path / f).is_file() for f in wanted):
        why = f"has no {wanted[0]}" if len(wanted) == 1 else f"has none of {', '.join(wanted)}"
    else:
        return None
    return (
        f"{key}={value}: the local path {path} {why}; set {key} to {what} (e.g. a finished stage's final/), "
        "or to a hub id as org/name"
    )


def check_local_models(cfg: AliaConfig) -> None:
    """Raise ConfigError when ``model.pretrained`` or ``model.tokenizer`` is a local path that can not be used."""
    for key, value, kind in (("model.pretrained", cfg.model.pretrained, "model"),
                             ("model.tokenizer", cfg.model.tokenizer, "tokenizer")):  # fmt: skip
        problem = local_path_problem(key, value, kind)
        if problem:
            raise ConfigError(problem)


def hub_ids(cfg: AliaConfig) -> list[str]:
    """Hub ids the run loads (pretrained weights, tokenizer) that are not local paths.

    Raises ConfigError first when one of them is a local path that does not hold a model (or tokenizer).
    """
    check_local_models(cfg)
    names = [cfg.model.pretrained, cfg.model.tokenizer]
    return sorted({n for n in names if n and not n.startswith("builtin:") and not is_local_path(n)})


def missing_from_cache(cfg: AliaConfig) -> list[str]:
    """Hub ids of ``cfg`` with no ``config.json`` (weights) or tokenizer file in the local HF cache."""
    from huggingface_hub import try_to_load_from_cache

    missing = []
    for repo in hub_ids(cfg):
        wanted = "config.json" if repo == cfg.model.pretrained else "tokenizer_config.json"
        found = try_to_load_from_cache(repo, wanted)
        if not isinstance(found, str):
            missing.append(repo)
    return missing


def require_cached(cfg: AliaConfig) -> None:
    """Refuse to start a run whose local model paths are wrong, or that would need the network for a model it does
    not have (offline nodes)."""
    check_local_models(cfg)  # a missing local path is an error even where downloads are allowed
    if cfg.model.allow_download and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
        return
    missing = missing_from_cache(cfg)
    if missing:
        cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise ConfigError(
            f"{', '.join(missing)} not in the Hugging Face cache ({cache}) and this run may not download "
            f"(compute nodes are offline). On a login node with network, with the same HF_HOME: "
            f"`alia-nemo fetch <the same overrides>` (or `hf download {missing[0]}`), then resubmit."
        )


def fetch(cfg: AliaConfig) -> dict[str, str]:
    """Download the run's hub models into the HF cache (login node); return repo -> local snapshot path."""
    from huggingface_hub import snapshot_download

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ConfigError(
            "HF_HUB_OFFLINE is set: fetch needs the network; run it as HF_HUB_OFFLINE=0 alia-nemo fetch ..."
        )
    out = {}
    for repo in hub_ids(cfg):
        try:
            out[repo] = snapshot_download(repo, allow_patterns=WEIGHT_PATTERNS)
        except Exception as exc:  # network, auth (gated repo), unknown id: say which and why
            raise ConfigError(f"could not fetch {repo}: {exc}") from None
    return out
