"""Minimal configs (issue 15), like NeMo-RL's ``minimize-check``: no file repeats a value it would get anyway.

A key in a config group option (``conf/{model,stage,data,engine,cluster}/*.yaml``) or a recipe
(``recipes/*.yaml``) is redundant when deleting it would change nothing: the value it would then take,
what the file's own Hydra defaults list composes to (a stage's parent stage; a recipe's ``config`` and the
group options it selects) or else the schema default, equals the value it states. Every finding names the
file, the key, the value and where that value comes from anyway.

Schema defaults and the command line: Hydra lets ``key=value`` change only a key the composed YAML holds
(otherwise "Could not override ... use +key=value"). While ``compose`` hands overrides to Hydra unchanged,
a schema default that no YAML the file inherits holds is what makes ``stage.max_steps=10`` or
``model.pretrained=DIR`` work, so deleting it would change something and it is not reported. Once
``compose`` accepts plain overrides of keys the schema knows (:func:`compose_takes_overrides_of_absent_keys`
probes it), the schema default alone counts and this test lists every such key to delete.

ALLOWED lists the few repetitions kept on purpose, each with its reason; CARD_NUMBERS says where each of the
model card's numbers is written, once per stage family.
"""

from __future__ import annotations

import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml
from omegaconf import OmegaConf
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from alia_nemo.config.compose import compose_dict, config_root
from alia_nemo.config.schema import AliaConfig
from alia_nemo.errors import ConfigError

ROOT = config_root()
# The groups AliaConfig validates (conf/eval and conf/pipeline have schemas of their own).
GROUPS = ("model", "stage", "data", "engine", "cluster")

_KIND = (
    "tests/config/test_config.py::test_every_group_option_composes_and_validates reads `kind` from the raw file "
    "to give a CPT stage a text corpus; drop this entry once it reads the composed stage"
)
# Keys kept although they repeat what the file would get anyway: (file, key) -> why. Keep it small.
ALLOWED: dict[tuple[str, str], str] = {
    ("conf/stage/cpt_160k.yaml", "kind"): _KIND,
    ("conf/stage/cpt_32k_tiny.yaml", "kind"): _KIND,
    ("conf/stage/cpt_160k_tiny.yaml", "kind"): _KIND,
    ("conf/stage/dpo_tiny.yaml", "kind"): _KIND,
    ("conf/stage/sft.yaml", "epochs"): "the card's '1 epoch', written with the card's other SFT numbers",
}

# The model card's numbers, each written in one file of its stage family: (stage kind, file, dotted key, value).
# 32,768 is two card settings (the CPT stage's windows, the SFT stage's longest conversation), one per family.
CARD_NUMBERS: dict[str, tuple[str, str, str, Any]] = {
    "CPT LR 9e-7": ("cpt", "conf/stage/cpt_32k.yaml", "stage.lr", 9.0e-7),
    "CPT constant LR": ("cpt", "conf/stage/cpt_32k.yaml", "stage.lr_scheduler", "constant"),
    "CPT ~4M tokens per update": ("cpt", "conf/stage/cpt_32k.yaml", "stage.tokens_per_update", 4194304),
    "CPT 2B tokens at 32k": ("cpt", "conf/stage/cpt_32k.yaml", "stage.token_budget", 2_000_000_000),
    "CPT 36.8B tokens at 160k": ("cpt", "conf/stage/cpt_160k.yaml", "stage.token_budget", 36_800_000_000),
    "CPT 32k windows": ("cpt", "conf/stage/cpt_32k.yaml", "stage.seq_length", 32768),
    "CPT 160k windows": ("cpt", "conf/stage/cpt_160k.yaml", "stage.seq_length", 163840),
    "SFT LR 1e-5": ("sft", "conf/stage/sft.yaml", "stage.lr", 1.0e-5),
    "SFT cosine": ("sft", "conf/stage/sft.yaml", "stage.lr_scheduler", "cosine"),
    "SFT 5 warmup steps": ("sft", "conf/stage/sft.yaml", "stage.warmup_steps", 5),
    "SFT global batch 512": ("sft", "conf/stage/sft.yaml", "stage.global_batch_size", 512),
    "SFT 1 epoch": ("sft", "conf/stage/sft.yaml", "stage.epochs", 1),
    "SFT conversations up to 32k tokens": ("sft", "conf/stage/sft.yaml", "stage.seq_length", 32768),
}

_ABSENT = object()


@dataclass(frozen=True)
class Redundant:
    file: str  # relative to the config root
    key: str  # dotted, as written in the file (a group option's keys have no group prefix)
    value: Any
    source: str  # where the same value comes from anyway
    schema_default: bool  # only the schema default gives it (no YAML the file inherits holds the key)

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.value!r} is what {self.source} gives anyway"


