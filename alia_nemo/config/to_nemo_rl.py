"""A resolved stage -> one NeMo-RL v0.7 config: translation only (the one place that knows NeMo-RL's keys).

:func:`translate` maps a :class:`~alia_nemo.config.resolve.ResolvedStage` (every number already derived) plus
where its prepared data and starting model are to a complete, standalone YAML (no ``defaults:``) that upstream
``examples/run_sft.py --config FILE`` (SFT and CPT stages) or ``examples/run_dpo.py --config FILE`` (DPO stages)
and our ``engine=nemo_rl`` driver all run unchanged. It reads and writes nothing: preparing data and writing a
starting model are the caller's (:mod:`alia_nemo.engines.nemo_rl_prepare`). The settings we never change are data
(``nemo_rl_fixed.yaml``); the result is checked against the strict mirror in :mod:`alia_nemo.config.nemo_rl_schema`
before it is returned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alia_nemo.config.nemo_rl_schema import validate_nemo_rl
from alia_nemo.config.planner import HOST_SHARE, LOGPROB_CHUNK
from alia_nemo.config.resolve import ResolvedStage
from alia_nemo.config.schema import AliaConfig, NemoRLEngineConfig, StageConfig
from alia_nemo.data.sources import source_for
from alia_nemo.errors import ConfigError
from alia_nemo.model.architectures import get_spec
from alia_nemo.model.chatml import CHAT_TEMPLATE
from alia_nemo.nemo_rl.dataset import PROCESSOR_NAME
from alia_nemo.nemo_rl.preference import PREFERENCE_PROCESSOR_NAME, PREFERENCE_TASK
from alia_nemo.nemo_rl.text_dataset import TEXT_PROCESSOR_NAME

DATASET_CLASS = "alia_nemo.nemo_rl.AliaSFTDataset"
TEXT_DATASET_CLASS = "alia_nemo.nemo_rl.AliaTextDataset"
PREFERENCE_DATASET_CLASS = "alia_nemo.nemo_rl.AliaPreferenceDataset"
TASK_NAME = "alia_sft"
UNPREPARED = "UNPREPARED: run `alia-nemo prepare` with the same overrides, then compile again"
FIXED: dict[str, Any] = yaml.safe_load((Path(__file__).with_name("nemo_rl_fixed.yaml")).read_text())


# What Megatron-Core's RotaryEmbedding applies for llama3 RoPE scaling whatever the Hugging Face config says:
# Megatron-Bridge's Llama bridge (at NeMo-RL v0.7.0's pin) hands it only rope_theta (as rotary_base), the
# llama3 on/off flag and the factor; RotaryEmbedding._apply_scaling keeps these three at its own defaults.
MEGATRON_LLAMA3 = {"original_max_position_embeddings": 8192, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def megatron_rope_mismatch(rope_parameters: dict[str, Any] | None) -> list[str]:
    """The llama3 fields Megatron-Core would silently replace (empty when it computes what the config says)."""
    rope = rope_parameters or {}
    if rope.get("rope_type") != "llama3":
        return []
    return [f"{k}={rope.get(k)} (Megatron-Core uses {v})" for k, v in MEGATRON_LLAMA3.items() if rope.get(k) != v]


def fixed(section: str) -> dict[str, Any]:
    """A fresh copy of one section of ``nemo_rl_fixed.yaml`` (callers may extend it)."""
    return copy.deepcopy(FIXED[section])


@dataclass(frozen=True)
class StartModel:
    """Where NeMo-RL finds the stage's starting model (prepared by the caller)."""

    name: str  # policy.model_name
    tokenizer: str
    reconvert: bool = False  # megatron_cfg.force_reconvert_from_hf


@dataclass
class Compiled:
    """A compiled stage: the NeMo-RL config and the resolved numbers it came from."""

    config: dict[str, Any]
    derived: dict[str, Any] = field(default_factory=dict)


