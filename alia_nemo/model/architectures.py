"""The ALIA architecture family (2b, 7b, 40b and a tiny test size) as data.

Every size is a Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA, no biases, untied embeddings).
A spec turns into a transformers ``LlamaConfig`` and into the keyword set megatron-core /
Megatron-Bridge take, and counts its parameters three ways: analytically, from a transformers model
built on the meta device, and from a megatron-core ``GPTModel`` built on the meta device.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import asdict, dataclass
from typing import Any, Literal

RopeType = Literal["none", "llama3", "theta"]


@dataclass(frozen=True)
class RopeSettings:
    """How a stage changes the rotary embedding of the base model.

    ``none`` keeps the base RoPE; ``llama3`` is Llama-3.1-style frequency scaling (what BSC's NeMo
    runs call ``scale_factor`` / ``old_context_len``); ``theta`` only replaces the rotary base.
    """

    type: RopeType = "none"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    theta: float | None = None

    def hf_rope_parameters(self, base_theta: float) -> dict[str, Any]:
        """The ``rope_parameters`` dict transformers 5.x reads (``rope_theta`` lives inside it)."""
        if self.type == "llama3":
            return {
                "rope_type": "llama3",
                "rope_theta": float(self.theta or base_theta),
                "factor": float(self.factor),
                "low_freq_factor": float(self.low_freq_factor),
                "high_freq_factor": float(self.high_freq_factor),
                "original_max_position_embeddings": int(self.original_max_position_embeddings),
            }
        theta = self.theta if self.type == "theta" and self.theta else base_theta
        return {"rope_type": "default", "rope_theta": float(theta)}


@dataclass(frozen=True)
class AliaSpec:
    """Shape of one ALIA size. Numbers come from the HF configs and the model card (FACTS.md)."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    base_context: int
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def embedding_parameters(self) -> int:
        """Input embedding table size (the card's 'Embedding Parameters')."""
        return self.vocab_size * self.hidden_size

    def layer_parameters(self) -> int:
        """Parameters in one decoder layer: attention, SwiGLU MLP and two RMSNorm weights."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = h * h * 2 + h * kv * 2  # q, o full width; k, v grouped
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        return attention + mlp + 2 * h

    def total_parameters(self) -> int:
        """Analytic parameter count of the whole model."""
        output = 0 if self.tie_word_embeddings else self.embedding_parameters()
        return self.embedding_parameters() + output + self.num_layers * self.layer_parameters() + self.hidden_size

    def hf_config(self, seq_length: int | None = None, rope: RopeSettings | None = None, **extra: Any):
        """A transformers ``LlamaConfig`` for a stage of ``seq_length`` tokens with ``rope`` applied."""
        from transformers import LlamaConfig

        rope = rope or RopeSettings()
        # A stage that rescales RoPE defines the new context; otherwise keep at least the base context.
        context = seq_length if rope.type != "none" and seq_length else max(self.base_context, seq_length or 0)
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            max_position_embeddings=context,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope.hf_rope_parameters(self.rope_theta),
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
            **extra,
        )

    def megatron_kwargs(self, seq_length: int | None = None, rope: RopeSettings | None = None) -> dict[str, Any]:
        """The keyword set megatron-core's TransformerConfig / GPTModel (and Megatron-Bridge) need.

        Plain data (YAML-serialisable): ``activation`` names the function instead of holding it.
        """
        rope = rope or RopeSettings()
        theta = rope.theta if rope.type in ("theta", "llama3") and rope.theta else self.rope_theta
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_key_value_heads,
            "kv_channels": self.head_dim,
            "gated_linear_unit": True,
            "activation": "silu",
            "normalization": "RMSNorm",
            "layernorm_epsilon": self.rms_norm_eps,
            "add_bias_linear": False,
            "add_qkv_bias": False,
            "share_embeddings_and_output_weights": self.tie_word_embeddings,
            "position_embedding_type": "rope",
            "rotary_base": theta,
            "rope_scaling": rope.type == "llama3",
            "rope_scaling_factor": float(rope.factor) if rope.type == "llama3" else 1.0,
            "seq_length": max(self.base_context, seq_length or 0),
            "vocab_size": self.vocab_size,
        }


ARCHITECTURES: dict[str, AliaSpec] = {
    spec.name: spec
    for spec in (
        AliaSpec("alia_tiny", 4, 64, 4, 2, 192, 1024, 1e-5, 10000.0, 4096),
        AliaSpec("alia_2b", 24, 2048, 16, 16, 5440, 256000, 1e-5, 10000.0, 8192),
        # salamandra-7b's HF config uses 1e-6 (its NeMo config 1e-5); we follow the HF checkpoint.
        AliaSpec("alia_7b", 32, 4096, 32, 8, 11008, 256000, 1e-6, 10000.0, 8192),
        AliaSpec("alia_40b", 48, 8192, 64, 8, 24576, 256000, 1e-5, 10000.0, 4096),
    )
}


def get_spec(name: str) -> AliaSpec:
    """Look up an architecture by name, with an error that lists the known ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown ALIA architecture {name!r}; choose one of {sorted(ARCHITECTURES)}") from None


