"""The layout planner: hand-computed memory terms, monotonicity, invalid layouts, known (in)feasible cases."""

from __future__ import annotations

import json

import pytest

from alia_nemo.cli import main
from alia_nemo.config.planner import (
    Gpu,
    Layout,
    activation_bytes_per_token_layer,
    flops_per_token,
    invalid_reasons,
    memory_breakdown,
    parameters_on_gpu,
    plan,
)
from alia_nemo.model.architectures import get_spec

TINY, BIG = get_spec("alia_tiny"), get_spec("alia_40b")
H100_64 = Gpu(64, 989)
GIB = 1024**3


def test_memory_terms_by_hand_for_tiny():
    layout = Layout(tp=1, pp=1, cp=1, dp=1, micro_batch=1, recompute="none", sequence_parallel=False)
    assert parameters_on_gpu(TINY, layout) == 328_256
    # Per token and layer: 4h replicated + (2h + 2g + 4f) = 256 + 192 + 768 elements, bf16.
    assert activation_bytes_per_token_layer(TINY, layout) == 2 * (4 * 64 + 2 * 64 + 2 * 32 + 4 * 192)
    mem = memory_breakdown(TINY, layout, seq_length=128, global_batch=1)
    assert mem["weights"] * GIB == pytest.approx(2 * 328_256)
    assert mem["optimizer"] * GIB == pytest.approx(12 * 328_256)
    assert mem["activations"] * GIB == pytest.approx(2432 * 128 * 4)
    # Chunked logprobs (compile's setting): 8 bytes per logit element + 24 x min(chunk, tokens) x vocab.
    assert mem["logits_and_loss"] * GIB == pytest.approx(8 * 128 * 1024 + 24 * 128 * 1024)
    parts = sum(v for k, v in mem.items() if k not in ("allowance", "total"))
    assert mem["allowance"] == pytest.approx(3.0 + 0.1 * parts) and mem["total"] == pytest.approx(
        parts + mem["allowance"]
    )