def check_compilable(cfg: AliaConfig) -> NemoRLEngineConfig:
    """The engine section, once the config is one NeMo-RL can run; else a :class:`ConfigError` with the fix."""
    eng = cfg.engine
    if not isinstance(eng, NemoRLEngineConfig):
        raise ConfigError(f"compile needs engine=nemo_rl (this config has engine.name={eng.name!r})")
    if cfg.cluster.gpus_per_node < 1:
        raise ConfigError(
            f"cluster={cfg.cluster.name} has no GPUs; NeMo-RL trains on GPUs: pick cluster=mn5_acc, h100_8x80 "
            "or set cluster.gpus_per_node / cluster.num_nodes"
        )
    if not source_for(cfg.data).cached:
        raise ConfigError(
            "compile reads a prepared mixture (data.format=mixture, e.g. data=sample or data=sft_mixture), a "
            "packed corpus (data.format=text_corpus) or prepared preference pairs (data.format=preference); plain "
            "JSONL goes into a mixture through the `messages` adapter"
        )
    if cfg.stage.kind == "dpo":
        check_dpo_layout(eng)
    pp_uneven = eng.first_pipeline_stage_layers or eng.last_pipeline_stage_layers
    if eng.backend == "dtensor" and (eng.pipeline_parallel != 1 or pp_uneven):
        raise ConfigError("engine.pipeline_parallel (and uneven stages) need engine.backend=megatron")
    if eng.backend == "megatron" and eng.dtensor_worker != "v2":
        raise ConfigError(
            f"engine.dtensor_worker={eng.dtensor_worker} picks NeMo-RL's DTensor policy worker, but "
            "engine.backend=megatron; set engine.backend=dtensor, or leave engine.dtensor_worker at v2"
        )
    return eng


def check_dpo_layout(eng: NemoRLEngineConfig) -> None:
    """What NeMo-RL v0.7's DPO can not run, refused with the fix.

    ``dpo.setup`` asserts that sequence packing and dynamic batching are off: anything that reorders a batch
    would split a (chosen, rejected) pair. Megatron's context parallelism needs packed sequences, so Megatron
    DPO layouts are CP1 (split the model with TP and PP instead, and recompute activations).
    """
    if eng.sequence_packing:
        raise ConfigError(
            "engine.sequence_packing=true: NeMo-RL v0.7's DPO refuses sequence packing (dpo.setup asserts it is off; "
            "packing would reorder the chosen/rejected pairs of a batch). Set engine.sequence_packing=false"
        )
    if eng.backend == "megatron" and eng.context_parallel > 1:
        raise ConfigError(
            f"engine.context_parallel={eng.context_parallel}: Megatron context parallelism needs sequence packing, "
            "which NeMo-RL v0.7's DPO refuses; DPO layouts use engine.context_parallel=1 (more tensor or pipeline "
            "parallelism and activation checkpointing instead: `alia-nemo compile` suggests layouts that fit)"
        )


def _precision(cfg: AliaConfig) -> str:
    return "bfloat16" if cfg.model.dtype == "bfloat16" else "float32"


def _megatron_optimizer(s: StageConfig, steps: int, precision: str) -> dict[str, Any]:
    # Optimizer steps, also for DPO: NeMo-RL's dpo.setup doubles megatron_cfg.train_iters and every scheduler key
    # with "iters" in its name (lr_decay_iters, lr_warmup_iters) itself, because each pair is two sequences.
    # Doubling them here too would stretch the schedule to twice the run.
    optimizer = {
        **fixed("megatron_optimizer"),
        "lr": s.lr,
        "min_lr": 0.0 if s.lr_scheduler == "cosine" else s.lr,
        "weight_decay": s.weight_decay,
        "bf16": precision == "bfloat16",
        "adam_beta1": s.adam_beta1,
        "adam_beta2": s.adam_beta2,
        "adam_eps": s.adam_eps,
        "clip_grad": s.grad_clip,
    }
    scheduler = {
        **fixed("megatron_scheduler"),
        "start_weight_decay": s.weight_decay,
        "end_weight_decay": s.weight_decay,
        "lr_decay_style": s.lr_scheduler,
        "lr_decay_iters": steps,
        "lr_warmup_iters": s.warmup_steps,
    }
    return {"optimizer": optimizer, "scheduler": scheduler}


def _torch_optimizer(s: StageConfig) -> dict[str, Any]:
    opt = fixed("torch_optimizer")
    opt["kwargs"].update(lr=s.lr, weight_decay=s.weight_decay, betas=[s.adam_beta1, s.adam_beta2], eps=s.adam_eps)
    return opt


