"""Our configuration schema: every section forbids unknown keys and checks types and ranges.

Hydra composes YAML; this schema validates the result so a typo or a wrong type fails before any
work starts, with a message that names the dotted key.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alia_nemo.architectures import ARCHITECTURES, RopeSettings


class ConfigError(ValueError):
    """A configuration that can not be used; the message names each bad key and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    arch: str = Field(description="ALIA size from the registry: alia_tiny, alia_2b, alia_7b, alia_40b")
    pretrained: str | None = Field(None, description="weights to start from (HF dir or hub id); null = random init")
    tokenizer: str = Field("builtin:test", description="'builtin:test' or a tokenizer dir / hub id")
    allow_download: bool = Field(False, description="let hub ids be downloaded (compute nodes are usually offline)")
    dtype: Literal["float32", "bfloat16"] = "float32"

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {v!r}; choose one of {sorted(ARCHITECTURES)}")
        return v


class RopeConfig(_Section):
    type: Literal["none", "llama3", "theta"] = "none"
    factor: float = Field(1.0, gt=0)
    original_max_position_embeddings: int = Field(4096, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    theta: float | None = Field(None, gt=0)

    def settings(self) -> RopeSettings:
        return RopeSettings(**self.model_dump())


class StageConfig(_Section):
    name: str
    kind: Literal["sft"] = Field("sft", description="sft (CPT stages arrive with the long-context issue)")
    seq_length: int = Field(gt=0, description="longest training sequence in tokens")
    lr: float = Field(gt=0)
    lr_scheduler: Literal["constant", "cosine"]
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (null: epochs)")
    global_batch_size: int = Field(gt=0, description="sequences per optimizer step, over all workers")
    micro_batch_size: int = Field(gt=0, description="sequences per worker per forward/backward")
    rope: RopeConfig = RopeConfig()


class DataConfig(_Section):
    """Conversations straight from messages-JSONL files, tokenised at train time (the quick path)."""

    name: str
    format: Literal["messages_jsonl"] = "messages_jsonl"
    files: list[str] = Field(min_length=1, description="JSONL files with {'messages': [...]} rows")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="share of conversations held out for validation")
    on_invalid: Literal["error", "drop"] = Field(
        "error", description="malformed conversation: stop (error) or drop it and count the reason (drop)"
    )


LANGUAGES = ("ca", "en", "es", "eu", "gl", "pt")
Language = Literal["ca", "en", "es", "eu", "gl", "pt"]


class OriginConfig(_Section):
    """Where a dataset's rows come from: the hub (or its local cache) or local files."""

    kind: Literal["hf", "local"]
    path: str | None = Field(None, description="hub dataset id (kind=hf)")
    name: str | None = Field(None, description="hub config name")
    configs: list[str] | None = Field(None, description="several hub configs read together (e.g. FLORES languages)")
    split: str = "train"
    revision: str | None = Field(None, description="hub revision (commit or tag) for reproducible builds")
    files: list[str] | None = Field(None, description="local JSONL/Parquet files in the source's own schema")

    @model_validator(mode="after")
    def _has_a_place(self) -> OriginConfig:
        if self.kind == "hf" and not (self.path or self.files):
            raise ValueError("origin.kind=hf needs origin.path (hub id) or origin.files (local copies)")
        if self.kind == "local" and not self.files:
            raise ValueError("origin.kind=local needs origin.files")
        return self


class MixtureDatasetConfig(_Section):
    licence: str
    adapter: str = Field(description="source adapter from alia_nemo.sft_sources.ADAPTERS")
    origin: OriginConfig
    counts: dict[Language, int] = Field(description="conversations per language, from the model card")
    options: dict[str, Any] = Field(default_factory=dict, description="adapter options")

    @field_validator("counts")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        if not v or any(n < 0 for n in v.values()):
            raise ValueError("counts must be a non-empty mapping of language -> non-negative count")
        return v


class MixtureConfig(_Section):
    """A weighted mixture: exact counts per dataset and language, prepared once by ``alia-nemo prepare``."""

    name: str
    format: Literal["mixture"]
    internal_dir: str = Field(description="directory of the internal (non-public) sets")
    prepared_root: str = Field(description="where prepared mixtures are cached, one directory per input hash")
    on_shortfall: Literal["error", "repeat", "take_all"] = Field(
        "error", description="a source with fewer usable rows than asked: stop, repeat rows, or take what there is"
    )
    allow_missing_internal: bool = Field(False, description="build without missing internal files (recorded)")
    exclude_licenses: list[str] = Field(default_factory=list, description="datasets under these licences are left out")
    val_fraction: float = Field(0.005, ge=0, lt=1, description="validation rows per dataset and language (extra)")
    max_tokens: int | None = Field(None, gt=0, description="longest conversation kept (null: stage.seq_length)")
    datasets: dict[str, MixtureDatasetConfig] = Field(min_length=1)


AnyDataConfig = Annotated[DataConfig | MixtureConfig, Field(discriminator="format")]
DATA_FORMATS = ("messages_jsonl", "mixture")


class EngineConfig(_Section):
    """The local engine: Ray Train workers running transformers' Trainer (CPU or GPU)."""

    name: Literal["local"] = Field("local", description="local (Ray Train + transformers) or nemo_rl")
    num_workers: int = Field(1, gt=0, description="data-parallel training workers")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(None, gt=0, description="intra-op threads per worker (null: CPUs / workers)")
    ray_address: str | None = Field(None, description="existing Ray cluster; null: RAY_ADDRESS or in-process Ray")

    def data_parallel_size(self, cluster: ClusterConfig) -> int:
        return self.num_workers


