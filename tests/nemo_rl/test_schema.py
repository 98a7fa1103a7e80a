"""The strict mirror of NeMo-RL's keys and the cross-field layout checks: one failing case per rule."""

from __future__ import annotations

import copy

import pytest

from alia_nemo.config.compose import load_config
from alia_nemo.config.nemo_rl_schema import NemoRLConfigError, validate_nemo_rl
from alia_nemo.engines.nemo_rl_prepare import compile_stage
from alia_nemo.model.architectures import get_spec

BASE = ["engine=nemo_rl", "cluster=mn5_acc", "model=alia_40b", "stage=sft", "data=sft_mixture"]
FITS = ["engine.tensor_parallel=4", "engine.pipeline_parallel=4", "engine.context_parallel=4",
        "engine.sequence_packing=true", "engine.activation_checkpointing=true"]  # fmt: skip
SPEC = get_spec("alia_40b")


@pytest.fixture(scope="module")
def megatron40b():
    return compile_stage(load_config([*BASE, *FITS, "run.output_dir=/tmp/x"]), prepare=False).config


@pytest.fixture(scope="module")
def dtensor40b():
    cfg = load_config([*BASE, "engine.backend=dtensor", "engine.tensor_parallel=8", "cluster.gpus_per_node=8",
                       "run.output_dir=/tmp/x"])  # fmt: skip
    return compile_stage(cfg, prepare=False).config


def _broken(config, edit):
    c = copy.deepcopy(config)
    edit(c)
    with pytest.raises(NemoRLConfigError) as err:
        validate_nemo_rl(c, SPEC)
    return str(err.value)


def test_compiled_configs_validate(megatron40b, dtensor40b):
    assert validate_nemo_rl(megatron40b, SPEC).policy.megatron_cfg.enabled is True
    assert validate_nemo_rl(dtensor40b, SPEC).policy.dtensor_cfg.enabled is True


def test_unknown_key_is_named_at_its_depth(megatron40b):
    msg = _broken(megatron40b, lambda c: c["policy"]["megatron_cfg"]["optimizer"].update(lr_max=1))
    assert "policy.megatron_cfg.optimizer.lr_max: unknown key" in msg
    msg = _broken(megatron40b, lambda c: c["sft"].update(max_epochs=1))
    assert "sft.max_epochs: unknown key" in msg


def test_wrong_type_and_add_eos_are_named(megatron40b):
    assert "policy.train_global_batch_size" in _broken(
        megatron40b, lambda c: c["policy"].update(train_global_batch_size="many")
    )
    assert "data.add_eos" in _broken(megatron40b, lambda c: c["data"].update(add_eos=True))


def test_global_batch_must_divide_by_dp_times_micro_batch(dtensor40b):
    msg = _broken(dtensor40b, lambda c: c["policy"].update(train_global_batch_size=100))
    assert "train_global_batch_size=100 is not divisible by data-parallel size 16 x" in msg


def test_tp_must_divide_heads(megatron40b):
    def edit(c):
        c["policy"]["megatron_cfg"]["tensor_model_parallel_size"] = 16
        c["policy"]["megatron_cfg"]["pipeline_model_parallel_size"] = 1
        c["policy"]["make_sequence_length_divisible_by"] = 128

    assert "tensor parallel size 16 must divide the attention heads (64) and KV heads (8)" in _broken(megatron40b, edit)


def test_cp_times_tp_must_divide_sequence(megatron40b):
    assert "is not divisible by CP x TP = 16" in _broken(
        megatron40b, lambda c: c["policy"].update(max_total_sequence_length=32760)
    )


def test_divisibility_must_be_2_cp_tp(megatron40b):
    assert "must be a multiple of 32 (2 x CP x TP" in _broken(
        megatron40b, lambda c: c["policy"].update(make_sequence_length_divisible_by=16)
    )


def test_pp_must_divide_layers_or_stages_be_explicit(megatron40b):
    def five(c):
        c["policy"]["megatron_cfg"]["pipeline_model_parallel_size"] = 5
        c["cluster"]["num_nodes"] = 20

    assert "pipeline parallel size 5 does not divide 48 layers" in _broken(megatron40b, five)

    def uneven(first, last):
        def edit(c):
            five(c)
            c["policy"]["megatron_cfg"]["num_layers_in_first_pipeline_stage"] = first
            c["policy"]["megatron_cfg"]["num_layers_in_last_pipeline_stage"] = last

        return edit

    # 48 - 8 - 8 = 32 layers do not split over 3 middle stages; 48 - 12 - 12 = 24 do (8 each).
    assert "uneven pipeline: first=8, last=8 layers leave 32 layers for 3 middle stage(s)" in _broken(
        megatron40b, uneven(8, 8)
    )
    c = copy.deepcopy(megatron40b)
    uneven(12, 12)(c)
    m = validate_nemo_rl(c, SPEC).policy.megatron_cfg
    assert (m.num_layers_in_first_pipeline_stage, m.num_layers_in_last_pipeline_stage) == (12, 12)


def test_megatron_cp_needs_packing_and_dtensor_cp_refuses_it(megatron40b, dtensor40b):
    assert "Megatron context parallelism needs sequence packing" in _broken(
        megatron40b, lambda c: c["policy"].update(sequence_packing={"enabled": False})
    )

    def dt(c):
        c["policy"]["dtensor_cfg"]["context_parallel_size"] = 2
        c["policy"]["dtensor_cfg"]["tensor_parallel_size"] = 4
        c["policy"]["make_sequence_length_divisible_by"] = 16
        packing = {"algorithm": "modified_first_fit_decreasing", "sequence_length_round": 64}
        c["policy"]["sequence_packing"] = {"enabled": True, "train_mb_tokens": 32768, **packing}

    assert "DTensor context parallelism does not work with sequence packing" in _broken(dtensor40b, dt)


def test_world_size_and_sequence_parallel(megatron40b):
    assert "not a multiple of TP x PP x CP = 64" in _broken(megatron40b, lambda c: c["cluster"].update(num_nodes=15))

    def sp(c):
        m = c["policy"]["megatron_cfg"]
        m.update(tensor_model_parallel_size=1, pipeline_model_parallel_size=16, sequence_parallel=True)
        c["policy"]["make_sequence_length_divisible_by"] = 8

    assert "sequence parallelism needs tensor parallel size > 1" in _broken(megatron40b, sp)
