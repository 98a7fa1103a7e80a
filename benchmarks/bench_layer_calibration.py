"""Calibrate the planner on a GPU: forward + backward of one full-width ALIA-40b decoder layer.

Times one ``LlamaDecoderLayer`` (hidden 8192, 64 heads, 8 KV heads, FFN 24,576) in bf16 with PyTorch's
fused attention (SDPA) at 4k and 32k tokens, and records achieved TFLOP/s and peak memory next to the
planner's estimates for the same layer (its FLOPs and its activation bytes per token).

    python benchmarks/bench_layer_calibration.py [--seq 4096 32768] [--json benchmarks/results/layer_<gpu>.json]
    python benchmarks/bench_layer_calibration.py --smoke        # tiny layer on the CPU: checks the script only

Needs CUDA for real figures; without it (and without --smoke) it exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def measure(spec, seq: int, device: str, dtype, repeats: int) -> dict:
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from alia_nemo.config.planner import BF16, Layout, activation_bytes_per_token_layer

    config = spec.hf_config(seq)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device=device, dtype=dtype)
    rotary = LlamaRotaryEmbedding(config).to(device)
    x = torch.randn(1, seq, spec.hidden_size, device=device, dtype=dtype, requires_grad=True)
    positions = torch.arange(seq, device=device)[None]
    cos_sin = rotary(x, positions)

    def step() -> None:
        out = layer(x, position_embeddings=cos_sin, position_ids=positions)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    step()  # warm-up (kernels, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    # Training FLOPs of one layer for one sequence: 3 x (dense matmuls + causal attention), as the planner counts.
    flops = 3 * (2 * spec.layer_parameters() * seq + 2 * spec.hidden_size * seq * seq)
    layout = Layout(tp=1, pp=1, cp=1, dp=1, micro_batch=1, recompute="none", sequence_parallel=False)
    row = {
        "seq_length": seq,
        "seconds": seconds,
        "achieved_tflops": flops / seconds / 1e12,
        "planner_flops": flops,
        "planner_activation_gib": activation_bytes_per_token_layer(spec, layout) * seq / 1024**3,
        "weights_gib": BF16 * spec.layer_parameters() / 1024**3,
    }
    if device == "cuda":
        row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 1024**3
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="alia_tiny on the CPU in float32 (script check only)")
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args()

    import torch

    from alia_nemo.model.architectures import get_spec

    if ns.smoke:
        spec, device, dtype = get_spec("alia_tiny"), "cpu", torch.float32
    elif torch.cuda.is_available():
        spec, device, dtype = get_spec("alia_40b"), "cuda", torch.bfloat16
    else:
        print("no CUDA device: run this on a GPU machine (or pass --smoke to check the script)", file=sys.stderr)
        return 2
    rows = [measure(spec, s, device, dtype, ns.repeats) for s in ns.seq]
    machine = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    report = {"model": spec.name, "device": machine, "torch": torch.__version__, "rows": rows}
    for r in rows:
        extra = f", peak {r['peak_extra_gib']:.1f} GiB" if "peak_extra_gib" in r else ""
        acts = r["planner_activation_gib"]
        print(
            f"{spec.name} layer, {r['seq_length']:>6} tokens: {r['seconds'] * 1e3:8.1f} ms, "
            f"{r['achieved_tflops']:7.1f} TFLOP/s{extra} (planner activations {acts:.2f} GiB)"
        )
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