class NemoRLLoggerConfig(_Section):
    tensorboard: bool = True
    wandb: bool = False
    mlflow: bool = False
    wandb_project: str = "alia-nemo"
    mlflow_tracking_uri: str | None = Field(None, description="MLflow server (null: a local ./mlruns store)")
    monitor_gpus: bool = True


class NemoRLEngineConfig(_Section):
    """NeMo-RL v0.7 on GPUs: ``alia-nemo compile`` turns these keys into its SFT config."""

    name: Literal["nemo_rl"]
    backend: Literal["megatron", "dtensor"] = Field("megatron", description="Megatron-core or DTensor (FSDP2)")
    tensor_parallel: int = Field(1, gt=0)
    pipeline_parallel: int = Field(1, gt=0, description="Megatron only")
    context_parallel: int = Field(1, gt=0)
    sequence_parallel: bool = Field(False, description="shard activations along the sequence across TP ranks")
    first_pipeline_stage_layers: int | None = Field(None, gt=0, description="uneven PP: layers on the first stage")
    last_pipeline_stage_layers: int | None = Field(None, gt=0, description="uneven PP: layers on the last stage")
    activation_checkpointing: bool = False
    sequence_packing: bool = Field(False, description="pack several conversations into each micro-batch")
    cpu_offload: bool = Field(False, description="DTensor only: offload parameters to CPU")
    ray_address: str | None = Field(None, description="existing Ray cluster; null: RAY_ADDRESS or a local one")
    val_batches: int = Field(8, ge=0, description="validation batches per evaluation (0: the whole set)")
    val_global_batch_size: int | None = Field(None, gt=0, description="null: stage.global_batch_size")
    val_micro_batch_size: int = Field(1, gt=0)
    val_at_start: bool = False
    dataloader_workers: int = Field(1, ge=0)
    logger: NemoRLLoggerConfig = NemoRLLoggerConfig()

    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel_size(self, cluster: ClusterConfig) -> int:
        return max(1, cluster.num_nodes * cluster.gpus_per_node // self.model_parallel_size())


AnyEngineConfig = Annotated[EngineConfig | NemoRLEngineConfig, Field(discriminator="name")]
ENGINE_NAMES = ("local", "nemo_rl")


class ClusterConfig(_Section):
    name: str
    num_nodes: int = Field(1, gt=0)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_node: int | None = Field(None, gt=0)
    gpu_name: str = "none"
    gpu_memory_gb: float = Field(0.0, ge=0, description="usable memory per GPU, GB (1e9 bytes)")
    gpu_peak_tflops: float = Field(0.0, ge=0, description="dense bf16 peak per GPU, TFLOP/s")


class RunConfig(_Section):
    output_dir: str
    seed: int = 42
    save_every: int = Field(50, gt=0, description="checkpoint every N optimizer steps (and always at the end)")
    keep_checkpoints: int | None = Field(3, gt=0, description="newest checkpoints kept (null: all)")
    log_every: int = Field(1, gt=0, description="metrics (JSONL, TensorBoard) every N optimizer steps")
    print_every: int = Field(20, gt=0, description="a progress line on the console every N optimizer steps")
    eval_every: int | None = Field(None, gt=0, description="validation every N steps (and at the end)")
    resume: bool = Field(True, description="continue from the newest checkpoint in output_dir")


class AliaConfig(_Section):
    recipe: str | None = None
    model: ModelConfig
    stage: StageConfig
    data: AnyDataConfig
    engine: AnyEngineConfig
    cluster: ClusterConfig
    run: RunConfig

    @model_validator(mode="after")
    def _batch_divides(self) -> AliaConfig:
        if self.engine.name == "nemo_rl":
            return self  # checked against the parallel layout by alia_nemo.nemo_rl.schema at compile time
        per_step = self.stage.micro_batch_size * self.engine.num_workers
        if self.stage.global_batch_size % per_step:
            raise ValueError(
                f"stage.global_batch_size={self.stage.global_batch_size} is not a multiple of "
                f"stage.micro_batch_size x engine.num_workers = {per_step}; change one of them"
            )
        return self

    @property
    def grad_accumulation(self) -> int:
        """Micro-batches each worker accumulates per optimizer step."""
        dp = self.engine.data_parallel_size(self.cluster)
        return self.stage.global_batch_size // (self.stage.micro_batch_size * dp)


def _describe(err: dict[str, Any]) -> str:
    # Drop the union tag pydantic puts after "data" (data.mixture.datasets... -> data.datasets...).
    tags = {"data": DATA_FORMATS, "engine": ENGINE_NAMES}
    loc = [p for i, p in enumerate(err["loc"]) if not (i == 1 and p in tags.get(err["loc"][0], ()))]
    key = ".".join(str(p) for p in loc) or "<root>"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key; remove it or fix its spelling (check `alia-nemo show`)"
    if err["type"] == "missing":
        return f"{key}: required key is missing; set it with {key}=VALUE"
    msg = err["msg"].removeprefix("Value error, ")
    return (
        f"{key}: {msg} (got {err.get('input')!r})"
        if "input" in err and not isinstance(err["input"], dict)
        else f"{key}: {msg}"
    )


def validate_config(data: dict[str, Any]) -> AliaConfig:
    """Validate a composed, resolved configuration; raise :class:`ConfigError` naming every bad key."""
    try:
        return AliaConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
