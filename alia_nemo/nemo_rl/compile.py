"""Our composed stage -> one NeMo-RL v0.7 SFT config (the one place that knows NeMo-RL's keys).

The result is a complete, standalone YAML (no ``defaults:``) that upstream ``examples/run_sft.py
--config FILE`` and our ``engine=nemo_rl`` driver both run unchanged. It is checked against the strict
mirror in :mod:`alia_nemo.nemo_rl.schema` before it is returned.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alia_nemo.architectures import get_spec
from alia_nemo.chatml import CHAT_TEMPLATE
from alia_nemo.config_schema import AliaConfig, ConfigError, MixtureConfig, NemoRLEngineConfig, TextCorpusConfig
from alia_nemo.hf_training import stage_config_overrides
from alia_nemo.nemo_rl.dataset import PROCESSOR_NAME
from alia_nemo.nemo_rl.schema import validate_nemo_rl
from alia_nemo.nemo_rl.text_dataset import TEXT_PROCESSOR_NAME
from alia_nemo.planner import LOGPROB_CHUNK

DATASET_CLASS = "alia_nemo.nemo_rl.AliaSFTDataset"
TEXT_DATASET_CLASS = "alia_nemo.nemo_rl.AliaTextDataset"
TASK_NAME = "alia_sft"
UNPREPARED = "UNPREPARED: run `alia-nemo prepare` with the same overrides, then compile again"


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


@dataclass
class Compiled:
    """A compiled stage: the NeMo-RL config and how its derived numbers came about."""

    config: dict[str, Any]
    derived: dict[str, Any] = field(default_factory=dict)


def _engine(cfg: AliaConfig) -> NemoRLEngineConfig:
    if not isinstance(cfg.engine, NemoRLEngineConfig):
        raise ConfigError(f"compile needs engine=nemo_rl (this config has engine.name={cfg.engine.name!r})")
    if cfg.cluster.gpus_per_node < 1:
        raise ConfigError(
            f"cluster={cfg.cluster.name} has no GPUs; NeMo-RL trains on GPUs: pick cluster=mn5_acc, h100_8x80 "
            "or set cluster.gpus_per_node / cluster.num_nodes"
        )
    if not isinstance(cfg.data, (MixtureConfig, TextCorpusConfig)):
        raise ConfigError(
            "compile reads a prepared mixture (data.format=mixture, e.g. data=sample or data=sft_mixture) or a "
            "packed corpus (data.format=text_corpus); plain JSONL goes into a mixture through the `messages` adapter"
        )
    return cfg.engine


def materialise_start_model(cfg: AliaConfig, directory: Path) -> Path:
    """A seeded random init of ``model.arch`` with its tokenizer, saved where NeMo-RL can load it.

    Only for models without ``model.pretrained`` (the tiny smoke model); the directory is reused when
    it exists.
    """
    from alia_nemo.tokenizer import load_tokenizer

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


def _start_model(cfg: AliaConfig, out: Path, materialise: bool, megatron: bool) -> tuple[str, str, bool]:
    """(policy.model_name, tokenizer name, force_reconvert_from_hf) for the stage's starting model."""
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
                return str(megatron_start_path(directory, out, materialise)), cfg.model.tokenizer, False
            # Not written yet (a later stage's final/): nothing to name it by, so convert it at every start.
            return name, cfg.model.tokenizer, True
        return name, cfg.model.tokenizer, False
    if cfg.model.arch != "alia_tiny":
        raise ConfigError(
            f"model.pretrained is null: {cfg.model.arch} would start from random weights; set model.pretrained "
            "to a checkpoint (hub id or directory, e.g. the previous stage's final/)"
        )
    start = out / "start_model"
    if materialise:
        materialise_start_model(cfg, start)
    return str(start), str(start), False


def _train_rows(cfg: AliaConfig, prepare: bool, progress: bool) -> tuple[str, int, int, str]:
    """(data_path, training rows, validation rows, where the counts come from): conversations or windows."""
    if isinstance(cfg.data, TextCorpusConfig):
        return _train_windows(cfg, prepare, progress)
    mix = cfg.data
    assert isinstance(mix, MixtureConfig)
    max_tokens = min(mix.max_tokens or cfg.stage.seq_length, cfg.stage.seq_length)
    if not prepare:
        from alia_nemo.sft_mixture import active_datasets

        requested = sum(sum(d.counts.values()) for d in active_datasets(mix).values())
        val = sum(round(n * mix.val_fraction) for d in active_datasets(mix).values() for n in d.counts.values())
        return UNPREPARED, requested, val, "plan (mixture not prepared; counts requested by the config)"

    from alia_nemo.sft_mixture import prepare_mixture
    from alia_nemo.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.allow_download)
    directory = prepare_mixture(mix, tokenizer, max_tokens, cfg.run.seed, progress=progress)
    manifest = json.loads((directory / "manifest.json").read_text())
    totals = manifest["totals"]
    n_train = totals.get("selected", 0) + totals.get("repeated", 0)
    return str(directory), n_train, totals.get("val", 0), f"prepared mixture {directory.name}"