def _torch_scheduler(s: StageConfig, steps: int) -> list[dict[str, Any]]:
    after = (
        {"name": "torch.optim.lr_scheduler.CosineAnnealingLR", "kwargs": {"T_max": max(1, steps - s.warmup_steps)}}
        if s.lr_scheduler == "cosine"
        else {"name": "torch.optim.lr_scheduler.ConstantLR", "kwargs": {"factor": 1.0, "total_iters": 1}}
    )
    if not s.warmup_steps:
        return [after, {"milestones": []}]
    # torch's LinearLR needs a start factor > 0
    warmup = {"start_factor": 1.0 / (s.warmup_steps + 1), "end_factor": 1.0, "total_iters": s.warmup_steps}
    return [{"name": "torch.optim.lr_scheduler.LinearLR", "kwargs": warmup}, after, {"milestones": [s.warmup_steps]}]


def _megatron_cfg(eng: NemoRLEngineConfig, stage: ResolvedStage, s: StageConfig, start: StartModel, precision: str):
    lay = stage.layout
    return {
        **fixed("megatron_cfg"),
        "enabled": True,
        "force_reconvert_from_hf": start.reconvert,  # see alia_nemo.engines.nemo_rl_prepare.megatron_start_path
        "activation_checkpointing": eng.activation_checkpointing,
        "recompute_granularity": eng.recompute_granularity,
        "tensor_model_parallel_size": lay["tp"],
        "pipeline_model_parallel_size": lay["pp"],
        "context_parallel_size": lay["cp"],
        "pipeline_dtype": precision,
        "num_layers_in_first_pipeline_stage": eng.first_pipeline_stage_layers,
        "num_layers_in_last_pipeline_stage": eng.last_pipeline_stage_layers,
        "sequence_parallel": eng.sequence_parallel,
        **_megatron_optimizer(s, stage.steps or 0, precision),
    }


def _dtensor_cfg(eng: NemoRLEngineConfig, stage: ResolvedStage) -> dict[str, Any]:
    return {
        **fixed("dtensor_cfg"),
        "enabled": True,
        "_v2": eng.dtensor_worker == "v2",
        "cpu_offload": eng.cpu_offload,
        "sequence_parallel": eng.sequence_parallel,
        "activation_checkpointing": eng.activation_checkpointing,
        "tensor_parallel_size": stage.layout["tp"],
        "context_parallel_size": stage.layout["cp"],
    }


def _policy(cfg: AliaConfig, stage: ResolvedStage, start: StartModel) -> dict[str, Any]:
    eng, s = check_compilable(cfg), cfg.stage
    megatron, precision = eng.backend == "megatron", _precision(cfg)
    packing = {"enabled": False}
    if eng.sequence_packing:
        packing = {"enabled": True, "train_mb_tokens": s.seq_length * s.micro_batch_size, **fixed("sequence_packing")}
    return {
        "model_name": start.name,
        "tokenizer": {"name": start.tokenizer, "chat_template": CHAT_TEMPLATE, "chat_template_kwargs": None},
        "train_global_batch_size": stage.global_batch_size,
        "train_micro_batch_size": s.micro_batch_size,
        "max_total_sequence_length": s.seq_length,
        "precision": precision,
        **fixed("policy"),
        "dtensor_cfg": {"enabled": False} if megatron else _dtensor_cfg(eng, stage),
        "megatron_cfg": _megatron_cfg(eng, stage, s, start, precision) if megatron else {"enabled": False},
        "sequence_packing": packing,
        "make_sequence_length_divisible_by": stage.sequence_divisor,
        "max_grad_norm": s.grad_clip,
        "optimizer": None if megatron else _torch_optimizer(s),
        "scheduler": None if megatron else _torch_scheduler(s, stage.steps or 0),
        "hf_config_overrides": stage.hf_overrides,
        "logprob_chunk_size": LOGPROB_CHUNK if megatron else None,
    }


def _preference_data(cfg: AliaConfig, stage: ResolvedStage, data_path: str) -> dict[str, Any]:
    """DPO's data section: our pairs' train split, and their held-out split as NeMo-RL's ``data.validation``.

    Both entries name our dataset class by dotted path, which NeMo-RL's ``load_preference_dataset`` imports; that
    is also where upstream ``run_dpo.py``'s ``setup_preference_data`` takes its validation set from.
    """

    def entry(split: str) -> dict[str, Any]:
        return {
            "dataset_name": PREFERENCE_DATASET_CLASS,
            "data_path": data_path,
            "task_name": PREFERENCE_TASK,
            "split": split,
            "processor": PREFERENCE_PROCESSOR_NAME,
            **fixed("train_dataset"),
        }

    return {
        "max_input_seq_length": stage.seq_length,
        **fixed("dpo_data"),
        "num_workers": check_compilable(cfg).dataloader_workers,
        "train": entry("train"),
        "validation": entry("validation") if stage.val_rows > 0 else None,
    }


