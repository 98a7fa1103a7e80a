"""What the NeMo-RL engine does around the translation: prepare the data, place the starting model, compile.

:func:`compile_stage` is the one path from a validated config to a NeMo-RL config, for ``alia-nemo compile`` and
``train engine=nemo_rl``: resolve the stage, prepare its data through the data source (or leave a placeholder),
resolve again from the prepared manifest, write or link the starting model, check the RoPE Megatron would
apply and the memory the planner estimates, then translate (:func:`alia_nemo.config.to_nemo_rl.translate`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from alia_nemo.config import to_nemo_rl
from alia_nemo.config.resolve import ResolvedStage, resolve
from alia_nemo.config.schema import AliaConfig
from alia_nemo.config.to_nemo_rl import (
    UNPREPARED,
    Compiled,
    StartModel,
    check_compilable,
    derived_numbers,
    megatron_rope_mismatch,
    memory_estimate,
    translate,
)
from alia_nemo.data.sources import source_for
from alia_nemo.errors import ConfigError
from alia_nemo.model.architectures import get_spec


def _start_rope(cfg: AliaConfig) -> dict[str, Any] | None:
    """The starting model's rope_parameters, where its config.json is on this machine (a directory or cached)."""
    name = cfg.model.pretrained
    if not name:
        return None
    path = Path(name).expanduser() / "config.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "config.json")
        except ValueError:  # not a hub id either: nothing on this machine to read
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    config = json.loads(path.read_text())
    return config.get("rope_parameters") or config.get("rope_scaling")


def check_megatron_rope(cfg: AliaConfig, hf_overrides: dict[str, Any]) -> None:
    """Refuse llama3 RoPE settings that Megatron-Core would train with different frequencies than the config says.

    The stage's own RoPE (``hf_overrides``) is checked, else the starting model's (a local directory or a
    cached hub config), so that the exported config.json describes the model Megatron trained.
    """
    rope = hf_overrides.get("rope_parameters")
    source = f"stage {cfg.stage.name}"
    if rope is None:
        rope, source = _start_rope(cfg), f"the starting model {cfg.model.pretrained}"
    wrong = megatron_rope_mismatch(rope)
    if wrong:
        raise ConfigError(
            f"{source} asks for llama3 RoPE with {', '.join(wrong)}. On engine.backend=megatron, Megatron-Bridge "
            "passes Megatron-Core only the factor and Megatron-Core fixes the rest, so the model would learn other "
            "rotary frequencies than its config.json (and vLLM) use. Set stage.rope.original_max_position_embeddings="
            "8192 stage.rope.low_freq_factor=1 stage.rope.high_freq_factor=4 (the cpt_32k / cpt_160k defaults), use "
            "stage.rope.type=theta, or engine.backend=dtensor"
        )


def materialise_start_model(cfg: AliaConfig, directory: Path) -> Path:
    """A seeded random init of ``model.arch`` with its tokenizer, saved where NeMo-RL can load it.

    Only for models without ``model.pretrained`` (the tiny smoke model); the directory is reused when
    it exists.
    """
    from alia_nemo.model.tokenizer import load_tokenizer

    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.run.seed)
    spec = get_spec(cfg.model.arch)
    model = LlamaForCausalLM(spec.hf_config(cfg.stage.seq_length, cfg.stage.rope.settings()))
    tmp = directory.with_name(directory.name + ".tmp")
    model.to(getattr(torch, cfg.model.dtype)).save_pretrained(str(tmp))
    load_tokenizer(cfg.model.tokenizer, cfg.model.allow_download).save_pretrained(str(tmp))
    tmp.replace(directory)
    return directory


