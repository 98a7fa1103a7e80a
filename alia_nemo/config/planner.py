"""Parallel layout planner: per-GPU memory and step time of an ALIA stage on a GPU cluster.

Every number is an estimate from a stated model, meant to rank layouts and to reject the ones that
can not fit before a job is submitted; calibrate the constants against measured runs.

Memory per GPU (bytes), for tensor (t), pipeline (p), context (c) and data (d) parallel sizes:
  weights        2 x params on the GPU (bf16)
  gradients      2 x params on the GPU (bf16)
  optimizer      12 x params (fp32 master + Adam m and v), / (d x c) with the distributed optimizer
  activations    per token per layer, bf16, counted from what a Llama layer keeps for backward
                 (RMSNorm inputs, Q/K/V, fused-attention output, SwiGLU gate/up/activation/product);
                 x tokens per micro-batch on the GPU (b x s / c) x layers on the stage x micro-batches
                 in flight (min(p, m) on the first 1F1B stage)
  logits + loss  b x s / c x V / t elements, as NeMo-RL v0.7's Megatron NLL path holds them: with
                 defer_fp32_logits and logprob_chunk_size C (what compile emits) 8 bytes (bf16 logits kept
                 for backward, their bf16 gradient, the packed-sequence slice gradient and its sum) plus a
                 24 x C x V / t fp32/int64 chunk workspace; without (NeMo-RL's default) 16 bytes (fp32 logits,
                 fp32 log-softmax, fp32 softmax kept for backward, fp32 gradient)
  allowance      FRAMEWORK_GB for CUDA context, NCCL and workspace, plus FRAGMENTATION of the rest
Step time: training FLOPs (6 x dense params per token, +2 more with full recompute, plus causal
attention 6 x L x h x s per token) over the GPUs' peak times an efficiency model (constants below).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import product
from typing import Any, Literal

from alia_nemo.model.architectures import AliaSpec

Recompute = Literal["none", "selective", "full"]

BF16 = 2
# Sequence positions per chunk of NeMo-RL's chunked log-probabilities (policy.logprob_chunk_size, with
# megatron_cfg.defer_fp32_logits): compile emits it, and the planner counts logits that way by default.
LOGPROB_CHUNK = 1024
FRAMEWORK_GB = 3.0  # CUDA context (~0.5 GB), NCCL buffers and cuBLAS/attention workspaces
FRAGMENTATION = 0.10  # PyTorch caching allocator slack on long runs

# Efficiency model. BASE_MFU: Megatron-LM reports 52% of peak for a 1T GPT on A100s (Narayanan et al.,
# SC21) and NVIDIA's Megatron-Core results for 70B-class Llama on H100 sit around 40-50%; we assume 0.45
# for a well-tuned dense layout and apply multiplicative penalties per dimension.
BASE_MFU = 0.45
TP_PENALTY = 0.04  # per doubling of TP inside a node (NVLink all-reduces of each layer)
CP_PENALTY = 0.03  # per doubling of CP (ring attention exchange, partly overlapped)
DP_PENALTY = 0.01  # per doubling of DP (gradient reduce-scatter overlapped with backward)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    dp: int
    micro_batch: int
    recompute: Recompute
    distributed_optimizer: bool = True
    sequence_parallel: bool = True

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


@dataclass(frozen=True)
class Gpu:
    memory_gb: float
    peak_tflops: float  # dense bf16


def data_parallel_size(world: int, tp: int, pp: int, cp: int) -> int:
    """Data-parallel replicas the model-parallel sizes leave of ``world`` GPUs (at least one)."""
    return max(1, world // (tp * pp * cp))


def sequence_divisor(tp: int, cp: int) -> int:
    """What every sequence length must be a multiple of: 2 x CP x TP with context parallelism (each CP rank
    takes two load-balanced chunks, each split over TP with sequence parallelism), else TP."""
    return 2 * cp * tp if cp > 1 else tp


def invalid_reasons(
    spec: AliaSpec, layout: Layout, seq_length: int, gpus_per_node: int, global_batch: int
) -> list[str]:
    """Why a layout can not run (empty when it can)."""
    t, p, c = layout.tp, layout.pp, layout.cp
    reasons = []
    if spec.num_attention_heads % t or spec.num_key_value_heads % t:
        reasons.append(
            f"TP={t} does not divide {spec.num_attention_heads} heads and {spec.num_key_value_heads} KV heads"
        )
    if t > gpus_per_node:
        reasons.append(f"TP={t} spans nodes ({gpus_per_node} GPUs per node)")
    if spec.num_layers % p:
        reasons.append(f"PP={p} does not divide {spec.num_layers} layers")
    if seq_length % sequence_divisor(t, c):
        rule = "2 x CP x TP" if c > 1 else "TP"
        reasons.append(f"sequence {seq_length} is not a multiple of {rule} = {sequence_divisor(t, c)}")
    if global_batch % (layout.micro_batch * layout.dp):
        reasons.append(
            f"global batch {global_batch} is not a multiple of micro-batch x DP = {layout.micro_batch * layout.dp}"
        )
    return reasons


def parameters_on_gpu(spec: AliaSpec, layout: Layout) -> int:
    """Parameters held by the busiest pipeline stage's GPU (embedding or output layer plus its layers)."""
    layers = spec.num_layers // layout.pp
    per_layer = spec.layer_parameters() - 2 * spec.hidden_size  # the two norms are replicated, not split
    sharded = layers * per_layer // layout.tp + layers * 2 * spec.hidden_size
    vocab = spec.embedding_parameters() // layout.tp
    # With one stage it holds both embedding and output layer; otherwise the first or last holds one.
    return sharded + (2 * vocab if layout.pp == 1 else vocab) + spec.hidden_size