def _data(cfg: AliaConfig, stage: ResolvedStage, data_path: str) -> dict[str, Any]:
    if stage.kind == "dpo":
        return _preference_data(cfg, stage, data_path)
    cpt = stage.kind == "cpt"
    train = {
        "dataset_name": TEXT_DATASET_CLASS if cpt else DATASET_CLASS,
        "data_path": data_path,
        "task_name": "alia_cpt" if cpt else TASK_NAME,
        "use_validation": stage.val_rows > 0,
        "processor": TEXT_PROCESSOR_NAME if cpt else PROCESSOR_NAME,
        **fixed("train_dataset"),
    }
    data = {"max_input_seq_length": stage.seq_length, **fixed("data"), "train": train}
    data["num_workers"] = check_compilable(cfg).dataloader_workers
    return data


def _loop(cfg: AliaConfig, stage: ResolvedStage) -> dict[str, Any]:
    """The keys SFT's and DPO's loop sections share: epochs, steps, validation schedule and seed."""
    eng, has_val = check_compilable(cfg), stage.val_rows > 0
    return {
        "max_num_epochs": cfg.stage.epochs,
        "max_num_steps": stage.steps,
        "val_period": stage.eval_every or 0,  # run.eval_every as resolved (0 without validation rows)
        "val_batches": eng.val_batches,
        "val_global_batch_size": eng.val_global_batch_size or stage.global_batch_size,
        "val_micro_batch_size": eng.val_micro_batch_size,
        "val_at_start": eng.val_at_start and has_val,
        "val_at_end": has_val,
        "seed": cfg.run.seed,
    }


def _sft(cfg: AliaConfig, stage: ResolvedStage) -> dict[str, Any]:
    return {**_loop(cfg, stage), **fixed("sft")}


def _dpo(cfg: AliaConfig, stage: ResolvedStage) -> dict[str, Any]:
    """NeMo-RL's ``dpo`` section: the loop's schedule and ``stage.dpo`` under NeMo-RL's names."""
    d = cfg.stage.dpo
    assert d is not None  # the schema fills it for DPO stages
    return {
        **_loop(cfg, stage),
        "reference_policy_kl_penalty": d.beta,
        "preference_average_log_probs": d.average_log_probs,
        "sft_average_log_probs": d.average_log_probs,
        "preference_loss_weight": d.preference_loss_weight,
        "sft_loss_weight": d.sft_loss_weight,
    }


def _logger(cfg: AliaConfig, out: Path) -> dict[str, Any]:
    log, run_name = check_compilable(cfg).logger, out.name
    return {
        "log_dir": str(out / "logs"),
        "wandb_enabled": log.wandb,
        "tensorboard_enabled": log.tensorboard,
        "mlflow_enabled": log.mlflow,
        "monitor_gpus": log.monitor_gpus,
        "wandb": {"project": log.wandb_project, "name": run_name},
        "swanlab": {"project": log.wandb_project, "name": run_name},
        "mlflow": {"experiment_name": log.wandb_project, "run_name": run_name, "tracking_uri": log.mlflow_tracking_uri},
        **fixed("logger"),
    }


def translate(cfg: AliaConfig, stage: ResolvedStage, data_path: str, start: StartModel) -> dict[str, Any]:
    """NeMo-RL's SFT config (DPO config for a DPO stage) for the resolved ``stage``, its data at ``data_path`` and
    its ``start`` model (for DPO also the frozen reference model: NeMo-RL's policy keeps a copy of its start).

    Raises :class:`ConfigError` (or :class:`~alia_nemo.config.nemo_rl_schema.NemoRLConfigError`) when NeMo-RL
    could not run it.
    """
    check_compilable(cfg)
    stage.check_trainable()
    out = Path(cfg.run.output_dir).expanduser().resolve()
    checkpointing = {
        **fixed("checkpointing"),
        "checkpoint_dir": str(out / "checkpoints"),
        "keep_top_k": cfg.run.keep_checkpoints,
        "save_period": cfg.run.save_every,
    }
    config = {
        "policy": _policy(cfg, stage, start),
        "data": _data(cfg, stage, data_path),
        **({"dpo": _dpo(cfg, stage)} if stage.kind == "dpo" else {"sft": _sft(cfg, stage)}),
        "checkpointing": checkpointing,
        "logger": _logger(cfg, out),
        "cluster": {
            "gpus_per_node": cfg.cluster.gpus_per_node,
            "num_nodes": cfg.cluster.num_nodes,
            **fixed("cluster"),
        },
    }
    validate_nemo_rl(config, get_spec(cfg.model.arch))
    return config


