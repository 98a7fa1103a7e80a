"""Models on offline compute nodes: fetch into the shared Hugging Face cache on a login node, and
check before a run that what it needs is there (a clear error instead of a hang on the network)."""

from __future__ import annotations

import os
from pathlib import Path

from alia_nemo.config_schema import AliaConfig, ConfigError

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


def hub_ids(cfg: AliaConfig) -> list[str]:
    """Hub ids the run loads (pretrained weights, tokenizer) that are not local directories."""
    names = [cfg.model.pretrained, cfg.model.tokenizer]
    return sorted({n for n in names if n and not n.startswith("builtin:") and not Path(n).expanduser().exists()})


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
    """Refuse to start a run that would need the network for a model it does not have (offline nodes)."""
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
