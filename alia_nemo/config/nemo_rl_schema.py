"""A strict mirror of the NeMo-RL v0.7 SFT and DPO keys that ``alia-nemo compile`` emits, and layout checks.

NeMo-RL's own ``MasterConfig`` accepts unknown keys; this mirror forbids them at every depth so a typo
or a key NeMo-RL does not read fails at compile time, naming the dotted key. The cross-field checks
catch layouts that would only fail (or silently misbehave) once GPUs are allocated. The DPO file
(:class:`NemoRLDPOConfig`) shares every section with the SFT one except ``data`` and the algorithm's own.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alia_nemo.config.planner import data_parallel_size, sequence_divisor
from alia_nemo.errors import AliaError
from alia_nemo.model.architectures import AliaSpec


class NemoRLConfigError(AliaError, ValueError):
    """A compiled NeMo-RL config that would not run; the message names each key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Disabled(_Strict):
    enabled: Literal[False]


class Tokenizer(_Strict):
    name: str
    chat_template: str
    chat_template_kwargs: dict[str, Any] | None = None


class LoraDisabled(_Strict):
    enabled: Literal[False]


class DTensor(_Strict):
    enabled: Literal[True]
    v2: bool = Field(True, alias="_v2")
    env_vars: dict[str, str] = {}
    cpu_offload: bool
    sequence_parallel: bool
    activation_checkpointing: bool
    tensor_parallel_size: int = Field(gt=0)
    context_parallel_size: int = Field(gt=0)
    dp_replicate_size: int = Field(1, gt=0)
    custom_parallel_plan: str | None = None
    automodel_kwargs: dict[str, Any] = {}
    lora_cfg: LoraDisabled


class MegatronOptimizer(_Strict):
    optimizer: Literal["adam"]
    lr: float = Field(gt=0)
    min_lr: float = Field(ge=0)
    weight_decay: float = Field(ge=0)
    bf16: bool
    fp16: bool
    params_dtype: Literal["float32", "bfloat16"]
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    sgd_momentum: float
    use_distributed_optimizer: bool
    use_precision_aware_optimizer: bool
    clip_grad: float = Field(ge=0)
    optimizer_cpu_offload: bool
    optimizer_offload_fraction: float


class MegatronScheduler(_Strict):
    start_weight_decay: float
    end_weight_decay: float
    weight_decay_incr_style: Literal["constant"]
    lr_decay_style: Literal["constant", "cosine", "linear"]
    lr_decay_iters: int | None = Field(gt=0)
    lr_warmup_iters: int = Field(ge=0)
    lr_warmup_init: float = Field(ge=0)


class MegatronDDP(_Strict):
    grad_reduce_in_fp32: bool
    overlap_grad_reduce: bool
    overlap_param_gather: bool
    data_parallel_sharding_strategy: str
    use_custom_fsdp: bool


class PeftDisabled(_Strict):
    enabled: Literal[False]


class Fp8Disabled(_Strict):
    enabled: Literal[False]


class Megatron(_Strict):
    enabled: Literal[True]
    use_linear_ce_fusion_loss: bool
    linear_ce_fusion_chunk_size: int
    force_reconvert_from_hf: bool
    env_vars: dict[str, str] = {}
    empty_unused_memory_level: int = Field(ge=0, le=2)
    activation_checkpointing: bool
    recompute_granularity: Literal["full", "selective"]
    recompute_modules: list[str] | None
    tensor_model_parallel_size: int = Field(gt=0)
    expert_tensor_parallel_size: int = Field(gt=0)
    expert_model_parallel_size: int = Field(gt=0)
    pipeline_model_parallel_size: int = Field(gt=0)
    context_parallel_size: int = Field(gt=0)
    pipeline_dtype: Literal["bfloat16", "float32"]
    num_layers_in_first_pipeline_stage: int | None
    num_layers_in_last_pipeline_stage: int | None
    sequence_parallel: bool
    freeze_moe_router: bool
    moe_router_dtype: str | None
    moe_router_load_balancing_type: str
    moe_router_bias_update_rate: float
    moe_permute_fusion: bool
    apply_rope_fusion: bool
    bias_activation_fusion: bool
    defer_fp32_logits: bool
    moe_per_layer_logging: bool
    moe_enable_deepep: bool
    moe_token_dispatcher_type: str
    moe_shared_expert_overlap: bool
    gradient_accumulation_fusion: bool
    use_fused_weighted_squared_relu: bool
    peft: PeftDisabled
    optimizer: MegatronOptimizer
    scheduler: MegatronScheduler
    distributed_data_parallel_config: MegatronDDP
    fp8_cfg: Fp8Disabled