def memory_estimate(cfg: AliaConfig, stage: ResolvedStage) -> dict[str, Any] | None:
    """The planner's per-GPU memory estimate (Megatron backend) for the resolved stage's layout, in GiB.

    DPO stages count what NeMo-RL's DPO holds (:mod:`alia_nemo.config.planner`): two sequences per pair in each
    micro-batch on the GPU, and the frozen reference model where NeMo-RL's Megatron worker keeps it, in host memory
    (``reference_host_gib`` per node, against ``host_budget``: a share of ``cluster.ram_gb``, when it is set).
    """
    from alia_nemo.config.planner import Gpu, Layout, memory_breakdown, plan, reference_host_gib

    eng, cl, s = cfg.engine, cfg.cluster, cfg.stage
    dp, gbs, dpo = stage.layout["dp"], stage.global_batch_size, stage.kind == "dpo"
    assert isinstance(eng, NemoRLEngineConfig)
    if not cl.gpu_memory_gb:
        return None
    spec = get_spec(cfg.model.arch)
    layout = Layout(
        eng.tensor_parallel, eng.pipeline_parallel, eng.context_parallel, dp, s.micro_batch_size,
        eng.recompute_granularity if eng.activation_checkpointing else "none", sequence_parallel=eng.sequence_parallel,
    )  # fmt: skip
    terms = memory_breakdown(spec, layout, s.seq_length, gbs, LOGPROB_CHUNK, dpo=dpo)
    budget = cl.gpu_memory_gb * 1e9 / 1024**3
    suggestion = None
    if terms["total"] > budget and cl.gpu_peak_tflops:
        ranked = plan(spec, s.seq_length, gbs, cl.num_nodes, cl.gpus_per_node,
                      Gpu(cl.gpu_memory_gb, cl.gpu_peak_tflops), dpo=dpo)["ranked"]  # fmt: skip
        # The fitting layouts closest to the requested one (fewest changed sizes), fastest first among equals.
        want = (eng.tensor_parallel, eng.pipeline_parallel, eng.context_parallel)

        def distance(row: dict) -> int:
            lay = row["layout"]
            return sum(a != b for a, b in zip(want, (lay["tp"], lay["pp"], lay["cp"])))

        picks = sorted(ranked, key=lambda r: (distance(r), r["step_s"]))[:3]
        suggestion = "; ".join(_as_overrides(r) for r in picks) or None
    memory = {"total": round(terms["total"], 1), "budget": round(budget, 1), "suggestion": suggestion}
    if dpo:
        host = reference_host_gib(spec, layout, cl.gpus_per_node)["total"]
        host_budget = round(HOST_SHARE * cl.ram_gb * 1e9 / 1024**3, 1) if cl.ram_gb else None
        memory.update(reference_host_gib=round(host, 1), host_budget=host_budget)
    return memory


def _as_overrides(row: dict[str, Any]) -> str:
    """A planner layout as the overrides that select it, with its estimate."""
    lay = row["layout"]
    recompute = (
        f"engine.activation_checkpointing=true engine.recompute_granularity={lay['recompute']}"
        if lay["recompute"] != "none"
        else "engine.activation_checkpointing=false"
    )
    if lay["cp"] > 1:
        recompute += " engine.sequence_packing=true"  # Megatron context parallelism needs packing
    return (
        f"engine.tensor_parallel={lay['tp']} engine.pipeline_parallel={lay['pp']} engine.context_parallel={lay['cp']} "
        f"stage.micro_batch_size={lay['micro_batch']} {recompute} ({row['memory_gib']['total']:.1f} GiB)"
    )


