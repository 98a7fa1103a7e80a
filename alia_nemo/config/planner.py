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

DPO (``dpo=True``): each sample of a batch is a (chosen, rejected) pair that NeMo-RL puts into the same micro-batch
(``dpo_train`` calls ``policy.train`` with twice the global and micro batch), so activations and logits are those
of 2 x b sequences, unpacked (NeMo-RL's DPO refuses sequence packing; Megatron CP needs it, so CP layouts are
invalid). The frozen reference model adds no GPU term: NeMo-RL v0.7.0's Megatron worker keeps it in host memory and
swaps it into the policy's own GPU tensors for the reference log-probabilities (see :func:`reference_host_bytes`),
which :func:`reference_host_gib` counts against a node's RAM. Its forward pass over both sequences adds one forward
(a third of a training pass without recompute) to the step time.
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
# Share of a node's RAM the reference weights may take: Ray's object store reserves 30% of it by default, and the
# OS, the driver, dataloader workers and NeMo-RL's checkpoint writes need the rest of what is left.
HOST_SHARE = 0.5

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


def logits_bytes(
    spec: AliaSpec, layout: Layout, tokens: float, chunk: int | None = LOGPROB_CHUNK, rows: int = 1
) -> float:
    """What the LM head's logits and the NLL loss hold on one GPU (see the module docstring).

    Counted from NeMo-RL v0.7.0's DistributedLogprob (``chunk=None``: fp32 logits, log-softmax, softmax and
    gradient over the whole [tokens x V/t]) and ChunkedDistributedLogprob (bf16 logits and gradient whole,
    fp32 upcast, log-softmax, softmax, gradient and an int64 one-hot per chunk of ``chunk`` positions). It chunks
    along the sequence, so ``rows`` unpacked sequences in a micro-batch (DPO's chosen and rejected) each hold a
    chunk of ``tokens / rows`` positions at once.
    """
    shard = spec.vocab_size / layout.tp
    if chunk is None:
        return 16 * tokens * shard
    return 8 * tokens * shard + 24 * rows * min(chunk, tokens / rows) * shard


def memory_breakdown(
    spec: AliaSpec, layout: Layout, seq_length: int, global_batch: int, logprob_chunk: int | None = LOGPROB_CHUNK,
    dpo: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Per-GPU memory estimate in GiB, term by term (the busiest stage).

    ``logprob_chunk``: NeMo-RL's logprob chunk size with deferred fp32 logits (None: its default, fp32 logits).
    ``dpo``: ``global_batch`` and ``layout.micro_batch`` count pairs, two unpacked sequences each (module docstring).
    """
    params = parameters_on_gpu(spec, layout)
    optimizer_shards = layout.dp * layout.cp if layout.distributed_optimizer else 1
    micro_batches = global_batch // (layout.micro_batch * layout.dp)
    in_flight = min(layout.pp, micro_batches)
    rows = 2 * layout.micro_batch if dpo else 1  # unpacked sequences whose logits are chunked side by side
    tokens = layout.micro_batch * (2 if dpo else 1) * seq_length / layout.cp
    layers = spec.num_layers // layout.pp
    gib = 1024**3
    terms = {
        "weights": BF16 * params / gib,
        "gradients": BF16 * params / gib,
        "optimizer": 12 * params / optimizer_shards / gib,
        "activations": activation_bytes_per_token_layer(spec, layout) * tokens * layers * in_flight / gib,
        "logits_and_loss": logits_bytes(spec, layout, tokens, logprob_chunk, rows) / gib,
    }
    terms["allowance"] = FRAMEWORK_GB + FRAGMENTATION * sum(terms.values())
    terms["total"] = sum(terms.values())
    return terms


def reference_host_bytes(spec: AliaSpec, layout: Layout) -> dict[str, float]:
    """Host memory one GPU's rank holds for DPO's frozen reference model, bytes (Megatron backend).

    Where NeMo-RL v0.7.0 keeps it (nemo_rl/models/policy/workers/megatron_policy_worker.py and
    nemo_rl/models/megatron/setup.py):
      - at start-up (worker lines 394-404) the policy is moved to CPU, ``setup_reference_model_state`` builds a second
        model, loads the start checkpoint into it and copies its state dict to CPU (setup.py lines 1566-1575:
        ``item.detach().to(device="cpu", copy=True)``); the policy then returns to the GPU. The GPU peak of that
        moment (a bf16 model and its DDP buffers while the policy's weights are on the host) stays below training's;
      - ``use_reference_model`` (worker lines 1027-1080), around every reference log-probability pass: the policy's
        own state dict is copied to CPU (line 1044, a second host copy while it lasts), the reference tensors are
        copied into the policy's GPU tensors in place (``_apply_state_dict_to_model``), and back afterwards.
    So the reference costs no GPU memory but two bf16 copies of the rank's weights in host memory (the resident
    reference and the policy's copy during the swap); DP replicas each keep their own.
    """
    params = parameters_on_gpu(spec, layout)
    return {"reference_weights": BF16 * params, "policy_copy_during_swap": BF16 * params}


def reference_host_gib(spec: AliaSpec, layout: Layout, gpus_per_node: int) -> dict[str, float]:
    """:func:`reference_host_bytes` of a node's ranks, in GiB, with their total."""
    terms = {k: gpus_per_node * v / 1024**3 for k, v in reference_host_bytes(spec, layout).items()}
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


def step_seconds(
    spec: AliaSpec, layout: Layout, gpu: Gpu, seq_length: int, global_batch: int, dpo: bool = False
) -> float:
    """Estimated time of one optimizer step of ``global_batch`` sequences (DPO: pairs, plus the reference pass)."""
    micro_batches = global_batch // (layout.micro_batch * layout.dp)
    per_token = flops_per_token(spec, seq_length, layout.recompute)
    if dpo:  # two sequences per pair, and a forward pass of the reference over both
        per_token = 2 * (per_token + flops_per_token(spec, seq_length, "none") / 3)
    work = per_token * global_batch * seq_length
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
    dpo: bool = False,
) -> dict[str, Any]:
    """Every layout of the cluster's GPUs: valid or not (with reasons), memory, step time, fit; ranked.

    ``dpo``: the batch counts pairs (two unpacked sequences each) and CP layouts are invalid (module docstring).
    """
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
        if dpo and cp > 1:
            reasons.append(f"CP={cp}: Megatron context parallelism needs sequence packing, which NeMo-RL's DPO refuses")
        row: dict[str, Any] = {"layout": asdict(layout), "valid": not reasons, "reasons": reasons}
        if not reasons:
            mem = memory_breakdown(spec, layout, seq_length, global_batch, dpo=dpo)
            row.update(
                memory_gib={k: round(v, 2) for k, v in mem.items()},
                fits=mem["total"] <= gpu.memory_gb * 1e9 / 1024**3,
                step_s=step_seconds(spec, layout, gpu, seq_length, global_batch, dpo),
            )
        rows.append(row)
    fitting = sorted((r for r in rows if r.get("fits")), key=lambda r: r["step_s"])
    return {
        "model": spec.name,
        "seq_length": seq_length,
        "global_batch": global_batch,
        **({"dpo": True} if dpo else {}),
        "gpus": total,
        "gpu": asdict(gpu),
        "layouts": rows,
        "ranked": fitting,
    }


def stage_hours(step_s: float, token_budget: float, global_batch: int, seq_length: int) -> float:
    """Wall-clock hours to train ``token_budget`` tokens at ``step_s`` per step."""
    return step_s * math.ceil(token_budget / (global_batch * seq_length)) / 3600