def _train_windows(cfg: AliaConfig, prepare: bool, progress: bool) -> tuple[str, int, int, str]:
    from alia_nemo.sft_data import corpus_tokens

    corpus = cfg.data
    assert isinstance(corpus, TextCorpusConfig)
    tokens = corpus_tokens(cfg)
    if not prepare:
        return UNPREPARED, -(-tokens // cfg.stage.seq_length), corpus.val_windows, "token budget (corpus not packed)"

    from alia_nemo.packing import prepare_corpus
    from alia_nemo.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.allow_download)
    directory = prepare_corpus(corpus, tokenizer, cfg.stage.seq_length, tokens, cfg.run.seed, progress=progress)
    manifest = json.loads((directory / "manifest.json").read_text())
    return str(directory), manifest["train_windows"], manifest["val_windows"], f"packed corpus {directory.name}"


def _optimizers(cfg: AliaConfig, steps: int, precision: str) -> dict[str, Any]:
    s = cfg.stage
    min_lr = 0.0 if s.lr_scheduler == "cosine" else s.lr
    megatron = {
        "optimizer": {
            "optimizer": "adam",  # with weight decay Megatron's adam is AdamW
            "lr": s.lr,
            "min_lr": min_lr,
            "weight_decay": s.weight_decay,
            "bf16": precision == "bfloat16",
            "fp16": False,
            "params_dtype": "float32",
            "adam_beta1": s.adam_beta1,
            "adam_beta2": s.adam_beta2,
            "adam_eps": s.adam_eps,
            "sgd_momentum": 0.9,
            "use_distributed_optimizer": True,
            "use_precision_aware_optimizer": True,
            "clip_grad": s.grad_clip,
            "optimizer_cpu_offload": False,
            "optimizer_offload_fraction": 0.0,
        },
        "scheduler": {
            "start_weight_decay": s.weight_decay,
            "end_weight_decay": s.weight_decay,
            "weight_decay_incr_style": "constant",
            "lr_decay_style": s.lr_scheduler,
            "lr_decay_iters": steps,
            "lr_warmup_iters": s.warmup_steps,
            "lr_warmup_init": 0.0,
        },
    }
    torch_opt = {
        "name": "torch.optim.AdamW",
        # DTensor parameters need the plain (non-foreach, non-fused) AdamW loop.
        "kwargs": {
            "lr": s.lr,
            "weight_decay": s.weight_decay,
            "betas": [s.adam_beta1, s.adam_beta2],
            "eps": s.adam_eps,
            "foreach": False,
            "fused": False,
        },
    }
    after = (
        {"name": "torch.optim.lr_scheduler.CosineAnnealingLR", "kwargs": {"T_max": max(1, steps - s.warmup_steps)}}
        if s.lr_scheduler == "cosine"
        else {"name": "torch.optim.lr_scheduler.ConstantLR", "kwargs": {"factor": 1.0, "total_iters": 1}}
    )
    schedule: list[dict[str, Any]] = []
    if s.warmup_steps:
        start = 1.0 / (s.warmup_steps + 1)  # torch's LinearLR needs a factor > 0
        schedule.append(
            {
                "name": "torch.optim.lr_scheduler.LinearLR",
                "kwargs": {"start_factor": start, "end_factor": 1.0, "total_iters": s.warmup_steps},
            }
        )
    schedule += [after, {"milestones": [s.warmup_steps] if s.warmup_steps else []}]
    return {"megatron": megatron, "torch_optimizer": torch_opt, "torch_scheduler": schedule}