def activation_bytes_per_token_layer(spec: AliaSpec, layout: Layout) -> float:
    """Bytes one token keeps per layer for backward (before the pipeline's in-flight factor)."""
    h, f = spec.hidden_size, spec.intermediate_size
    g = spec.num_key_value_heads * spec.head_dim
    replicated = 4 * h  # two RMSNorm inputs, two normed outputs feeding the projections
    if layout.sequence_parallel:
        replicated /= layout.tp
    if layout.recompute == "full":
        return BF16 * h / (layout.tp if layout.sequence_parallel else 1)  # only the layer's input
    attention = 2 * h + 2 * g  # Q, K, V and the fused-attention output
    mlp = 4 * f if layout.recompute == "none" else 2 * f  # selective: SwiGLU activation recomputed
    return BF16 * (replicated + (attention + mlp) / layout.tp)


def logits_bytes(spec: AliaSpec, layout: Layout, tokens: float, chunk: int | None = LOGPROB_CHUNK) -> float:
    """What the LM head's logits and the NLL loss hold on one GPU (see the module docstring).

    Counted from NeMo-RL v0.7.0's DistributedLogprob (``chunk=None``: fp32 logits, log-softmax, softmax and
    gradient over the whole [tokens x V/t]) and ChunkedDistributedLogprob (bf16 logits and gradient whole,
    fp32 upcast, log-softmax, softmax, gradient and an int64 one-hot per chunk of ``chunk`` positions).
    """
    shard = spec.vocab_size / layout.tp
    if chunk is None:
        return 16 * tokens * shard
    return 8 * tokens * shard + 24 * min(chunk, tokens) * shard


def memory_breakdown(
    spec: AliaSpec, layout: Layout, seq_length: int, global_batch: int, logprob_chunk: int | None = LOGPROB_CHUNK
) -> dict[str, float]:
    """Per-GPU memory estimate in GiB, term by term (the busiest stage).

    ``logprob_chunk``: NeMo-RL's logprob chunk size with deferred fp32 logits (None: its default, fp32 logits).
    """
    params = parameters_on_gpu(spec, layout)
    optimizer_shards = layout.dp * layout.cp if layout.distributed_optimizer else 1
    micro_batches = global_batch // (layout.micro_batch * layout.dp)
    in_flight = min(layout.pp, micro_batches)
    tokens = layout.micro_batch * seq_length / layout.cp
    layers = spec.num_layers // layout.pp
    gib = 1024**3
    terms = {
        "weights": BF16 * params / gib,
        "gradients": BF16 * params / gib,
        "optimizer": 12 * params / optimizer_shards / gib,
        "activations": activation_bytes_per_token_layer(spec, layout) * tokens * layers * in_flight / gib,
        "logits_and_loss": logits_bytes(spec, layout, tokens, logprob_chunk) / gib,
    }
    terms["allowance"] = FRAMEWORK_GB + FRAGMENTATION * sum(terms.values())
    terms["total"] = sum(terms.values())
    return terms