class Packing(_Strict):
    enabled: Literal[True]
    train_mb_tokens: int = Field(gt=0)
    algorithm: Literal["modified_first_fit_decreasing", "first_fit_decreasing", "first_fit_shuffle", "concatenative"]
    sequence_length_round: int = Field(gt=0)


class TorchOptimizer(_Strict):
    name: Literal["torch.optim.AdamW"]
    kwargs: dict[str, Any]


class TorchScheduler(_Strict):
    name: str
    kwargs: dict[str, Any]


class Milestones(_Strict):
    milestones: list[int]


class Policy(_Strict):
    model_name: str
    tokenizer: Tokenizer
    train_global_batch_size: int = Field(gt=0)
    train_micro_batch_size: int = Field(gt=0)
    max_total_sequence_length: int = Field(gt=0)
    precision: Literal["bfloat16", "float32"]
    offload_optimizer_for_logprob: bool = False
    dtensor_cfg: DTensor | Disabled
    megatron_cfg: Megatron | Disabled
    dynamic_batching: Disabled
    sequence_packing: Packing | Disabled
    make_sequence_length_divisible_by: int = Field(gt=0)
    max_grad_norm: float = Field(gt=0)
    optimizer: TorchOptimizer | None
    scheduler: list[TorchScheduler | Milestones] | None
    hf_config_overrides: dict[str, Any]
    logprob_chunk_size: int | None = Field(None, gt=0)


class DatasetEntry(_Strict):
    dataset_name: str
    data_path: str
    task_name: str
    use_validation: bool
    processor: str
    prompt_file: None = None
    system_prompt_file: None = None


class PreferenceEntry(_Strict):
    """A DPO dataset entry (``data.train``, ``data.validation``): our prepared pairs, one split of them."""

    dataset_name: str
    data_path: str
    task_name: str
    split: Literal["train", "validation"]
    processor: str
    prompt_file: None = None
    system_prompt_file: None = None


class DPOData(_Strict):
    """NeMo-RL's DPO data section: no add_bos/add_eos (its preference path takes none; our processor's defaults)."""

    max_input_seq_length: int = Field(gt=0)
    shuffle: bool
    num_workers: int = Field(ge=0)
    train: PreferenceEntry
    validation: PreferenceEntry | None


class Data(_Strict):
    max_input_seq_length: int = Field(gt=0)
    add_bos: bool
    add_eos: Literal[False]
    add_generation_prompt: Literal[False]
    shuffle: bool
    num_workers: int = Field(ge=0)
    train: DatasetEntry
    validation: None = None


class SFT(_Strict):
    max_num_epochs: int = Field(gt=0)
    max_num_steps: int = Field(gt=0)
    val_period: int = Field(ge=0)
    val_batches: int = Field(ge=0)
    val_global_batch_size: int = Field(gt=0)
    val_micro_batch_size: int = Field(gt=0)
    val_at_start: bool
    val_at_end: bool
    seed: int
    only_unmask_final: bool = False


class DPO(_Strict):
    """NeMo-RL's ``dpo`` section (DPOConfig at v0.7.0): the loop's schedule and the sigmoid DPO loss."""

    max_num_epochs: int = Field(gt=0)
    max_num_steps: int = Field(gt=0)
    val_period: int = Field(ge=0)
    val_batches: int = Field(ge=0)
    val_global_batch_size: int = Field(gt=0)
    val_micro_batch_size: int = Field(gt=0)
    val_at_start: bool
    val_at_end: bool
    seed: int
    reference_policy_kl_penalty: float = Field(gt=0)
    preference_average_log_probs: bool
    sft_average_log_probs: bool
    preference_loss_weight: float = Field(ge=0)
    sft_loss_weight: float = Field(ge=0)


class Checkpointing(_Strict):
    enabled: bool
    checkpoint_dir: str
    metric_name: str | None
    higher_is_better: bool
    keep_top_k: int | None
    save_period: int = Field(gt=0)
    checkpoint_must_save_by: str | None = None
    save_optimizer: bool = True


class Wandb(_Strict):
    project: str
    name: str


class Tensorboard(_Strict):
    log_dir: str


class Mlflow(_Strict):
    experiment_name: str
    run_name: str
    tracking_uri: str | None


class GpuMonitoring(_Strict):
    collection_interval: int = Field(gt=0)
    flush_interval: int = Field(gt=0)


