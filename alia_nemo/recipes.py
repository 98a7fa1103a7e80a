"""The recipe catalogue: ``alia-nemo recipes`` (list), ``recipes copy`` (start your own) and ``validate``.

Recipes (``recipes/*.yaml``) and pipelines (``conf/pipeline/*.yaml``) describe themselves in their header comment:
the first line is ``# NAME: purpose`` and a ``# Tested:`` line says what they were run on. The catalogue reads the
rest (stage, model, nodes x GPUs, engine) from the composed configuration, so the listing can not drift from what a
run would use. ``validate`` is every check a run makes before it touches data or disk: compose, validate, resolve and,
for NeMo-RL, compile in memory (no data prepared, no starting model written).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alia_nemo.errors import ConfigError

if TYPE_CHECKING:
    from alia_nemo.config.schema import AliaConfig
    from alia_nemo.launch.pipeline import PipelineConfig

# `# NAME: purpose`: the first line of every recipe and pipeline file.
FIRST_LINE = re.compile(r"^#\s*(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*):\s*(?P<purpose>\S.*)$")
TESTED_LINE = re.compile(r"^#\s*Tested:\s*(?P<text>\S.*)$")
# A continuation of a labelled header line is indented past the `#` by two spaces or more.
CONTINUATION = re.compile(r"^#\s{2,}(?P<text>\S.*)$")


@dataclass(frozen=True)
class Header:
    """What a recipe or pipeline file says about itself in its leading comment block."""

    name: str  # as written on the first line (should equal the file's stem)
    purpose: str  # the first line after `NAME:`, without a trailing `:`/`,`/`;`
    tested: str  # the `Tested:` text with its continuation lines joined ("" when missing)


def parse_header(text: str) -> Header:
    """The header of a recipe or pipeline file's text; name and purpose are empty when the first line is not
    ``# NAME: purpose``."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.rstrip())
    first = FIRST_LINE.match(lines[0]) if lines else None
    tested: list[str] = []
    for i, line in enumerate(lines):
        m = TESTED_LINE.match(line)
        if m:
            tested.append(m["text"])
            for more in lines[i + 1 :]:
                cont = CONTINUATION.match(more)
                if not cont or TESTED_LINE.match(more):
                    break
                tested.append(cont["text"])
            break
    return Header(
        name=first["name"] if first else "",
        purpose=first["purpose"].rstrip(" :,;") if first else "",
        tested=" ".join(tested),
    )


def header_problems(path: Path) -> list[str]:
    """What the header of the file at ``path`` lacks (empty when it describes itself), for the tests and the listing."""
    header = parse_header(path.read_text(encoding="utf-8"))
    problems = []
    if header.name != path.stem:
        problems.append(f"{path}: the first line must be `# {path.stem}: <purpose>`")
    elif not header.purpose:
        problems.append(f"{path}: the first line has no purpose after `{path.stem}:`")
    if not header.tested:
        problems.append(f"{path}: no `# Tested:` line saying what it was run on")
    return problems


# --------------------------------------------------------------------------------------------- the catalogue


def _engine(cfg: AliaConfig) -> str:
    eng = cfg.engine
    if eng.name == "local":
        return f"local x{eng.num_workers}"  # Ray Train workers
    return f"{eng.name} {getattr(eng, 'backend', '')}".strip()


def _placement(cfg: AliaConfig) -> dict[str, Any]:
    """Stage, model, nodes x GPUs and engine of a composed config: the catalogue's columns."""
    cl = cfg.cluster
    return {
        "stage": cfg.stage.name,
        "stage_kind": cfg.stage.kind,
        "model": cfg.model.arch,
        "nodes": cl.num_nodes,
        "gpus_per_node": cl.gpus_per_node,
        "nodes_x_gpus": f"{cl.num_nodes} x {cl.gpus_per_node}",
        "engine": _engine(cfg),
    }


def _composed_placement(overrides: list[str], cache: dict[tuple[str, ...], dict[str, Any]]) -> dict[str, Any]:
    """:func:`_placement` of the config ``overrides`` compose; ``cache`` spares composing one twice (a pipeline's
    stages are mostly recipes the listing has composed already)."""
    from alia_nemo.config.compose import load_config

    key = tuple(overrides)
    if key not in cache:
        cache[key] = _placement(load_config(overrides))
    return dict(cache[key])


