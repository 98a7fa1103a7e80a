"""Compose a run configuration from ``conf/`` (Hydra groups) and ``recipes/`` with command-line overrides.

``recipe=NAME`` selects ``recipes/NAME.yaml`` as the primary config (a recipe starts from
``config`` and overrides groups and keys); ``recipe=PATH`` (ending in ``.yaml``/``.yml`` or containing a ``/``)
does the same with a recipe file anywhere, e.g. one ``alia-nemo recipes copy`` wrote; everything else is
Hydra's override grammar.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from alia_nemo.config.schema import AliaConfig, schema_knows, validate_config
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


RECIPE_SUFFIXES = (".yaml", ".yml")
# The name a recipe file outside recipes/ is composed under (see compose_dict): one that no file in conf/ has.
RECIPE_FILE_CONFIG = "_alia_nemo_recipe_file"


def is_recipe_path(value: str) -> bool:
    """Whether ``recipe=value`` is a file path rather than a name: it ends in .yaml/.yml or contains a ``/``."""
    return value.endswith(RECIPE_SUFFIXES) or "/" in value or os.sep in value


def recipe_path(value: str, what: str = "recipe") -> Path:
    """The existing file ``recipe=value`` points at (relative paths from the working directory), else a ConfigError.

    ``what`` names the kind of file in the message (``recipe``, ``pipeline``).
    """
    path = Path(value).expanduser()
    if path.is_file():
        return path
    why = "is a directory, not a YAML file" if path.is_dir() else "does not exist"
    raise ConfigError(
        f"recipe={value}: the {what} file {path.absolute()} {why}; give the path of a {what} YAML file (`alia-nemo "
        f"recipes copy NAME {value}` writes one from a shipped {what}), or a name from `alia-nemo recipes`"
    )


def _recipe_file_node(path: Path, value: str) -> Any:
    """A recipe file's content for Hydra's ConfigStore, refused with the fix when it can not be a recipe.

    The file is composed from the ConfigStore, not from its own directory, so that its ``defaults:`` (``config``,
    ``override /model: ...``) resolve against conf/ wherever it lives, and nothing beside it (a ``config.yaml``, a
    ``model/`` folder) can shadow conf/.
    """
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    try:
        node = OmegaConf.load(path)
    except (YAMLError, OmegaConfBaseException, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe={value}: {path} is not valid YAML: {exc}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"recipe={value}: {path} holds a YAML {type(node).__name__}, not a mapping of keys")
    if "stages" in node and "defaults" not in node:
        raise ConfigError(f"recipe={value}: {path} is a pipeline; run it with `alia-nemo pipeline recipe={value}`")
    if "defaults" not in node:
        raise ConfigError(
            f"recipe={value}: {path} has no defaults: list, so it would not start from conf/config.yaml; begin it "
            "with `defaults: [config, _self_]` (or start from a copy: `alia-nemo recipes copy NAME PATH`)"
        )
    return node


def run_name(recipe: str | None, stage: str, arch: str) -> str:
    """The name in a default run directory: the recipe's (it already names stage, model and layout), else stage-arch.

    A recipe given as a file path (``recipe=my/recipe.yaml``) contributes its file name without the suffix, so the run
    directory stays one plain directory under ``outputs/``.
    """
    if not recipe:
        return f"{stage}-{arch}"
    name = Path(recipe).name
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    return name


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)
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


def _deletions(overrides: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    """Take ``~a.b`` (and ``~a.b=v``) out of the overrides: ``(key, expected value or None)`` pairs, and the rest.

    Hydra deletes only a key some YAML file holds with a value other than null, so ``~run.eval_every`` failed for
    keys left to the schema's defaults, which is what deleting a key is for. These are applied by
    :func:`_apply_deletions` instead; group deletions (``~stage``), ``hydra.*`` and ``@package`` ones go to Hydra.
    A deletion followed by a setting of the same key is dropped: overrides apply in order, so the setting wins.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    deletions: list[tuple[int, str, Any]] = []
    rest: list[str] = []
    for i, o in enumerate(overrides):
        key = o.partition("=")[0]
        if key.startswith("~") and "." in key and not key.startswith("~hydra.") and "/" not in key and "@" not in key:
            try:
                parsed = parser.parse_override(o)
            except HydraException as exc:
                raise ConfigError(f"{o}: not an override Hydra can read ({exc}); delete a key with ~a.b") from None
            deletions.append((i, parsed.key_or_group, parsed.value()))
        else:
            rest.append(o)
    later_set = {(i, o.partition("=")[0].lstrip("+")) for i, o in enumerate(overrides) if not o.startswith("~")}
    kept = [(key, value) for i, key, value in deletions if not any(j > i and k == key for j, k in later_set)]
    return kept, rest