class Logger(_Strict):
    log_dir: str
    wandb_enabled: bool
    tensorboard_enabled: bool
    mlflow_enabled: bool
    swanlab_enabled: bool
    monitor_gpus: bool
    wandb: Wandb
    swanlab: Wandb
    tensorboard: Tensorboard
    mlflow: Mlflow
    gpu_monitoring: GpuMonitoring


class Cluster(_Strict):
    gpus_per_node: int = Field(gt=0)
    num_nodes: int = Field(gt=0)
    segment_size: int | None = None


class NemoRLSFTConfig(_Strict):
    """The whole file: NeMo-RL's SFT MasterConfig sections, nothing else."""

    policy: Policy
    data: Data
    sft: SFT
    checkpointing: Checkpointing
    logger: Logger
    cluster: Cluster


class DPOPolicy(Policy):
    """The SFT policy section, with what NeMo-RL's ``dpo.setup`` asserts: no sequence packing (nor dynamic batching,
    already off in :class:`Policy`): anything that reorders a batch would split a (chosen, rejected) pair."""

    sequence_packing: Disabled


class NemoRLDPOConfig(_Strict):
    """The whole DPO file: NeMo-RL's DPO MasterConfig sections, nothing else."""

    policy: DPOPolicy
    data: DPOData
    dpo: DPO
    checkpointing: Checkpointing
    logger: Logger
    cluster: Cluster


NemoRLConfig = NemoRLSFTConfig | NemoRLDPOConfig


def algorithm(cfg: NemoRLConfig) -> tuple[str, SFT | DPO]:
    """The algorithm's section name and its parsed section (``sft`` or ``dpo``)."""
    return ("dpo", cfg.dpo) if isinstance(cfg, NemoRLDPOConfig) else ("sft", cfg.sft)


def _key(loc: tuple) -> str:
    # Drop pydantic's union-member tags (policy.megatron_cfg.Megatron.x -> policy.megatron_cfg.x).
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p[:1].isupper()))


def validate_nemo_rl(config: dict[str, Any], spec: AliaSpec | None = None) -> NemoRLConfig:
    """Check ``config`` against the mirror (the DPO one when it has a ``dpo`` section) and, with the model's
    ``spec``, the parallel layout."""
    mirror = NemoRLDPOConfig if "dpo" in config else NemoRLSFTConfig
    try:
        parsed = mirror.model_validate(config)
    except ValidationError as exc:
        seen: dict[str, str] = {}
        for e in exc.errors():
            key = _key(e["loc"])
            msg = "unknown key (NeMo-RL v0.7 does not read it)" if e["type"] == "extra_forbidden" else e["msg"]
            seen.setdefault(key, msg)
        raise NemoRLConfigError(
            "compiled NeMo-RL config is invalid:\n  " + "\n  ".join(f"{k}: {m}" for k, m in seen.items())
        ) from None
    problems = layout_problems(parsed, spec)
    if problems:
        raise NemoRLConfigError("parallel layout would fail on the GPUs:\n  " + "\n  ".join(problems))
    return parsed


def parallel_sizes(cfg: NemoRLConfig) -> dict[str, int]:
    """TP, PP, CP and the data-parallel size that the cluster leaves."""
    p = cfg.policy
    if isinstance(p.megatron_cfg, Megatron):
        m = p.megatron_cfg
        tp, pp, cp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.context_parallel_size
    elif isinstance(p.dtensor_cfg, DTensor):
        tp, pp, cp = p.dtensor_cfg.tensor_parallel_size, 1, p.dtensor_cfg.context_parallel_size
    else:
        tp = pp = cp = 1
    world = cfg.cluster.gpus_per_node * cfg.cluster.num_nodes
    return {"world": world, "tp": tp, "pp": pp, "cp": cp, "dp": data_parallel_size(world, tp, pp, cp) if world else 0}


def model_split_problems(cfg: NemoRLConfig, spec: AliaSpec, tp: int, pp: int) -> list[str]:
    """How TP and PP must divide the model: attention and KV heads, layers (even or uneven pipeline stages)."""
    p, out = cfg.policy, []
    megatron = isinstance(p.megatron_cfg, Megatron)
    if spec.num_attention_heads % tp or spec.num_key_value_heads % tp:
        out.append(
            f"tensor parallel size {tp} must divide the attention heads ({spec.num_attention_heads}) and KV heads "
            f"({spec.num_key_value_heads}) of {spec.name}; use a divisor of {spec.num_key_value_heads}"
        )
    if megatron:
        m = p.megatron_cfg
        first, last = m.num_layers_in_first_pipeline_stage, m.num_layers_in_last_pipeline_stage
        if first is None and last is None:
            if spec.num_layers % pp:
                out.append(
                    f"pipeline parallel size {pp} does not divide {spec.num_layers} layers of {spec.name}; "
                    "pick a divisor or set num_layers_in_first/last_pipeline_stage"
                )
        else:
            middle_stages = pp - (first is not None) - (last is not None)
            rest = spec.num_layers - (first or 0) - (last or 0)
            if (
                middle_stages < 0
                or rest < 0
                or (middle_stages and rest % middle_stages)
                or (not middle_stages and rest)
            ):
                out.append(
                    f"uneven pipeline: first={first}, last={last} layers leave {rest} layers for {middle_stages} "
                    f"middle stage(s) of {spec.name}'s {spec.num_layers}; they must split evenly"
                )
    return out