def memory_estimate(cfg: AliaConfig, dp: int) -> dict[str, Any] | None:
    """The planner's per-GPU memory estimate (Megatron backend) for the engine's layout, in GiB."""
    from alia_nemo.planner import Gpu, Layout, memory_breakdown, plan

    eng, cl, s = cfg.engine, cfg.cluster, cfg.stage
    assert isinstance(eng, NemoRLEngineConfig)
    if not cl.gpu_memory_gb:
        return None
    spec = get_spec(cfg.model.arch)
    layout = Layout(
        eng.tensor_parallel, eng.pipeline_parallel, eng.context_parallel, dp, s.micro_batch_size,
        eng.recompute_granularity if eng.activation_checkpointing else "none", sequence_parallel=eng.sequence_parallel,
    )  # fmt: skip
    terms = memory_breakdown(spec, layout, s.seq_length, s.global_batch_size, LOGPROB_CHUNK)
    budget = cl.gpu_memory_gb * 1e9 / 1024**3
    suggestion = None
    if terms["total"] > budget and cl.gpu_peak_tflops:
        ranked = plan(spec, s.seq_length, s.global_batch_size, cl.num_nodes, cl.gpus_per_node,
                      Gpu(cl.gpu_memory_gb, cl.gpu_peak_tflops))["ranked"]  # fmt: skip
        # The fitting layouts closest to the requested one (fewest changed sizes), fastest first among equals.
        want = (eng.tensor_parallel, eng.pipeline_parallel, eng.context_parallel)

        def distance(row: dict) -> int:
            lay = row["layout"]
            return sum(a != b for a, b in zip(want, (lay["tp"], lay["pp"], lay["cp"])))

        picks = sorted(ranked, key=lambda r: (distance(r), r["step_s"]))[:3]
        suggestion = "; ".join(_as_overrides(r) for r in picks) or None
    return {"total": round(terms["total"], 1), "budget": round(budget, 1), "suggestion": suggestion}


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