def test_logits_term_at_163840_tokens_by_hand():
    """The 160k recipe's layout (TP4 CP8): 20,480 positions x 64,000 vocabulary entries on each GPU."""
    layout = Layout(tp=4, pp=2, cp=8, dp=1, micro_batch=1, recompute="full")
    elements = (163_840 // 8) * (256_000 // 4)
    assert elements == 1_310_720_000
    # defer_fp32_logits + logprob_chunk_size 1024 (compiled): bf16 logits, bf16 gradient, the packed slice's
    # gradient and its sum (2 bytes each), and one chunk's fp32 upcast, log-softmax, softmax, gradient + int64
    # one-hot (24 bytes) for 1,024 positions.
    chunked = memory_breakdown(BIG, layout, 163_840, 26)["logits_and_loss"] * GIB
    assert chunked == 8 * elements + 24 * 1024 * 64_000 == 12_058_624_000
    # NeMo-RL's default (fp32 logits): fp32 logits, log-softmax, softmax kept for backward and gradient.
    default = memory_breakdown(BIG, layout, 163_840, 26, logprob_chunk=None)["logits_and_loss"] * GIB
    assert default == 16 * elements == 20_971_520_000  # 19.5 GiB, the largest single term


def test_40b_sharding_by_hand():
    layout = Layout(tp=4, pp=2, cp=8, dp=4, micro_batch=1, recompute="selective")
    per_layer = BIG.layer_parameters() - 2 * 8192
    expected = 24 * per_layer // 4 + 24 * 2 * 8192 + 2_097_152_000 // 4 + 8192
    assert parameters_on_gpu(layout=layout, spec=BIG) == expected
    mem = memory_breakdown(BIG, layout, 32768, 128)
    assert mem["optimizer"] * GIB == pytest.approx(12 * expected / 32)  # distributed over DP x CP


SHARDED = ("weights", "gradients", "optimizer", "activations", "logits_and_loss")


@pytest.mark.parametrize("dim", ["tp", "pp", "cp"])
def test_more_parallelism_never_raises_sharded_memory(dim):
    base = dict(tp=1, pp=1, cp=1, dp=2, micro_batch=1, recompute="selective")
    previous = None
    for size in (1, 2, 4, 8):
        mem = memory_breakdown(BIG, Layout(**{**base, dim: size}), 32768, 256)
        if previous:
            for term in SHARDED:
                assert mem[term] <= previous[term] + 1e-9, (dim, size, term)
        previous = mem


def test_longer_sequences_never_lower_activations():
    layout = Layout(tp=4, pp=2, cp=8, dp=1, micro_batch=1, recompute="full")
    acts = [memory_breakdown(BIG, layout, s, 64)["activations"] for s in (4096, 32768, 65536, 163840)]
    assert acts == sorted(acts) and acts[0] < acts[-1]


def test_recompute_order():
    mems = [
        memory_breakdown(BIG, Layout(4, 2, 8, 1, 1, rc), 32768, 64)["activations"]
        for rc in ("none", "selective", "full")
    ]
    assert mems[0] > mems[1] > mems[2]
    assert flops_per_token(BIG, 32768, "full") > flops_per_token(BIG, 32768, "none")


def test_invalid_layouts_have_reasons():
    def reasons(**kw):
        layout = Layout(**{**dict(tp=4, pp=2, cp=8, dp=1, micro_batch=1, recompute="none"), **kw})
        return " | ".join(invalid_reasons(BIG, layout, 32768, 4, 128))

    assert reasons() == ""
    assert "TP=16 does not divide 64 heads and 8 KV heads" in reasons(tp=16)
    assert "TP=8 spans nodes (4 GPUs per node)" in reasons(tp=8)
    assert "PP=5 does not divide 48 layers" in reasons(pp=5)
    assert "not a multiple of 2 x CP x TP = 96" in reasons(cp=12)
    assert "global batch 128 is not a multiple of micro-batch x DP = 384" in reasons(dp=3, micro_batch=128)


def test_bsc_published_32k_layout_fits_mn5():
    # BSC's 32k CPT: 64 nodes x 4 H100 64 GB, TP4 PP2 CP8 (DP4), global batch 128 x 32,768.
    result = plan(BIG, 32768, 128, 64, 4, H100_64)
    row = next(r for r in result["layouts"] if r["layout"] == dict(tp=4, pp=2, cp=8, dp=4, micro_batch=1,
               recompute="selective", distributed_optimizer=True, sequence_parallel=True))  # fmt: skip
    assert row["valid"] and row["fits"], row


def test_card_sft_on_16x4_mn5_has_fitting_layouts():
    result = plan(BIG, 32768, 512, 16, 4, H100_64)
    assert result["ranked"] and all(r["memory_gib"]["total"] <= 64e9 / GIB for r in result["ranked"])
    steps = [r["step_s"] for r in result["ranked"]]
    assert steps == sorted(steps)


def test_160k_without_context_parallelism_is_rejected():
    result = plan(BIG, 163840, 24, 16, 4, H100_64)
    assert result["ranked"] and all(r["layout"]["cp"] > 1 for r in result["ranked"])
    no_cp = [r for r in result["layouts"] if r["valid"] and r["layout"]["cp"] == 1]
    assert no_cp and not any(r["fits"] for r in no_cp)


def test_plan_cli(capsys):
    assert main(["plan", "model=alia_40b", "stage=sft", "cluster=mn5_acc", "data=sft_mixture", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"] == 64 and out["steps"] == 1391 and out["ranked"][0]["stage_hours"] > 0
    # 712,213 // 512: whole global batches, as compile and NeMo-RL count them (not ceil = 1,392)
    argv = ["plan", "model=alia_40b", "cluster=mn5_acc", "stage.seq_length=163840", "stage.global_batch_size=24"]
    assert main([*argv, "--tokens", "36.8e9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 9359  # ceil(36.8e9 / (24 x 163,840))
    assert main(["plan", "model=alia_40b", "stage=sft", "cluster=mn5_acc", "cluster.num_nodes=1"]) == 1
    assert "nothing fits" in capsys.readouterr().out
    assert main(["plan"]) == 2
    assert "has no GPUs to plan for" in capsys.readouterr().err


def test_every_shipped_40b_recipe_fits_the_marenostrum5_profile():
    from alia_nemo.config.compose import available_recipes, load_config
    from alia_nemo.config.resolve import resolve
    from alia_nemo.config.to_nemo_rl import memory_estimate

    checked = []
    for recipe in available_recipes():
        cfg = load_config([f"recipe={recipe}"])
        if cfg.model.arch != "alia_40b":
            continue
        assert cfg.cluster.name == "mn5_acc" and cfg.cluster.gpu_memory_gb == 64
        est = memory_estimate(cfg, resolve(cfg))
        assert est is not None and est["total"] <= est["budget"] == 59.6, recipe
        checked.append((recipe, est["total"]))
    stages = {load_config([f"recipe={r}"]).stage.name for r, _ in checked}
    # the card's three stages, and the preference stage beyond it, all have a 40B recipe
    assert stages == {"sft", "cpt_32k", "cpt_160k", "dpo"}