def check_memory(cfg: AliaConfig, stage: ResolvedStage) -> dict[str, Any] | None:
    """The Megatron memory estimate of the stage's layout; :class:`ConfigError` when it exceeds the GPU (or, for
    DPO, when the reference model's host copies exceed their share of a node's RAM)."""
    eng = check_compilable(cfg)
    if eng.backend != "megatron":
        return None
    memory = memory_estimate(cfg, stage)
    lay = stage.layout
    if memory and memory["total"] > memory["budget"]:
        what = " (DPO: chosen and rejected sequences in each micro-batch)" if stage.kind == "dpo" else ""
        raise ConfigError(
            f"estimated {memory['total']:.1f} GiB per GPU for TP{lay['tp']} PP{lay['pp']} CP{lay['cp']} "
            f"DP{lay['dp']} (recompute {eng.recompute_granularity if eng.activation_checkpointing else 'off'}){what} "
            f"exceeds the {memory['budget']:.1f} GiB of a {cfg.cluster.gpu_name}; `alia-nemo plan` with the same "
            f"overrides ranks layouts that fit (nearest here: {memory['suggestion'] or 'none'}); "
            "--skip-memory-check to compile anyway"
        )
    if memory and memory.get("host_budget") and memory["reference_host_gib"] > memory["host_budget"]:
        raise ConfigError(
            "DPO's reference model: NeMo-RL's Megatron worker keeps it in host memory, "
            f"{memory['reference_host_gib']:.1f} GiB per node for TP{lay['tp']} PP{lay['pp']} with "
            f"{cfg.cluster.gpus_per_node} GPUs per node (the reference weights and the policy's copy while they are "
            f"swapped), more than {memory['host_budget']:.1f} GiB ({HOST_SHARE:.0%} of cluster.ram_gb="
            f"{cfg.cluster.ram_gb:g} GB); raise engine.tensor_parallel or engine.pipeline_parallel, or "
            "--skip-memory-check to compile anyway"
        )
    return memory


def derived_numbers(stage: ResolvedStage, memory: dict[str, Any] | None) -> dict[str, Any]:
    """What ``compile --json`` and the YAML header report: the resolved stage, under compile's names."""
    return {
        "train_rows": stage.train_rows,
        "val_rows": stage.val_rows,
        "counted_from": stage.counted_from,
        "steps_per_epoch": stage.steps_per_epoch,
        "max_num_steps": stage.steps,
        "gpus": stage.world,
        "layout": stage.layout,
        "grad_accumulation": stage.grad_accumulation,
        "tokens_per_step_max": stage.tokens_per_step,
        "memory_gib": memory,
        "resolved": stage.as_dict(),
    }


def header(cfg: AliaConfig, compiled: Compiled, command: str) -> str:
    """The comment block written above a compiled YAML: what it is and how to run it."""
    d = compiled.derived
    lay = d["layout"]
    dpo = "dpo" in compiled.config
    script = "run_dpo.py" if dpo else "run_sft.py"
    lines = [
        f"NeMo-RL v0.7 {'DPO' if dpo else 'SFT'} config compiled by alia-nemo from: {command}",
        f"model {cfg.model.arch} ({cfg.model.pretrained or 'random init'}), stage {cfg.stage.name}, "
        f"data {cfg.data.name}, cluster {cfg.cluster.name}",
        f"{d['train_rows']:,} training {d['resolved']['unit']} ({d['counted_from']}) / global batch "
        f"{d['resolved']['global_batch_size']} -> {d['max_num_steps']:,} steps",
        f"layout TP{lay['tp']} PP{lay['pp']} CP{lay['cp']} DP{lay['dp']} on {d['gpus']} GPUs, "
        f"{d['grad_accumulation']} micro-batches accumulated per step",
    ]
    if dpo:
        beta = compiled.config["dpo"]["reference_policy_kl_penalty"]
        lines.append(
            f"DPO, beta {beta:g}: a pair's chosen and rejected sequences share a micro-batch; the frozen reference "
            "model is the start model"
        )
        if compiled.config["policy"]["megatron_cfg"]["enabled"]:
            lines.append(
                "Megatron: lr_decay_iters and lr_warmup_iters are optimizer steps; NeMo-RL's dpo.setup doubles them "
                "(and train_iters) itself"
            )
    lines += [
        f"Run:  uv run examples/{script} --config THIS_FILE   (NeMo-RL checkout, alia_nemo on PYTHONPATH)",
        "  or: alia-nemo train engine=nemo_rl <the same overrides>",
    ]
    return "".join(f"# {line}\n" for line in lines)