def layout_problems(cfg: NemoRLConfig, spec: AliaSpec | None) -> list[str]:
    """Every cross-field rule the layout breaks, each with the keys involved and a fix."""
    p, out = cfg.policy, []
    megatron, dtensor = isinstance(p.megatron_cfg, Megatron), isinstance(p.dtensor_cfg, DTensor)
    if megatron == dtensor:
        out.append("exactly one of policy.megatron_cfg.enabled and policy.dtensor_cfg.enabled must be true")
        return out
    s = parallel_sizes(cfg)
    tp, pp, cp, world = s["tp"], s["pp"], s["cp"], s["world"]
    if world % (tp * pp * cp):
        out.append(
            f"cluster has {world} GPUs, not a multiple of TP x PP x CP = {tp * pp * cp}; change the parallel sizes "
            "or cluster.num_nodes/gpus_per_node"
        )
        return out
    dp, gbs, mbs = s["dp"], p.train_global_batch_size, p.train_micro_batch_size
    if gbs % (dp * mbs):
        out.append(
            f"policy.train_global_batch_size={gbs} is not divisible by data-parallel size {dp} x "
            f"policy.train_micro_batch_size={mbs} = {dp * mbs}; pick a global batch that is a multiple of {dp * mbs}"
        )
    if spec is not None:
        out += model_split_problems(cfg, spec, tp, pp)
    seq, div = p.max_total_sequence_length, p.make_sequence_length_divisible_by
    if seq % (cp * tp):
        out.append(f"policy.max_total_sequence_length={seq} is not divisible by CP x TP = {cp * tp}")
    need = sequence_divisor(tp, cp)
    if div % need:
        out.append(f"policy.make_sequence_length_divisible_by={div} must be a multiple of {need} (2 x CP x TP with CP)")
    if seq % div:
        out.append(
            f"policy.max_total_sequence_length={seq} is not a multiple of make_sequence_length_divisible_by={div}"
        )
    packing = isinstance(p.sequence_packing, Packing)
    name, algo = algorithm(cfg)
    if megatron and cp > 1 and not packing:
        out.append(
            "Megatron context parallelism needs sequence packing, which NeMo-RL's DPO refuses: DPO layouts use "
            "engine.context_parallel=1"
            if name == "dpo"
            else "Megatron context parallelism needs sequence packing: set engine.sequence_packing=true"
        )
    if dtensor and cp > 1 and packing:
        out.append("DTensor context parallelism does not work with sequence packing: set engine.sequence_packing=false")
    seq_parallel = p.megatron_cfg.sequence_parallel if megatron else p.dtensor_cfg.sequence_parallel
    if seq_parallel and tp == 1:
        out.append("sequence parallelism needs tensor parallel size > 1: set engine.sequence_parallel=false")
    if p.logprob_chunk_size and not (megatron and p.megatron_cfg.defer_fp32_logits):
        out.append("policy.logprob_chunk_size needs the Megatron backend with megatron_cfg.defer_fp32_logits=true")
    if megatron and p.optimizer is not None:
        out.append("policy.optimizer must be null with the Megatron backend (it reads megatron_cfg.optimizer)")
    if dtensor and p.optimizer is None:
        out.append("policy.optimizer is required with the DTensor backend")
    if packing and p.sequence_packing.train_mb_tokens < seq:
        out.append(f"policy.sequence_packing.train_mb_tokens must hold one full sequence ({seq} tokens)")
    if cfg.data.max_input_seq_length > seq:
        out.append(
            f"data.max_input_seq_length={cfg.data.max_input_seq_length} exceeds policy.max_total_sequence_length={seq}"
        )
    if algo.val_period and algo.val_global_batch_size % (dp * algo.val_micro_batch_size):
        out.append(
            f"{name}.val_global_batch_size={algo.val_global_batch_size} must be a multiple of data-parallel size "
            f"{dp} x {name}.val_micro_batch_size={algo.val_micro_batch_size}"
        )
    return out