def flops_per_token(spec: AliaSpec, seq_length: int, recompute: Recompute) -> float:
    """Training FLOPs per token: dense matmuls (x3 for forward + backward, x4 with full recompute) plus
    causal attention scores and values (half of the square)."""
    dense = spec.total_parameters() - spec.embedding_parameters()  # the input lookup costs no matmul
    passes = 4 if recompute == "full" else 3
    attention = 2 * 2 * spec.num_layers * spec.hidden_size * seq_length / 2  # QK^T and AV, causal half
    return passes * (2 * dense + attention)


def efficiency(layout: Layout, micro_batches: int) -> float:
    """Model FLOPs utilisation assumed for a layout (see the constants at the top of this module)."""
    bubble = micro_batches / (micro_batches + layout.pp - 1)  # 1F1B pipeline idle time
    penalty = (
        (1 - TP_PENALTY) ** math.log2(layout.tp)
        * (1 - CP_PENALTY) ** math.log2(layout.cp)
        * (1 - DP_PENALTY) ** math.log2(max(layout.dp, 1))
    )
    return BASE_MFU * bubble * penalty


def step_seconds(spec: AliaSpec, layout: Layout, gpu: Gpu, seq_length: int, global_batch: int) -> float:
    """Estimated time of one optimizer step of ``global_batch`` sequences."""
    micro_batches = global_batch // (layout.micro_batch * layout.dp)
    work = flops_per_token(spec, seq_length, layout.recompute) * global_batch * seq_length
    return work / (layout.gpus * gpu.peak_tflops * 1e12 * efficiency(layout, micro_batches))


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(int(math.log2(limit)) + 1)] if limit >= 1 else [1]


def plan(
    spec: AliaSpec,
    seq_length: int,
    global_batch: int,
    num_nodes: int,
    gpus_per_node: int,
    gpu: Gpu,
    micro_batches: tuple[int, ...] = (1, 2),
) -> dict[str, Any]:
    """Every layout of the cluster's GPUs: valid or not (with reasons), memory, step time, fit; ranked."""
    total = num_nodes * gpus_per_node
    rows = []
    for tp, pp, cp, mb, rc in product(
        _powers_of_two(gpus_per_node), _powers_of_two(total), _powers_of_two(total), micro_batches,
        ("none", "selective", "full"),
    ):  # fmt: skip
        if total % (tp * pp * cp):
            continue
        layout = Layout(tp, pp, cp, total // (tp * pp * cp), mb, rc)  # type: ignore[arg-type]
        reasons = invalid_reasons(spec, layout, seq_length, gpus_per_node, global_batch)
        row: dict[str, Any] = {"layout": asdict(layout), "valid": not reasons, "reasons": reasons}
        if not reasons:
            mem = memory_breakdown(spec, layout, seq_length, global_batch)
            row.update(
                memory_gib={k: round(v, 2) for k, v in mem.items()},
                fits=mem["total"] <= gpu.memory_gb * 1e9 / 1024**3,
                step_s=step_seconds(spec, layout, gpu, seq_length, global_batch),
            )
        rows.append(row)
    fitting = sorted((r for r in rows if r.get("fits")), key=lambda r: r["step_s"])
    return {
        "model": spec.name,
        "seq_length": seq_length,
        "global_batch": global_batch,
        "gpus": total,
        "gpu": asdict(gpu),
        "layouts": rows,
        "ranked": fitting,
    }


def stage_hours(step_s: float, token_budget: float, global_batch: int, seq_length: int) -> float:
    """Wall-clock hours to train ``token_budget`` tokens at ``step_s`` per step."""
    return step_s * math.ceil(token_budget / (global_batch * seq_length)) / 3600