@dataclass
class _Document:
    file: str
    group: str | None  # None for a recipe
    own: dict[str, Any]  # the file's keys, without its defaults list
    inherited: dict[str, Any]  # what its defaults list composes to (the group's section for an option)
    choices: dict[str, str]  # recipe: group -> option its composition selected
    parents: list[str]  # group option: the options its defaults list builds on

    @property
    def composed(self) -> dict[str, Any]:
        return OmegaConf.to_container(OmegaConf.merge(self.inherited, self.own), resolve=False)


def _body(path: Path) -> dict[str, Any]:
    body = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return body if isinstance(body, dict) else {}


def _compose(primary_dir: Path, name: str, conf: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Compose ``name`` from ``primary_dir`` with ``conf`` on the search path, unresolved, and the choices."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(primary_dir)):
        cfg = compose(name, overrides=[f"hydra.searchpath=[file://{conf}]"], return_hydra_config=True)
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items() if "/" not in k}
    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra", None)
    return data, choices


def _option(root: Path, group: str, path: Path) -> _Document:
    own = _body(path)
    defaults = own.pop("defaults", None) or []
    inherited: dict[str, Any] = {}
    if defaults:
        # The file's defaults list without its body, composed as an option of its group.
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / group).mkdir()
            (Path(tmp) / group / "__minimal_check__.yaml").write_text(yaml.safe_dump({"defaults": defaults}))
            probe = {"defaults": [{group: "__minimal_check__"}, "_self_"]}
            (Path(tmp) / "__probe__.yaml").write_text(yaml.safe_dump(probe))
            inherited = _compose(Path(tmp), "__probe__", root / "conf")[0].get(group, {})
    parents = [d for d in defaults if isinstance(d, str) and d != "_self_"]
    return _Document(str(path.relative_to(root)), group, own, inherited, {}, parents)


def _recipe(root: Path, path: Path) -> _Document:
    own = _body(path)
    defaults = own.pop("defaults", None) or []
    # The recipe's defaults list without its body: `config` and the group options it selects.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / path.name).write_text(yaml.safe_dump({"defaults": defaults}))
        inherited, choices = _compose(Path(tmp), path.stem, root / "conf")
    return _Document(str(path.relative_to(root)), None, own, inherited, choices, [])


def _documents(root: Path, only: set[str] | None = None) -> Iterator[_Document]:
    """Every group option and recipe under ``root`` (or the files ``only`` names), with what it inherits."""

    def keep(path: Path) -> bool:
        return only is None or str(path.relative_to(root)) in only

    for group in GROUPS:
        yield from (_option(root, group, p) for p in sorted((root / "conf" / group).glob("*.yaml")) if keep(p))
    yield from (_recipe(root, p) for p in sorted((root / "recipes").rglob("*.yaml")) if keep(p))


def _pick_model(info: FieldInfo, composed: Any) -> tuple[type[BaseModel] | None, str | None]:
    """The model a field's mapping validates against (a discriminated union: by its tag) and that tag's key."""
    members = [a for a in (get_args(info.annotation) or (info.annotation,)) if _is_model(a)]
    if info.discriminator:
        tag = composed.get(info.discriminator) if isinstance(composed, dict) else None
        chosen = [m for m in members if tag in get_args(m.model_fields[info.discriminator].annotation)]
        return (chosen[0] if chosen else None), info.discriminator
    return (members[0] if len(members) == 1 else None), None


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _leaves(
    model: type[BaseModel], own: dict, inherited: Any, composed: Any, defaults: Any, tag: str | None, prefix: str = ""
) -> Iterator[tuple[str, Any, Any, str | None]]:
    """(dotted key, stated value, its value were it deleted or _ABSENT, the schema field when that gives it)."""
    for key, value in own.items():
        info = model.model_fields.get(key)
        if info is None or key == tag:  # unknown keys fail validation elsewhere; a union's tag picks the model
            continue
        path = f"{prefix}{key}"
        inh = inherited.get(key, _ABSENT) if isinstance(inherited, dict) else _ABSENT
        comp = composed.get(key) if isinstance(composed, dict) else None
        if defaults is not None:
            default = getattr(defaults, key)
        else:
            default = _ABSENT if info.is_required() else info.get_default(call_default_factory=True)
        entry_model = get_args(info.annotation)[1] if get_origin(info.annotation) is dict else None
        sub, sub_tag = _pick_model(info, comp)
        if isinstance(value, dict) and _is_model(entry_model):  # named entries (datasets, sources)
            for name, entry in value.items():
                if isinstance(entry, dict):
                    yield from _leaves(
                        entry_model,
                        entry,
                        inh.get(name, _ABSENT) if isinstance(inh, dict) else _ABSENT,
                        comp.get(name) if isinstance(comp, dict) else None,
                        None,
                        None,
                        f"{path}.{name}.",
                    )
        elif isinstance(value, dict) and sub is not None:
            sub_defaults = default if isinstance(default, BaseModel) else None
            yield from _leaves(sub, value, inh, comp, sub_defaults, sub_tag, f"{path}.")
        elif inh is not _ABSENT:
            yield path, value, inh, None
        else:
            yield path, value, default, f"{model.__name__}.{key}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _states(body: dict[str, Any], keys: list[str]) -> bool:
    for k in keys:
        if not isinstance(body, dict) or k not in body:
            return False
        body = body[k]
    return True


