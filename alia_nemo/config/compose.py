"""Compose a run configuration from ``conf/`` (Hydra groups) and ``recipes/`` with command-line overrides.

``recipe=NAME`` selects ``recipes/NAME.yaml`` as the primary config (a recipe starts from
``config`` and overrides groups and keys); everything else is Hydra's override grammar.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from alia_nemo.config.schema import AliaConfig, validate_config
from alia_nemo.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # alia_nemo/


def config_root() -> Path:
    """Directory holding ``conf/`` and ``recipes/``.

    ``ALIA_NEMO_CONFIG_ROOT`` wins; then the source checkout (editable installs); then the copy
    packed into the wheel.
    """
    candidates = [os.environ.get("ALIA_NEMO_CONFIG_ROOT"), PACKAGE_DIR.parent, PACKAGE_DIR / "_configs"]
    for c in candidates:
        if c and (Path(c) / "conf" / "config.yaml").is_file():
            return Path(c)
    raise ConfigError(f"no conf/config.yaml found in {[c for c in candidates if c]}; set ALIA_NEMO_CONFIG_ROOT")


def recipe_files() -> dict[str, Path]:
    """Every recipe under ``recipes/`` (any depth) by name; names must be unique across folders."""
    found: dict[str, Path] = {}
    for path in sorted((config_root() / "recipes").rglob("*.yaml")):
        if path.stem in found:
            raise ConfigError(f"recipe name {path.stem!r} is used twice: {found[path.stem]} and {path}; rename one")
        found[path.stem] = path
    return found


def available_recipes() -> list[str]:
    """Names accepted by ``recipe=NAME``."""
    return sorted(recipe_files())


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("now"):
        OmegaConf.register_new_resolver("now", lambda fmt: datetime.now().strftime(fmt), use_cache=True)
    if not OmegaConf.has_resolver("sample"):
        from alia_nemo.sample_data import sample_path

        OmegaConf.register_new_resolver("sample", lambda name: str(sample_path(name)))


def split_recipe(overrides: list[str]) -> tuple[str | None, list[str]]:
    """Take ``recipe=NAME`` out of the overrides (it picks the primary config, it is not a key)."""
    recipe, rest = None, []
    for o in overrides:
        if o.startswith("recipe="):
            recipe = o.split("=", 1)[1]
        else:
            rest.append(o)
    return recipe, rest


def upsert(override: str) -> str:
    """``a.b=v`` sets the key whether or not a YAML file holds it (Hydra alone would ask for ``+a.b=v``).

    The configs state only what differs from the schema's defaults, so most keys are in no YAML file; the
    schema still rejects a key it does not know, naming it. Group choices (``stage=sft``), ``+``/``++``/``~``
    and ``hydra.*`` overrides pass unchanged.
    """
    key, eq, _ = override.partition("=")
    if eq and "." in key and not key.startswith(("+", "~", "hydra.")) and "@" not in key:
        return f"++{override}"
    return override


def compose_dict(overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose and resolve the configuration for ``overrides`` into a plain dict (not yet validated)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _register_resolvers()
    recipe, rest = split_recipe(list(overrides or []))
    rest = [upsert(o) for o in rest]
    root = config_root()
    if recipe is not None and recipe not in available_recipes():
        raise ConfigError(f"unknown recipe {recipe!r}; available recipes: {available_recipes()}")
    if recipe is None:
        config_dir, name = root / "conf", "config"
    else:
        config_dir, name = recipe_files()[recipe].parent, recipe
        rest = [f"hydra.searchpath=[file://{root / 'conf'}]", *rest]
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
            cfg = compose(name, overrides=rest)
        data = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        detail = str(exc) or f"{type(exc.__cause__ or exc).__name__}: {exc.__cause__ or ''}"
        raise ConfigError(
            f"could not compose the configuration: {detail}\n"
            "Overrides use Hydra's grammar: key=value to change, +key=value to add, ~key to delete, group=option "
            "to pick a config group option (see `alia-nemo show --help`)."
        ) from None
    if recipe is not None:
        data["recipe"] = recipe
    return data


def load_config(overrides: list[str] | None = None) -> AliaConfig:
    """Compose, resolve and validate: the one way every command gets its configuration."""
    return validate_config(compose_dict(overrides))


def to_yaml(cfg: AliaConfig) -> str:
    """The resolved configuration as YAML (what ``alia-nemo show`` prints and runs save)."""
    return OmegaConf.to_yaml(OmegaConf.create(cfg.model_dump(mode="json")))