def count_hf_meta(spec: AliaSpec) -> dict[str, int]:
    """Build ``LlamaForCausalLM`` on the meta device (no memory) and count its parameters."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(spec.hf_config())
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "embedding": model.get_input_embeddings().weight.numel(),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _single_process_megatron():
    """A one-process gloo group and trivial model parallelism, torn down afterwards."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if owns_group:
            dist.destroy_process_group()


def megatron_transformer_config(kwargs: dict[str, Any]):
    """Turn :meth:`AliaSpec.megatron_kwargs` into a megatron-core ``TransformerConfig`` for CPU meta builds."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    keys = (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "kv_channels",
        "gated_linear_unit",
        "normalization",
        "layernorm_epsilon",
        "add_bias_linear",
        "add_qkv_bias",
    )
    return TransformerConfig(
        **{k: kwargs[k] for k in keys},
        activation_func={"silu": F.silu}[kwargs["activation"]],
        use_cpu_initialization=True,
        perform_initialization=False,
    )


def count_megatron_meta(spec: AliaSpec) -> dict[str, int]:
    """Build megatron-core's ``GPTModel`` from :meth:`AliaSpec.megatron_kwargs` on the meta device.

    megatron-core 0.16 builds the full model there (no memory allocated), so no per-layer scaling is
    needed. Raises ImportError when megatron-core is not installed (it is in the ``test`` extra).
    """
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    kw = spec.megatron_kwargs()
    with _single_process_megatron(), torch.device("meta"):
        model = GPTModel(
            config=megatron_transformer_config(kw),
            transformer_layer_spec=get_gpt_layer_local_spec(normalization=kw["normalization"]),
            vocab_size=kw["vocab_size"],
            max_sequence_length=kw["seq_length"],
            share_embeddings_and_output_weights=kw["share_embeddings_and_output_weights"],
            position_embedding_type=kw["position_embedding_type"],
            rotary_base=int(kw["rotary_base"]),
        )
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "embedding": model.embedding.word_embeddings.weight.numel(),
    }


def parameter_report(name: str) -> dict[str, Any]:
    """Parameter counts of one size by the three methods, as printed by ``alia-nemo model-info``."""
    spec = get_spec(name)
    report: dict[str, Any] = {
        "model": name,
        "spec": asdict(spec),
        "analytic": {"total": spec.total_parameters(), "embedding": spec.embedding_parameters()},
        "transformers_meta": count_hf_meta(spec),
    }
    try:
        report["megatron_core_meta"] = count_megatron_meta(spec)
    except ImportError as exc:
        report["megatron_core_meta"] = {"error": f"megatron-core not importable ({exc}); pip install 'alia-nemo[test]'"}
    counts = [
        v for v in (report["analytic"], report["transformers_meta"], report["megatron_core_meta"]) if "total" in v
    ]
    report["agree"] = all(c == counts[0] for c in counts)
    return report