def compile_stage(
    cfg: AliaConfig,
    *,
    prepare: bool = True,
    materialise: bool = True,
    progress: bool = True,
    check_memory: bool = True,
) -> Compiled:
    """Build and validate the NeMo-RL SFT config for ``cfg`` (which must use ``engine=nemo_rl``).

    ``prepare`` builds (or finds in the cache) the mixture so the dataset path and step count are
    exact; without it the step count comes from the mixture's requested counts and the dataset path
    is a placeholder the dataset class refuses with instructions. ``materialise`` writes the tiny
    model's random init (models without ``model.pretrained``). ``check_memory`` refuses a Megatron layout
    the planner estimates to exceed the cluster's GPU memory.
    """
    eng = _engine(cfg)
    spec = get_spec(cfg.model.arch)
    s = cfg.stage
    out = Path(cfg.run.output_dir).expanduser().resolve()
    model_name, tokenizer_name, reconvert = _start_model(cfg, out, materialise, eng.backend == "megatron")
    data_path, n_train, n_val, counted_from = _train_rows(cfg, prepare, progress)
    gbs = s.global_batch_size
    if n_train < gbs:
        raise ConfigError(
            f"{n_train} training rows do not fill one global batch of {gbs}; lower "
            "stage.global_batch_size or use more data"
        )
    steps_per_epoch = n_train // gbs  # NeMo-RL's loader drops the last partial batch
    steps = steps_per_epoch * s.epochs
    if s.max_steps:
        steps = min(steps, s.max_steps)
    precision = "bfloat16" if cfg.model.dtype == "bfloat16" else "float32"
    tp, pp, cp = eng.tensor_parallel, eng.pipeline_parallel, eng.context_parallel
    if eng.backend == "dtensor" and (pp != 1 or eng.first_pipeline_stage_layers or eng.last_pipeline_stage_layers):
        raise ConfigError("engine.pipeline_parallel (and uneven stages) need engine.backend=megatron")
    if eng.backend == "megatron" and eng.dtensor_worker != "v2":
        raise ConfigError(
            f"engine.dtensor_worker={eng.dtensor_worker} picks NeMo-RL's DTensor policy worker, but "
            "engine.backend=megatron; set engine.backend=dtensor, or leave engine.dtensor_worker at v2"
        )
    opt = _optimizers(cfg, steps, precision)
    megatron = eng.backend == "megatron"
    cpt = s.kind == "cpt"
    has_val = n_val > 0
    # transformers 5.x reads rope_parameters (rope_theta lives inside it); a bare rope_theta is ignored.
    hf_overrides = stage_config_overrides(cfg)
    if megatron:
        check_megatron_rope(cfg, hf_overrides)
    divisible = 2 * cp * tp if cp > 1 else tp
    run_name = Path(out).name
    policy: dict[str, Any] = {
        "model_name": model_name,
        "tokenizer": {"name": tokenizer_name, "chat_template": CHAT_TEMPLATE, "chat_template_kwargs": None},
        "train_global_batch_size": gbs,
        "train_micro_batch_size": s.micro_batch_size,
        "max_total_sequence_length": s.seq_length,
        "precision": precision,
        "offload_optimizer_for_logprob": False,
        "dtensor_cfg": {"enabled": False},
        "megatron_cfg": {"enabled": False},
        "dynamic_batching": {"enabled": False},
        "sequence_packing": (
            {
                "enabled": True,
                "train_mb_tokens": s.seq_length * s.micro_batch_size,
                "algorithm": "modified_first_fit_decreasing",
                "sequence_length_round": 64,
            }
            if eng.sequence_packing
            else {"enabled": False}
        ),
        "make_sequence_length_divisible_by": divisible,
        "max_grad_norm": s.grad_clip,
        "optimizer": None if megatron else opt["torch_optimizer"],
        "scheduler": None if megatron else opt["torch_scheduler"],
        "hf_config_overrides": hf_overrides,
        "logprob_chunk_size": LOGPROB_CHUNK if megatron else None,
    }
    if megatron:
        policy["megatron_cfg"] = {
            "enabled": True,
            "use_linear_ce_fusion_loss": False,
            "linear_ce_fusion_chunk_size": 256,
            "force_reconvert_from_hf": reconvert,  # see megatron_start_path
            "env_vars": {},
            "empty_unused_memory_level": 0,  # SFT has no generation phase to free memory for
            "activation_checkpointing": eng.activation_checkpointing,
            "recompute_granularity": eng.recompute_granularity,
            "recompute_modules": None,
            "tensor_model_parallel_size": tp,
            "expert_tensor_parallel_size": 1,
            "expert_model_parallel_size": 1,
            "pipeline_model_parallel_size": pp,
            "context_parallel_size": cp,
            "pipeline_dtype": precision,
            "num_layers_in_first_pipeline_stage": eng.first_pipeline_stage_layers,
            "num_layers_in_last_pipeline_stage": eng.last_pipeline_stage_layers,
            "sequence_parallel": eng.sequence_parallel,
            "freeze_moe_router": False,
            "moe_router_dtype": None,
            "moe_router_load_balancing_type": "aux_loss",
            "moe_router_bias_update_rate": 1e-3,
            "moe_permute_fusion": False,
            "apply_rope_fusion": True,
            "bias_activation_fusion": True,
            # bf16 logits, cast to fp32 one chunk of positions at a time (policy.logprob_chunk_size): NeMo-RL's
            # default keeps the whole [tokens x vocab/TP] in fp32 several times over (see alia_nemo.planner).
            "defer_fp32_logits": True,
            "moe_per_layer_logging": False,
            "moe_enable_deepep": False,
            "moe_token_dispatcher_type": "alltoall",
            "moe_shared_expert_overlap": False,
            "gradient_accumulation_fusion": False,
            "use_fused_weighted_squared_relu": False,
            "peft": {"enabled": False},
            **opt["megatron"],
            "distributed_data_parallel_config": {
                "grad_reduce_in_fp32": False,
                "overlap_grad_reduce": True,
                "overlap_param_gather": True,
                "data_parallel_sharding_strategy": "optim_grads_params",
                "use_custom_fsdp": False,
            },
            "fp8_cfg": {"enabled": False},
        }
    else:
        policy["dtensor_cfg"] = {
            "enabled": True,
            "_v2": eng.dtensor_worker == "v2",
            "env_vars": {},
            "cpu_offload": eng.cpu_offload,
            "sequence_parallel": eng.sequence_parallel,
            "activation_checkpointing": eng.activation_checkpointing,
            "tensor_parallel_size": tp,
            "context_parallel_size": cp,
            "dp_replicate_size": 1,
            "custom_parallel_plan": None,
            "automodel_kwargs": {},
            "lora_cfg": {"enabled": False},
        }
    log = eng.logger
    config = {
        "policy": policy,
        "data": {
            "max_input_seq_length": s.seq_length,
            "add_bos": True,  # ChatML writes BOS once (our processor keeps it); windows carry theirs
            "add_eos": False,  # turns end with <|im_end|>; NeMo-RL's EOS would be trained after it
            "add_generation_prompt": False,
            "shuffle": True,
            "num_workers": eng.dataloader_workers,
            "train": {
                "dataset_name": TEXT_DATASET_CLASS if cpt else DATASET_CLASS,
                "data_path": data_path,
                "task_name": "alia_cpt" if cpt else TASK_NAME,
                "use_validation": has_val,
                "processor": TEXT_PROCESSOR_NAME if cpt else PROCESSOR_NAME,
                "prompt_file": None,
                "system_prompt_file": None,
            },
            "validation": None,
        },
        "sft": {
            "max_num_epochs": s.epochs,
            "max_num_steps": steps,
            "val_period": (cfg.run.eval_every or 0) if has_val else 0,
            "val_batches": eng.val_batches,
            "val_global_batch_size": eng.val_global_batch_size or gbs,
            "val_micro_batch_size": eng.val_micro_batch_size,
            "val_at_start": eng.val_at_start and has_val,
            "val_at_end": has_val,
            "seed": cfg.run.seed,
            "only_unmask_final": False,
        },
        "checkpointing": {
            "enabled": True,
            "checkpoint_dir": str(out / "checkpoints"),
            # Keep the newest checkpoints (no metric): resuming wants the latest, not the best.
            "metric_name": None,
            "higher_is_better": False,
            "keep_top_k": cfg.run.keep_checkpoints,
            "save_period": cfg.run.save_every,
            "checkpoint_must_save_by": None,
            "save_optimizer": True,
        },
        "logger": {
            "log_dir": str(out / "logs"),
            "wandb_enabled": log.wandb,
            "tensorboard_enabled": log.tensorboard,
            "mlflow_enabled": log.mlflow,
            "swanlab_enabled": False,
            "monitor_gpus": log.monitor_gpus,
            "wandb": {"project": log.wandb_project, "name": run_name},
            "swanlab": {"project": log.wandb_project, "name": run_name},
            "tensorboard": {"log_dir": "tensorboard"},
            "mlflow": {
                "experiment_name": log.wandb_project,
                "run_name": run_name,
                "tracking_uri": log.mlflow_tracking_uri,
            },
            "gpu_monitoring": {"collection_interval": 10, "flush_interval": 10},
        },
        "cluster": {
            "gpus_per_node": cfg.cluster.gpus_per_node,
            "num_nodes": cfg.cluster.num_nodes,
            "segment_size": None,
        },
    }
    validate_nemo_rl(config, spec)
    world = cfg.cluster.gpus_per_node * cfg.cluster.num_nodes
    dp = world // (tp * pp * cp)
    memory = memory_estimate(cfg, dp) if megatron else None
    if memory and check_memory and memory["total"] > memory["budget"]:
        raise ConfigError(
            f"estimated {memory['total']:.1f} GiB per GPU for TP{tp} PP{pp} CP{cp} DP{dp} "
            f"(recompute {eng.recompute_granularity if eng.activation_checkpointing else 'off'}) exceeds the "
            f"{memory['budget']:.1f} GiB of a {cfg.cluster.gpu_name}; `alia-nemo plan` with the same overrides "
            f"ranks layouts that fit (nearest here: {memory['suggestion'] or 'none'}); "
            "--skip-memory-check to compile anyway"
        )
    derived = {
        "train_rows": n_train,
        "val_rows": n_val,
        "counted_from": counted_from,
        "steps_per_epoch": steps_per_epoch,
        "max_num_steps": steps,
        "gpus": world,
        "layout": {"tp": tp, "pp": pp, "cp": cp, "dp": dp},
        "grad_accumulation": gbs // (dp * s.micro_batch_size),
        "tokens_per_step_max": gbs * s.seq_length,
        "memory_gib": memory,
    }
    return Compiled(config, derived)


def header(cfg: AliaConfig, compiled: Compiled, command: str) -> str:
    """The comment block written above a compiled YAML: what it is and how to run it."""
    d = compiled.derived
    lines = [
        f"NeMo-RL v0.7 SFT config compiled by alia-nemo from: {command}",
        f"model {cfg.model.arch} ({cfg.model.pretrained or 'random init'}), stage {cfg.stage.name}, "
        f"data {cfg.data.name}, cluster {cfg.cluster.name}",
        f"{d['train_rows']:,} training {'windows' if cfg.stage.kind == 'cpt' else 'conversations'} "
        f"({d['counted_from']}) / global batch "
        f"{cfg.stage.global_batch_size} -> {d['max_num_steps']:,} steps",
        f"layout TP{d['layout']['tp']} PP{d['layout']['pp']} CP{d['layout']['cp']} DP{d['layout']['dp']} on "
        f"{d['gpus']} GPUs, {d['grad_accumulation']} micro-batches accumulated per step",
        "Run:  uv run examples/run_sft.py --config THIS_FILE   (NeMo-RL checkout, alia_nemo on PYTHONPATH)",
        "  or: alia-nemo train engine=nemo_rl <the same overrides>",
    ]
    return "".join(f"# {line}\n" for line in lines)