def _origin(root: Path, group: str, option: str, keys: list[str]) -> str | None:
    """The file that states ``keys`` for a group option: the option itself, else the nearest it builds on."""
    path = root / "conf" / group / f"{option}.yaml"
    body = _body(path)
    if _states(body, keys):
        return str(path.relative_to(root))
    for parent in reversed([d for d in body.get("defaults", []) if isinstance(d, str) and d != "_self_"]):
        if found := _origin(root, group, parent, keys):
            return found
    return None


def _source(root: Path, doc: _Document, key: str, schema_field: str | None) -> str:
    keys = key.split(".")
    if schema_field:
        return f"the schema default ({schema_field})"
    if doc.group is not None:
        found = [f for p in reversed(doc.parents) if (f := _origin(root, doc.group, p, keys))]
        return found[0] if found else f"its defaults list {doc.parents}"
    if keys[0] in doc.choices:
        option = doc.choices[keys[0]]
        return _origin(root, keys[0], option, keys[1:]) or f"{keys[0]}={option} (its defaults list)"
    return "conf/config.yaml" if _states(_body(root / "conf" / "config.yaml"), keys) else "its defaults list"


def find_redundant_keys(
    root: Path, only: set[str] | None = None, docs: list[_Document] | None = None
) -> list[Redundant]:
    """Every key of every group option and recipe under ``root`` (or ``only`` these files) that repeats what it
    would get anyway. Findings whose value only the schema default gives have ``schema_default=True`` (see the
    module docstring for when those count).
    """
    found = []
    for doc in docs if docs is not None else _documents(root, only):
        model, tag = AliaConfig, None
        if doc.group is not None:
            model, tag = _pick_model(AliaConfig.model_fields[doc.group], doc.composed)
            if model is None:
                continue  # an unknown tag fails validation (test_config.py), not this check
        leaves = _leaves(model, doc.own, doc.inherited, doc.composed, None, tag)
        for key, value, would_be, schema_field in leaves:
            if would_be is not _ABSENT and _same(value, would_be):
                source = _source(root, doc, key, schema_field)
                found.append(Redundant(doc.file, key, value, source, schema_field is not None))
    return found


def compose_takes_overrides_of_absent_keys() -> bool:
    """Whether ``stage.token_budget=1`` composes although no YAML of the default job holds the key."""
    assert "token_budget" not in compose_dict([])["stage"], "the probe needs a schema key no default YAML holds"
    try:
        compose_dict(["stage.token_budget=1"])
    except ConfigError:
        return False
    return True


@pytest.fixture(scope="module")
def documents() -> list[_Document]:
    return list(_documents(ROOT))


@pytest.fixture(scope="module")
def findings(documents) -> list[Redundant]:
    return find_redundant_keys(ROOT, docs=documents)


def test_no_group_option_or_recipe_repeats_what_it_would_get_anyway(findings):
    schema_defaults_count = compose_takes_overrides_of_absent_keys()
    redundant = [
        r for r in findings if (r.file, r.key) not in ALLOWED and (schema_defaults_count or not r.schema_default)
    ]
    assert not redundant, "delete these keys (or allow-list one with a reason in ALLOWED):\n" + "\n".join(
        map(str, redundant)
    )


def test_every_allowed_key_is_still_a_repetition(findings):
    stale = set(ALLOWED) - {(r.file, r.key) for r in findings}
    assert not stale, f"ALLOWED entries that no longer repeat anything; remove them: {sorted(stale)}"