def recipe_entries(cache: dict[tuple[str, ...], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One entry per recipe file: its header and what its composed config runs."""
    from alia_nemo.config.compose import recipe_files

    cache = {} if cache is None else cache
    out = []
    for name, path in sorted(recipe_files().items()):
        header = parse_header(path.read_text(encoding="utf-8"))
        entry: dict[str, Any] = {"kind": "recipe", "name": name, "path": str(path), "purpose": header.purpose}
        entry.update(_composed_placement([f"recipe={name}"], cache))
        entry["tested"] = header.tested
        out.append(entry)
    return out


def pipeline_stage_overrides(stage: Any) -> list[str]:
    """The overrides that compose one stage of a pipeline file (its recipe, then its own overrides), without the
    run directory and starting model a run adds."""
    return ([f"recipe={stage.recipe}"] if stage.recipe else []) + list(stage.overrides)


def _joined(values: list[str]) -> str:
    return ", ".join(dict.fromkeys(values))  # unique, in stage order


def pipeline_entry(
    name: str, path: Path, spec: PipelineConfig, cache: dict[tuple[str, ...], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A pipeline's header and, per stage, what the stage's composed config runs."""
    cache = {} if cache is None else cache
    header = parse_header(path.read_text(encoding="utf-8"))
    stages = []
    for step, st in spec.stages.items():
        placement = _composed_placement(pipeline_stage_overrides(st), cache)
        stages.append({"step": step, "recipe": st.recipe, "overrides": list(st.overrides), **placement})
    steps = [*spec.stages, "export", "eval"]
    return {
        "kind": "pipeline",
        "name": name,
        "path": str(path),
        "purpose": header.purpose,
        "stage": " -> ".join(steps),
        "model": _joined([s["model"] for s in stages]),
        "nodes_x_gpus": _joined([s["nodes_x_gpus"] for s in stages]),
        "engine": _joined([s["engine"] for s in stages]),
        "tested": header.tested,
        "steps": steps,
        "stages": stages,
    }


def pipeline_entries(cache: dict[tuple[str, ...], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One entry per pipeline file in conf/pipeline/."""
    from alia_nemo.launch.pipeline import load_pipeline, pipeline_files

    files = sorted(pipeline_files().items())
    return [pipeline_entry(name, path, load_pipeline(name), cache) for name, path in files]


def catalogue() -> dict[str, list[dict[str, Any]]]:
    """Every recipe and pipeline, as ``alia-nemo recipes --json`` prints them."""
    cache: dict[tuple[str, ...], dict[str, Any]] = {}
    return {"recipes": recipe_entries(cache), "pipelines": pipeline_entries(cache)}


def catalogue_text(cat: dict[str, list[dict[str, Any]]], width: int = 120) -> str:
    """Two tables, recipes then pipelines: one aligned line per entry (name, stage or steps, model, nodes x GPUs,
    engine), then its purpose and what it was tested on, wrapped under it.

    Plain text rather than a grid: the names are long by convention and the tested-on text is a sentence or two, so
    grid columns for them would wrap every row into a narrow tower.
    """
    import textwrap

    blocks = []
    for kind, col, how in (
        ("recipes", "stage", "recipe=NAME"),
        ("pipelines", "steps", "alia-nemo pipeline recipe=NAME"),
    ):
        entries = cat[kind]
        head = (f"{kind.upper()} ({how})", col.upper(), "MODEL", "NODES x GPUS", "ENGINE")
        rows = [(e["name"], e["stage"], e["model"], e["nodes_x_gpus"], e["engine"]) for e in entries]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

        def line(cells: tuple[str, ...], widths: list[int] = widths) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        out = [line(head)]
        for e, row in zip(entries, rows):
            out.append(line(row))
            out += textwrap.wrap(e["purpose"], width, initial_indent="    ", subsequent_indent="    ")
            out += textwrap.wrap(e["tested"] or "-", width, initial_indent="    tested on: ",
                                 subsequent_indent=" " * 15, break_on_hyphens=False)  # fmt: skip
        blocks.append("\n".join(out))
    return "\n\n".join(blocks) + "\n\n`alia-nemo recipes copy NAME PATH` copies one to edit; then recipe=PATH.\n"


# --------------------------------------------------------------------------------------------- copy


def source_file(name: str) -> tuple[str, Path]:
    """(``recipe`` or ``pipeline``, its file) for a shipped recipe or pipeline name, else a ConfigError listing both."""
    from alia_nemo.config.compose import recipe_files
    from alia_nemo.launch.pipeline import pipeline_files

    recipes, pipelines = recipe_files(), pipeline_files()
    if name in recipes:
        return "recipe", recipes[name]
    if name in pipelines:
        return "pipeline", pipelines[name]
    raise ConfigError(
        f"unknown recipe or pipeline {name!r}; recipes: {sorted(recipes)}; pipelines: {sorted(pipelines)} "
        "(`alia-nemo recipes` describes them)"
    )


def copy_recipe(name: str, dest: str | Path, force: bool = False) -> tuple[str, Path]:
    """Copy the recipe or pipeline ``name`` to ``dest`` for editing; returns (its kind, the file written).

    ``dest`` may be a directory (the file keeps its name) or a file path; without a suffix ``.yaml`` is added,
    since ``recipe=PATH`` and Hydra read YAML files. An existing file is replaced only with ``force``; parent
    directories are created. The copy is the file as shipped, byte for byte: ``recipe=PATH`` composes it as
    ``recipe=NAME`` does.
    """
    from alia_nemo.config.compose import RECIPE_SUFFIXES

    kind, source = source_file(name)
    target = Path(dest).expanduser()
    if target.is_dir():
        target = target / source.name
    elif not target.suffix:
        target = target.with_name(target.name + ".yaml")
    elif target.suffix not in RECIPE_SUFFIXES:
        raise ConfigError(
            f"{dest}: a {kind} copy must end in .yaml or .yml (recipe=PATH reads YAML), e.g. "
            f"{target.with_suffix('.yaml')}"
        )
    if target.is_dir():
        raise ConfigError(f"{target} is a directory; give a file path")
    if target.exists() and target.resolve() == source.resolve():
        raise ConfigError(f"{target} is the shipped {kind} itself; copy it somewhere else to edit it")
    if target.exists() and not force:
        raise ConfigError(f"{target} already exists; not overwritten (--force replaces it; or choose another path)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)  # never a half-written recipe at the path the user will run
    return kind, target


# --------------------------------------------------------------------------------------------- validate


def _leaf_keys(node: Any) -> int:
    """Keys with a value (not a section) in a nested dict: how big the compiled NeMo-RL config is."""
    if isinstance(node, dict) and node:
        return sum(_leaf_keys(v) for v in node.values())
    return 1


def _environment_notes(cfg: AliaConfig) -> list[str]:
    """What a run would still need on this machine (not configuration errors): local model paths, cached hub ids."""
    from alia_nemo.model.hub_cache import local_path_problem, missing_from_cache

    notes = [p for p in (local_path_problem("model.pretrained", cfg.model.pretrained, "model"),
                         local_path_problem("model.tokenizer", cfg.model.tokenizer, "tokenizer")) if p]  # fmt: skip
    if not notes:  # missing_from_cache refuses a bad local path itself: only ask it about hub ids
        missing = missing_from_cache(cfg)
        if missing:
            notes.append(
                f"{', '.join(missing)} not in the Hugging Face cache here; `alia-nemo fetch` with the same overrides "
                "(on a node with network) before prepare or train"
            )
    return notes


def validate(overrides: list[str], check_memory: bool = True) -> dict[str, Any]:
    """Compose, validate and resolve ``overrides``; NeMo-RL stages are also compiled, in memory. Writes nothing.

    Raises the same error a run would (a :class:`ConfigError` naming the key) for any configuration problem.
    Compiling uses :func:`alia_nemo.engines.nemo_rl_prepare.compile_stage` with ``prepare=False`` (steps from the
    requested counts; no data or tokenizer read) and ``materialise=False`` (no starting model or link written).
    """
    from alia_nemo.config.compose import load_config
    from alia_nemo.config.resolve import resolve

    cfg = load_config(overrides)
    stage = resolve(cfg)
    if stage.train_rows is not None:  # before the data is read only requested counts can be checked
        stage.check_trainable()
    compiled = None
    if cfg.engine.name == "nemo_rl":
        from alia_nemo.engines.nemo_rl_prepare import compile_stage

        result = compile_stage(cfg, prepare=False, materialise=False, progress=False, check_memory=check_memory)
        compiled = {
            "kind": "DPO" if "dpo" in result.config else "SFT",
            "keys": _leaf_keys(result.config),
            "layout": result.derived["layout"],
            "gpus": result.derived["gpus"],
            "memory_gib": result.derived["memory_gib"],
        }
    return {
        "ok": True,
        "recipe": cfg.recipe,
        "overrides": [o for o in overrides if not o.startswith("recipe=")],
        "stage": cfg.stage.name,
        "stage_kind": cfg.stage.kind,
        "lr": cfg.stage.lr,
        "lr_scheduler": cfg.stage.lr_scheduler,
        "model": cfg.model.arch,
        "data": cfg.data.name,
        "engine": _engine(cfg),
        "cluster": cfg.cluster.name,
        "nodes": cfg.cluster.num_nodes,
        "gpus_per_node": cfg.cluster.gpus_per_node,
        "output_dir": cfg.run.output_dir,
        "resolved": stage.as_dict(),
        "compiled": compiled,
        "notes": _environment_notes(cfg),
    }


def print_validation(s: dict[str, Any]) -> None:
    """The short OK summary of :func:`validate`."""
    r = s["resolved"]
    lay = r["layout"]
    what = f"recipe={s['recipe']}" if s["recipe"] else "conf/config.yaml"
    if s["overrides"]:
        what += " " + " ".join(s["overrides"])
    unit = r["unit"]
    if r["train_rows"] is None:  # plain JSONL: nothing to count before train reads it
        rows = f"training {unit} counted when the data is read"
    else:
        rows = f"{r['train_rows']:,} training {unit}"
    steps = "steps unknown until the data is read" if r["steps"] is None else f"{r['steps']:,} steps"
    nodes, gpus = s["nodes"], s["gpus_per_node"]
    where = "CPU workers" if not gpus else f"{nodes} node{'s' * (nodes != 1)} x {gpus} GPU{'s' * (gpus != 1)}"
    lines = [
        f"[alia-nemo] OK: {what} (nothing written)",
        f"  stage:    {s['stage']} ({s['stage_kind']}): LR {s['lr']:g} {s['lr_scheduler']}, sequences up to "
        f"{r['seq_length']:,} tokens",
        f"  model:    {s['model']}, starting from {r['start_model']}",
        f"  data:     {s['data']}: {rows}, {r['val_rows']:,} validation ({r['counted_from']})",
        f"  engine:   {s['engine']} on cluster {s['cluster']} ({where}); run.output_dir {s['output_dir']}",
        f"  resolved: {steps}, global batch {r['global_batch_size']} {r['unit']} = micro-batch "
        f"{r['micro_batch_size']} x {r['grad_accumulation']} accumulated x DP {lay['dp']}, "
        f"{r['tokens_per_step']:,} tokens per step",
    ]
    c = s["compiled"]
    if c:
        mem = c["memory_gib"]
        memory = (f"memory {mem['total']:.1f} of {mem['budget']:.1f} GiB per GPU (planner estimate)" if mem
                  else "memory not estimated (DTensor backend)")  # fmt: skip
        if mem and mem.get("host_budget"):  # DPO on Megatron: the reference model waits in host memory
            memory += f", reference model {mem['reference_host_gib']:.1f} of {mem['host_budget']:.1f} GiB RAM per node"
        lay = c["layout"]
        lines.append(
            f"  compiled: {c['keys']} keys (NeMo-RL {c['kind']} config, strict mirror), layout TP{lay['tp']} "
            f"PP{lay['pp']} CP{lay['cp']} DP{lay['dp']} on {c['gpus']} GPUs, {memory}"
        )
    lines += [f"  note:     before a run: {n}" for n in s["notes"]]
    print("\n".join(lines))


def print_validation_json(s: dict[str, Any]) -> None:
    """:func:`validate`'s summary for machines."""
    print(json.dumps(s, indent=2, default=str))