def _apply_deletions(cfg: Any, deletions: list[tuple[str, Any]]) -> None:
    """Delete each key from the composed (not yet resolved) config, so interpolations see the schema default.

    A key no YAML file holds needs nothing: the schema's default applies, as the README says. A key the schema does
    not know is an error naming it, not a silent no-op.
    """
    for key, expected in deletions:
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, default=None)
        if isinstance(parent, DictConfig) and leaf in parent:
            current = OmegaConf.select(cfg, key)
            if expected is not None and current != expected:
                raise ConfigError(f"~{key}={expected}: {key} is {current!r}, not {expected!r}; nothing was deleted")
            with open_dict(parent):
                del parent[leaf]
            continue
        if not schema_knows(key, OmegaConf.to_container(cfg, resolve=False)):  # type: ignore[arg-type]
            raise ConfigError(
                f"~{key}: no such key; the configuration has no {key} and the schema knows none (check its spelling "
                "with `alia-nemo show`)"
            )


def compose_dict(overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose and resolve the configuration for ``overrides`` into a plain dict (not yet validated)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _register_resolvers()
    recipe, rest = split_recipe(list(overrides or []))
    deletions, rest = _deletions(rest)
    rest = [upsert(o) for o in rest]
    root = config_root()
    if recipe is not None and is_recipe_path(recipe):
        from hydra.core.config_store import ConfigStore

        path = recipe_path(recipe)
        ConfigStore.instance().store(name=RECIPE_FILE_CONFIG, node=_recipe_file_node(path, recipe))
        config_dir, name = root / "conf", RECIPE_FILE_CONFIG
    elif recipe is not None and recipe not in available_recipes():
        hint = ""
        if (root / "conf" / "pipeline" / f"{recipe}.yaml").is_file():
            hint = f" ({recipe} is a pipeline: `alia-nemo pipeline recipe={recipe}`)"
        raise ConfigError(f"unknown recipe {recipe!r}{hint}; available recipes: {available_recipes()}")
    elif recipe is None:
        config_dir, name = root / "conf", "config"
    else:
        config_dir, name = recipe_files()[recipe].parent, recipe
        rest = [f"hydra.searchpath=[file://{root / 'conf'}]", *rest]
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
            cfg = compose(name, overrides=rest)
        _apply_deletions(cfg, deletions)
        if recipe is not None:  # before resolving: the default run.output_dir names the recipe (run_name)
            with open_dict(cfg):
                cfg.recipe = recipe
        data = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        detail = str(exc) or f"{type(exc.__cause__ or exc).__name__}: {exc.__cause__ or ''}"
        if name == RECIPE_FILE_CONFIG:  # Hydra names the stored config; the user knows the file
            detail = detail.replace(RECIPE_FILE_CONFIG, recipe or "")
        raise ConfigError(
            f"could not compose the configuration: {detail}\n"
            "Overrides use Hydra's grammar: key=value to change, +key=value to add, ~key to delete, group=option "
            "to pick a config group option (see `alia-nemo show --help`)."
        ) from None
    return data


def load_config(overrides: list[str] | None = None) -> AliaConfig:
    """Compose, resolve and validate: the one way every command gets its configuration."""
    return validate_config(compose_dict(overrides))


def to_yaml(cfg: AliaConfig) -> str:
    """The resolved configuration as YAML (what ``alia-nemo show`` prints and runs save)."""
    return OmegaConf.to_yaml(OmegaConf.create(cfg.model_dump(mode="json")))