def _stated(doc: _Document) -> dict[str, Any]:
    """The dotted keys a document states, as in a recipe (a group option's keys get the group prefix)."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else out.__setitem__(f"{prefix}{k}", v)

    walk(doc.own, f"{doc.group}." if doc.group else "")
    return out


def test_each_card_number_is_written_once_in_its_stage_family(documents):
    # A stage's family is its kind; recipes belong to their stage's. Other groups hold no stage keys.
    docs = [d for d in documents if d.group in ("stage", None)]
    kinds = {d.file: (d.composed if d.group else d.composed.get("stage", {})).get("kind", "sft") for d in docs}
    stated = {d.file: _stated(d) for d in docs}
    for card, (kind, file, key, value) in CARD_NUMBERS.items():
        where = {f for f, keys in stated.items() if kinds[f] == kind and key in keys and _same(keys[key], value)}
        assert where == {file}, f"{card} ({key}={value!r}) should be written in {file} only, not {sorted(where)}"


# -- the check can fail: a small tree of its own with repetitions planted in it --------------------------------

_TREE = {
    "conf/config.yaml": """
        defaults: [{model: m}, {stage: base}, {data: d}, {engine: e}, {cluster: c}, _self_]
        run: {output_dir: out, save_every: 50}
    """,
    "conf/model/m.yaml": "arch: alia_tiny",
    "conf/stage/base.yaml": """
        name: base
        kind: cpt
        seq_length: 256
        lr: 9.0e-7
        lr_scheduler: constant
        micro_batch_size: 1
        tokens_per_update: 4096
        max_steps: null
        rope: {type: llama3, factor: 8.0, theta: null}
    """,
    "conf/stage/mid.yaml": "defaults: [base, _self_]\nname: mid\nseq_length: 512",
    # repeats seq_length (mid); lr, max_steps (null) and rope.factor (base, through mid); warmup_steps (schema)
    "conf/stage/child.yaml": """
        defaults: [mid, _self_]
        name: child
        seq_length: 512
        lr: 9.0e-7
        max_steps: null
        warmup_steps: 0
        token_budget: 5000
        tokens_per_update: null
        rope: {factor: 8.0, theta: 10000.0}
    """,
    "conf/data/d.yaml": """
        name: d
        format: text_corpus
        prepared_root: p
        sources: {long: {kind: local, files: [x.jsonl], weight: 1.0}}
    """,
    "conf/engine/e.yaml": "name: nemo_rl\nbackend: megatron\nlogger: {wandb: false}",
    "conf/cluster/c.yaml": "name: c\nnum_nodes: 16\ngpu_name: H100",
    "conf/cluster/tiny_gpu.yaml": "name: tiny_gpu\ngpus_per_node: 1\ngpu_name: none",
    "recipes/cpt32k-alia-tiny-16n4g-again.yaml": """
        defaults: [config, {override /stage: child}, _self_]
        cluster: {num_nodes: 16, gpu_name: A100}
        engine: {backend: megatron, tensor_parallel: 4, val_batches: 8, logger: {wandb: false, wandb_project: a}}
        stage: {lr: 9.0e-7, token_budget: 1000}
        data: {sources: {long: {weight: 1.0, language: ca}}}
        run: {output_dir: again, save_every: 50}
    """,
}


def test_the_check_reports_planted_repetitions_with_file_key_and_source(tmp_path):
    for name, text in _TREE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    stage, recipe, cluster = (
        "conf/stage/child.yaml",
        "recipes/cpt32k-alia-tiny-16n4g-again.yaml",
        "conf/cluster/tiny_gpu.yaml",
    )
    found = {(r.file, r.key): r for r in find_redundant_keys(tmp_path, only={stage, recipe, cluster})}
    base, schema = "conf/stage/base.yaml", "the schema default"
    expected = {
        (stage, "seq_length"): (512, "conf/stage/mid.yaml", False),
        (stage, "lr"): (9e-7, base, False),
        (stage, "max_steps"): (None, base, False),
        (stage, "warmup_steps"): (0, f"{schema} (StageConfig.warmup_steps)", True),
        (stage, "rope.factor"): (8.0, base, False),
        (cluster, "gpu_name"): ("none", f"{schema} (ClusterConfig.gpu_name)", True),
        (recipe, "cluster.num_nodes"): (16, "conf/cluster/c.yaml", False),
        (recipe, "engine.backend"): ("megatron", "conf/engine/e.yaml", False),
        (recipe, "engine.val_batches"): (8, f"{schema} (NemoRLEngineConfig.val_batches)", True),
        (recipe, "engine.logger.wandb"): (False, "conf/engine/e.yaml", False),
        (recipe, "stage.lr"): (9e-7, stage, False),  # the nearest file that states it
        (recipe, "data.sources.long.weight"): (1.0, "conf/data/d.yaml", False),
        (recipe, "run.save_every"): (50, "conf/config.yaml", False),
    }
    for (file, key), (value, source, schema_default) in expected.items():
        r = found.get((file, key))
        assert r is not None, f"{file}: {key} not reported"
        assert (r.value, r.source, r.schema_default) == (value, source, schema_default), str(r)
        assert str(r) == f"{file}: {key}: {value!r} is what {source} gives anyway"
    # Nothing else is reported: keys that differ from what the file would get (token_budget, tokens_per_update
    # null over 4096, rope.theta over null, engine.tensor_parallel, a source's language, ...) are kept.
    assert set(found) == set(expected), sorted(set(found) ^ set(expected))
