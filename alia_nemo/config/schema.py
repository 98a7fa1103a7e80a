"""Our configuration schema: every section forbids unknown keys and checks types and ranges.

Hydra composes YAML; this schema validates the result so a typo or a wrong type fails before any
work starts, with a message that names the dotted key.
"""

from __future__ import annotations

import re
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alia_nemo.errors import ConfigError
from alia_nemo.model.architectures import ARCHITECTURES, RopeSettings


def _plain_name(value: str) -> str:
    # Names become directory names (caches, runs): a path here would write outside its root.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value) or ".." in value:
        raise ValueError(f"{value!r} is not a plain name: use letters, digits, '.', '_' and '-' (no '/', no '..')")
    return value


PlainName = Annotated[str, AfterValidator(_plain_name)]


class _Section(BaseModel):
    # inf and nan are never meaningful settings (stage.lr=inf trains a model of NaNs)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    factor: float | None = Field(
        None, gt=0, description="llama3 scaling factor (null: stage.seq_length / original_max_position_embeddings)"
    )
    original_max_position_embeddings: int = Field(4096, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    theta: float | None = Field(None, gt=0)

    def settings(self) -> RopeSettings:
        return RopeSettings(**{**self.model_dump(), "factor": self.factor or 1.0})


class DPOSettings(_Section):
    """Direct preference optimisation (sigmoid loss) against a frozen reference model: the stage's start model."""

    beta: float = Field(
        0.1, gt=0, description="how strongly the policy is held to the reference (NeMo-RL: reference_policy_kl_penalty)"
    )
    average_log_probs: bool = Field(
        False, description="mean instead of sum of the answer's token log-probabilities (length-normalised DPO)"
    )
    sft_loss_weight: float = Field(0.0, ge=0, description="weight of an NLL loss on the chosen answers (0: pure DPO)")
    preference_loss_weight: float = Field(1.0, ge=0, description="weight of the DPO loss itself")

    @model_validator(mode="after")
    def _some_loss(self) -> DPOSettings:
        if self.sft_loss_weight == 0 and self.preference_loss_weight == 0:
            raise ValueError("sft_loss_weight and preference_loss_weight are both 0: nothing would be trained")
        return self


class StageConfig(_Section):
    name: str
    kind: Literal["sft", "cpt", "dpo"] = Field(
        "sft", description="sft (chat, assistant tokens), cpt (plain text, all) or dpo (preference pairs)"
    )
    seq_length: int = Field(gt=0, description="longest training sequence in tokens (CPT: the window length)")
    lr: float = Field(gt=0, le=1)
    lr_scheduler: Literal["constant", "cosine"]
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    # below ~1e-12 the epsilon vanishes next to fp32/bf16 second moments and AdamW divides by zero (NaN)
    adam_eps: float = Field(1e-8, ge=1e-12, le=1e-2)
    grad_clip: float = Field(1.0, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(
        None, gt=0, description="stop after this many optimizer steps (null: epochs; CPT: token_budget)"
    )
    global_batch_size: int | None = Field(
        None, gt=0, description="sequences per optimizer step, over all workers (CPT null: from tokens_per_update)"
    )
    micro_batch_size: int = Field(gt=0, description="sequences per worker per forward/backward")
    token_budget: int | None = Field(None, gt=0, description="CPT: tokens to train on (sets max_steps)")
    tokens_per_update: int | None = Field(None, gt=0, description="CPT: target tokens per optimizer step")
    rope: RopeConfig = RopeConfig()
    dpo: DPOSettings | None = Field(None, description="DPO stages only: the preference loss (null: its defaults)")

    @model_validator(mode="after")
    def _complete(self) -> StageConfig:
        if self.kind == "dpo" and self.dpo is None:
            object.__setattr__(self, "dpo", DPOSettings())
        if self.kind != "dpo" and self.dpo is not None:
            raise ValueError(f"stage.dpo applies to DPO stages; this stage has kind={self.kind}: remove stage.dpo")
        if self.rope.type == "llama3" and self.rope.factor is None:
            # Llama-3.1-style default: scale by how much longer the stage is than the original context.
            factor = self.seq_length / self.rope.original_max_position_embeddings
            object.__setattr__(self.rope, "factor", factor)
        if self.kind in ("sft", "dpo") and self.global_batch_size is None:
            raise ValueError(f"stage.global_batch_size is required for {self.kind.upper()} stages")
        if self.kind == "cpt" and self.global_batch_size is None and self.tokens_per_update is None:
            raise ValueError("a CPT stage needs stage.tokens_per_update (or an explicit stage.global_batch_size)")
        return self


class DataConfig(_Section):
    """Conversations straight from messages-JSONL files, tokenised at train time (the quick path)."""

    name: PlainName
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
    adapter: str = Field(description="source adapter from alia_nemo.data.adapters.ADAPTERS")
    origin: OriginConfig
    counts: dict[Language, int] = Field(description="conversations per language, from the model card")
    options: dict[str, Any] = Field(default_factory=dict, description="adapter options")

    @field_validator("adapter")
    @classmethod
    def _known_adapter(cls, v: str) -> str:
        from alia_nemo.data.adapters import ADAPTERS, PROMPT_ADAPTERS

        usable = sorted(set(ADAPTERS) - PROMPT_ADAPTERS)
        if v not in usable:
            why = "yields prompts, not conversations" if v in PROMPT_ADAPTERS else "is not an adapter"
            raise ValueError(f"{v!r} {why}; a mixture dataset takes one of {usable}")
        return v

    @field_validator("counts")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        if not v or any(n < 0 for n in v.values()):
            raise ValueError("counts must be a non-empty mapping of language -> non-negative count")
        return v


# The quality filter's default criteria: Prometheus-2's absolute grading wants one "Score n:" line per point of
# the scale, so the judge anchors its integer to a description rather than to a bare number.
DEFAULT_QUALITY_RUBRIC = (
    "[Is the response a helpful, correct and well-written answer to the instruction, in the instruction's language, "
    "that a model should learn to imitate?]\n"
    "Score 1: The response is wrong, off-topic, harmful, truncated, or in another language than the instruction.\n"
    "Score 2: The response addresses the instruction but has major errors or omissions, or is hard to follow.\n"
    "Score 3: The response is acceptable: mostly correct and relevant, with noticeable flaws in accuracy, "
    "completeness or style.\n"
    "Score 4: The response is correct, relevant and clear, with only minor flaws.\n"
    "Score 5: The response is correct, complete, clear and well organised: an exemplary answer to imitate."
)


class QualityFilterConfig(_Section):
    """An LLM judge (Prometheus-2 style) scores each candidate conversation; rows below ``threshold`` are dropped.

    Everything that changes a score (model, rubric, scale) or the selection (threshold, on_unscored) enters the
    mixture's cache key; where the judge is served and how it is called (endpoint, concurrency, timeouts, the
    score cache's place) does not: the same judge model behind another URL gives the same scores.
    """

    endpoint: str = Field(
        pattern=r"^https?://[^/\s]+", description="OpenAI-compatible base URL of the judge, e.g. http://judge:8000/v1"
    )
    model: str = Field("prometheus-eval/prometheus-8x7b-v2.0", description="the model name the judge server exposes")
    rubric: str = Field(DEFAULT_QUALITY_RUBRIC, min_length=1, description="criteria with one 'Score n:' line per point")
    min_score: int = Field(1, description="lowest score of the scale")
    max_score: int = Field(5, description="highest score of the scale")
    threshold: int = Field(description="rows scoring >= threshold are kept; lower scores are dropped and counted")
    concurrency: int = Field(8, ge=1, le=256, description="judge requests in flight at once")
    timeout_s: float = Field(600.0, gt=0, description="longest wait for one judgement")
    retries: int = Field(3, ge=0, description="retries of a request on connection errors, timeouts, HTTP 5xx/429")
    on_unscored: Literal["drop", "keep"] = Field(
        "drop", description="a judgement without a valid score: drop the row (counted by reason) or keep it (counted)"
    )
    cache_dir: str | None = Field(None, description="where scores are cached (null: <prepared_root>/quality-scores)")

    @model_validator(mode="after")
    def _scale(self) -> QualityFilterConfig:
        if self.min_score >= self.max_score:
            raise ValueError(f"min_score {self.min_score} must be below max_score {self.max_score}")
        if not self.min_score <= self.threshold <= self.max_score:
            raise ValueError(f"threshold {self.threshold} is outside the scale {self.min_score}-{self.max_score}")
        # A rubric without its score lines leaves the judge guessing what each number means (and parse_score
        # would still accept its integers): refuse it rather than filter on an unanchored scale.
        missing = [n for n in range(self.min_score, self.max_score + 1)
                   if not re.search(rf"(?m)^\s*Score {n}\s*:", self.rubric)]  # fmt: skip
        if missing:
            raise ValueError(
                f"rubric has no 'Score n:' line for {missing}: give one line per point of the scale "
                f"{self.min_score}-{self.max_score}, Prometheus style ('Score {missing[0]}: <what it means>')"
            )
        return self


class MixtureConfig(_Section):
    """A weighted mixture: exact counts per dataset and language, prepared once by ``alia-nemo prepare``."""

    name: PlainName
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
    quality_filter: QualityFilterConfig | None = Field(
        None, description="LLM-judge quality filter of candidate conversations (null: off)"
    )
    workers: int = Field(
        0, ge=0, description="parallel prepare workers (0: auto; 1: in-process); never changes the result"
    )


class CorpusSourceConfig(_Section):
    """One plain-text source of a CPT corpus: local files or a hub dataset, streamed."""

    kind: Literal["local", "hf"]
    files: list[str] | None = Field(None, description="JSONL / Parquet / Arrow files; glob patterns allowed")
    path: str | None = Field(None, description="hub dataset id (kind=hf), read with streaming")
    name: str | None = Field(None, description="hub config name")
    split: str = "train"
    revision: str | None = None
    text_field: str = Field("text", description="the column / key holding the document text")
    weight: float = Field(1.0, gt=0, description="share of the token budget (normalised over sources)")
    language: str | None = Field(None, description="language tag recorded per document (null: mixed / unknown)")

    @model_validator(mode="after")
    def _has_a_place(self) -> CorpusSourceConfig:
        if self.kind == "local" and not self.files:
            raise ValueError("kind=local needs files")
        if self.kind == "hf" and not self.path:
            raise ValueError("kind=hf needs path (hub dataset id)")
        return self


class TextCorpusConfig(_Section):
    """A token-packed plain-text corpus for continued pretraining: windows of exactly stage.seq_length."""

    name: PlainName
    format: Literal["text_corpus"]
    prepared_root: str = Field(description="where packed corpora are cached, one directory per input hash")
    sources: dict[str, CorpusSourceConfig] = Field(min_length=1)
    add_bos: bool = Field(True, description="start each document with BOS (it always ends with EOS)")
    min_chars: int = Field(1, ge=1, description="documents with fewer characters are dropped (and counted)")
    tail: Literal["drop", "pad"] = Field("drop", description="the last, partial window: drop it or pad it")
    on_shortfall: Literal["error", "repeat", "take_all"] = Field(
        "error", description="a source with fewer tokens than its share: stop, read it again, or take what there is"
    )
    val_windows: int = Field(0, ge=0, description="windows held out for validation (the first ones packed)")
    max_tokens: int | None = Field(None, gt=0, description="tokens to pack (null: the stage's token budget)")
    workers: int = Field(
        0, ge=0, description="parallel prepare workers (0: auto; 1: in-process); never changes the result"
    )


class PreferenceDatasetConfig(_Section):
    """One source of preference pairs: a public set through its adapter, or local JSONL in our pair format."""

    licence: str
    adapter: str = Field(description="pair adapter from alia_nemo.data.preference_adapters.PREFERENCE_ADAPTERS")
    origin: OriginConfig
    counts: dict[Language, int] = Field(description="pairs per language to select")
    options: dict[str, Any] = Field(default_factory=dict, description="adapter options")

    @field_validator("adapter")
    @classmethod
    def _known_adapter(cls, v: str) -> str:
        from alia_nemo.data.preference_adapters import PREFERENCE_ADAPTERS

        if v not in PREFERENCE_ADAPTERS:
            raise ValueError(f"{v!r} is not a preference adapter; choose one of {sorted(PREFERENCE_ADAPTERS)}")
        return v

    @field_validator("counts")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        if not v or any(n < 0 for n in v.values()):
            raise ValueError("counts must be a non-empty mapping of language -> non-negative count")
        return v


class PreferenceConfig(_Section):
    """Preference pairs (a shared prompt, a chosen and a rejected answer) for a DPO stage, prepared once."""

    name: PlainName
    format: Literal["preference"]
    internal_dir: str = Field(description="directory of the internal (non-public) sets")
    prepared_root: str = Field(description="where prepared pair sets are cached, one directory per input hash")
    on_shortfall: Literal["error", "repeat", "take_all"] = Field(
        "error", description="a source with fewer usable pairs than asked: stop, repeat pairs, or take what there is"
    )
    allow_missing_internal: bool = Field(False, description="build without missing internal files (recorded)")
    exclude_licenses: list[str] = Field(default_factory=list, description="datasets under these licences are left out")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="validation pairs per dataset and language (extra)")
    max_tokens: int | None = Field(
        None, gt=0, description="longest prompt + answer kept, for chosen and rejected alike (null: stage.seq_length)"
    )
    datasets: dict[str, PreferenceDatasetConfig] = Field(min_length=1)


AnyDataConfig = Annotated[
    DataConfig | MixtureConfig | TextCorpusConfig | PreferenceConfig, Field(discriminator="format")
]
DATA_FORMATS = ("messages_jsonl", "mixture", "text_corpus", "preference")


class EngineConfig(_Section):
    """The local engine: Ray Train workers running transformers' Trainer (CPU or GPU)."""

    name: Literal["local"] = Field("local", description="local (Ray Train + transformers) or nemo_rl")
    num_workers: int = Field(1, gt=0, description="data-parallel training workers")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(None, gt=0, description="intra-op threads per worker (null: CPUs / workers)")
    ray_address: str | None = Field(None, description="existing Ray cluster; null: RAY_ADDRESS or in-process Ray")


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
    recompute_granularity: Literal["full", "selective"] = Field(
        "full", description="with activation checkpointing: recompute whole layers, or only attention (Megatron)"
    )
    sequence_packing: bool = Field(False, description="pack several conversations into each micro-batch")
    cpu_offload: bool = Field(False, description="DTensor only: offload parameters to CPU")
    dtensor_worker: Literal["v2", "v1"] = Field(
        "v2", description="DTensor only: NeMo-RL's policy worker (v2: NeMo AutoModel, upstream's default; v1: plain)"
    )
    ray_address: str | None = Field(None, description="existing Ray cluster; null: RAY_ADDRESS or a local one")
    val_batches: int = Field(8, ge=0, description="validation batches per evaluation (0: the whole set)")
    val_global_batch_size: int | None = Field(None, gt=0, description="null: stage.global_batch_size")
    val_micro_batch_size: int = Field(1, gt=0)
    val_at_start: bool = False
    dataloader_workers: int = Field(1, ge=0)
    logger: NemoRLLoggerConfig = NemoRLLoggerConfig()


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
    ram_gb: float = Field(
        0.0, ge=0, description="host memory per node, GB (1e9 bytes); DPO's reference weights live there (0: unchecked)"
    )


# Validations per run that run.eval_every=auto aims at: enough points for a curve, few enough to cost little.
AUTO_VALIDATIONS = 10


class RunConfig(_Section):
    output_dir: str = Field(description="the run's own directory (created; locked while training)")
    seed: int = 42
    save_every: int = Field(50, gt=0, description="checkpoint every N optimizer steps (and always at the end)")
    keep_checkpoints: int | None = Field(3, gt=0, description="newest checkpoints kept (null: all)")
    log_every: int = Field(1, gt=0, description="metrics (JSONL, TensorBoard) every N optimizer steps")
    print_every: int = Field(20, gt=0, description="a progress line on the console every N optimizer steps")
    # "auto" so that every stage draws a validation curve (several points, not one at the end) without each stage
    # or recipe choosing a number; config.resolve turns it into steps (ResolvedStage.eval_every).
    eval_every: Annotated[int, Field(gt=0)] | Literal["auto"] | None = Field(
        "auto",
        description=f"validation every N steps and at the end (auto: about {AUTO_VALIDATIONS} times per run, from the "
        "resolved steps; null: only at the end)",
    )
    resume: bool | Literal["force"] = Field(
        True,
        description="continue from the newest checkpoint in output_dir (force: even under a changed configuration)",
    )

    @field_validator("eval_every", mode="before")
    @classmethod
    def _eval_period(cls, v: Any) -> Any:
        # Before the union's own checks, which would report one failure per member (int, 'auto') instead of one line.
        if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError(
            f"takes a number of steps (> 0), auto (about {AUTO_VALIDATIONS} validations per run) or null (only at the "
            "end)"
        )

    @field_validator("output_dir")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():  # an empty path is the current directory: the run would litter it
            raise ValueError("run.output_dir is empty; give the run a directory of its own (run.output_dir=outputs/x)")
        return v


class AliaConfig(_Section):
    recipe: str | None = None
    model: ModelConfig
    stage: StageConfig
    data: AnyDataConfig
    engine: AnyEngineConfig
    cluster: ClusterConfig
    run: RunConfig

    @model_validator(mode="after")
    def _consistent(self) -> AliaConfig:
        from alia_nemo.config.resolve import resolve
        from alia_nemo.data.sources import source_for

        kind = source_for(self.data).stage_kind
        if self.stage.kind != kind:
            raise ValueError(
                f"stage.kind={self.stage.kind} does not go with data.format={self.data.format}: SFT stages take "
                "conversations (data=sample, data=sft_mixture), CPT stages a text corpus (data=cpt_sample, ...), "
                "DPO stages preference pairs (data=dpo_sample, data=preference_mixture)"
            )
        resolve(self)  # the layout and batch divide, the data fills a batch: one set of rules (config.resolve)
        return self


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


def _variants(annotation: Any, value: Any) -> list[Any]:
    """The types ``annotation`` allows for ``value``: Annotated and Optional unwrapped, a union's members, and of a
    discriminated union only the members whose literal tags (``data.format``, ``engine.name``) ``value`` matches."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _variants(get_args(annotation)[0], value)
    if origin in (Union, UnionType):
        members = [v for arg in get_args(annotation) if arg is not type(None) for v in _variants(arg, value)]
        if isinstance(value, dict):
            tagged = [m for m in members if _tags_match(m, value)]
            return tagged or members
        return members
    return [annotation]


def _tags_match(member: Any, value: dict[str, Any]) -> bool:
    if not (isinstance(member, type) and issubclass(member, BaseModel)):
        return False
    for name, info in member.model_fields.items():
        if get_origin(info.annotation) is Literal and name in value and value[name] not in get_args(info.annotation):
            return False
    return True


def schema_knows(dotted: str, data: dict[str, Any]) -> bool:
    """Whether the schema has the key ``dotted`` in a configuration composed as ``data`` (which picks the variant of
    ``data`` and ``engine``); how ``~key`` tells "not in any YAML, its default applies" from a misspelt key."""
    candidates: list[Any] = [AliaConfig]
    value: Any = data
    for part in dotted.split("."):
        following: list[Any] = []
        for node in (v for c in candidates for v in _variants(c, value)):
            if isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
                following.append(node.model_fields[part].annotation)
            elif get_origin(node) is dict:  # a mapping's keys are names the config chooses (datasets, sources)
                following.append(get_args(node)[1])
        if not following:
            return False
        candidates = following
        value = value.get(part) if isinstance(value, dict) else None
    return True