def directory_fingerprint(directory: Path) -> str:
    """sha256 over every file's relative path, size and modification time (ns), and the bytes of small files.

    Cheap for an 80 GB model directory (weights are not read), and it changes whenever a stage rewrites them.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(directory)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        if stat.st_size < 1 << 20:  # configs, tokenizer, our export record
            digest.update(path.read_bytes())
    return digest.hexdigest()


def megatron_start_path(model_dir: Path, out: Path, materialise: bool) -> Path:
    """``out/start_model-<fingerprint>``: a link to a local starting model, named for its contents.

    NeMo-RL's Megatron backend converts a Hugging Face starting model once and reuses the conversion for as
    long as ``policy.model_name`` (and ``hf_config_overrides``) stay the same, whatever the files hold by then:
    a stage redone at the same final/ path would silently start the next one from the old weights. Through
    this link a changed directory is a new path (converted again) and an unchanged one the same path (a resumed
    run reuses its conversion instead of converting 40B parameters at every start, as force_reconvert would).
    """
    link = out / f"start_model-{directory_fingerprint(model_dir)[:16]}"
    if materialise and not link.is_symlink():
        out.mkdir(parents=True, exist_ok=True)
        link.symlink_to(model_dir.resolve(), target_is_directory=True)
    return link


def _is_local_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def start_model(cfg: AliaConfig, out: Path, materialise: bool, megatron: bool) -> StartModel:
    """Where NeMo-RL finds the stage's starting model; with ``materialise`` the random init or link is written."""
    if cfg.model.pretrained:
        if cfg.model.tokenizer.startswith("builtin:"):
            raise ConfigError(
                f"model.tokenizer={cfg.model.tokenizer} can not go with pretrained weights on NeMo-RL; "
                "set model.tokenizer to the checkpoint's tokenizer"
            )
        name = cfg.model.pretrained
        if megatron and _is_local_path(name):
            directory = Path(name).expanduser()
            if directory.is_dir():
                return StartModel(str(megatron_start_path(directory, out, materialise)), cfg.model.tokenizer)
            # Not written yet (a later stage's final/): nothing to name it by, so convert it at every start.
            return StartModel(name, cfg.model.tokenizer, reconvert=True)
        return StartModel(name, cfg.model.tokenizer)
    if cfg.model.arch != "alia_tiny":
        raise ConfigError(
            f"model.pretrained is null: {cfg.model.arch} would start from random weights; set model.pretrained "
            "to a checkpoint (hub id or directory, e.g. the previous stage's final/)"
        )
    start = out / "start_model"
    if materialise:
        materialise_start_model(cfg, start)
    return StartModel(str(start), str(start))


def prepared_stage(cfg: AliaConfig, prepare: bool, progress: bool) -> tuple[ResolvedStage, str]:
    """The resolved stage and its data path: prepared through the data source (or a placeholder without)."""
    stage = resolve(cfg)
    if not prepare:
        return stage, UNPREPARED
    from alia_nemo.data.cache import read_manifest
    from alia_nemo.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.allow_download)
    directory = source_for(cfg.data).prepare(cfg, stage, tokenizer, progress=progress)
    return resolve(cfg, read_manifest(directory)), str(directory)


def compile_stage(
    cfg: AliaConfig,
    *,
    prepare: bool = True,
    materialise: bool = True,
    progress: bool = True,
    check_memory: bool = True,
) -> Compiled:
    """Build and validate the NeMo-RL config for ``cfg`` (which must use ``engine=nemo_rl``): SFT's for SFT and CPT
    stages, DPO's for a DPO stage (whose start model is also its frozen reference; nothing more to place).

    ``prepare`` builds (or finds in the cache) the data so the dataset path and step count are exact; without it
    the step count comes from the counts the config asks for and the dataset path is a placeholder the dataset
    class refuses with instructions. ``materialise`` writes the tiny model's random init (models without
    ``model.pretrained``). ``check_memory`` refuses a Megatron layout the planner estimates to exceed the
    cluster's GPU memory (DPO: also the reference model's host copies beyond their share of a node's RAM).
    """
    eng = check_compilable(cfg)
    stage, data_path = prepared_stage(cfg, prepare, progress)
    megatron = eng.backend == "megatron"
    if megatron:
        check_megatron_rope(cfg, stage.hf_overrides)
    out = Path(cfg.run.output_dir).expanduser().resolve()
    start = start_model(cfg, out, materialise, megatron)
    config = translate(cfg, stage, data_path, start)
    memory = None
    if megatron:
        memory = to_nemo_rl.check_memory(cfg, stage) if check_memory else memory_estimate(cfg, stage)
    return Compiled(config, derived_numbers(stage, memory))
