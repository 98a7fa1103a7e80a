"""The real NeMo-RL (v0.7): our plugins through its loader, collate and loss-mask path; its MasterConfig.

Marked ``nemo_rl``: they run where ``nemo_rl`` imports (its container, or its source on PYTHONPATH with
Python >= 3.12 for MasterConfig) and are skipped elsewhere.
"""

from __future__ import annotations

import pytest

from alia_nemo.config.compose import available_recipes, load_config
from alia_nemo.config.resolve import resolve
from alia_nemo.engines.nemo_rl_prepare import compile_stage
from alia_nemo.model.chatml import tokenize_conversation

pytestmark = pytest.mark.nemo_rl


def _master(config):
    from nemo_rl.algorithms.sft import MasterConfig

    return MasterConfig(**config)


def test_dataset_class_loads_through_nemo_rls_dotted_path_loader(tiny_compiled):
    from nemo_rl.data.datasets import load_response_dataset
    from nemo_rl.data.processors import PROCESSOR_REGISTRY

    _, compiled = tiny_compiled
    raw = load_response_dataset(dict(compiled.config["data"]["train"]))
    assert type(raw).__module__ == "alia_nemo.nemo_rl.dataset"
    assert raw.task_spec.task_name == "alia_sft"
    assert raw.processor is PROCESSOR_REGISTRY["alia_sft_processor"]
    assert len(raw.dataset) == 282 and len(raw.val_dataset) == 18


def test_set_task_spec_and_set_processor_bind_nemo_rls_objects(tiny_compiled):
    """The two calls NeMo-RL's loader makes after building the dataset, made here directly."""
    from nemo_rl.data.interfaces import TaskDataSpec
    from nemo_rl.data.processors import PROCESSOR_REGISTRY

    from alia_nemo.nemo_rl import AliaSFTDataset, alia_sft_processor
    from alia_nemo.nemo_rl.dataset import AliaDataError

    entry = dict(tiny_compiled[1].config["data"]["train"])
    ds = AliaSFTDataset(**entry)
    ds.set_task_spec(entry)
    assert isinstance(ds.task_spec, TaskDataSpec) and ds.task_spec.task_name == "alia_sft"
    assert ds.data_config == entry and ds.data_config is not entry  # a copy: NeMo-RL's entry is not shared
    ds.set_processor()
    assert ds.processor is PROCESSOR_REGISTRY["alia_sft_processor"] is alia_sft_processor
    wrong = AliaSFTDataset(**{**entry, "processor": "alia_text_processr"})  # a typo in data.train.processor
    with pytest.raises(AliaDataError, match="'alia_text_processr' is not registered; use 'alia_sft_processor'"):
        wrong.set_processor()


def test_batches_through_collate_and_loss_mask_equal_our_masks(tiny_compiled):
    from nemo_rl.algorithms.utils import get_tokenizer
    from nemo_rl.data.collate_fn import rl_collate_fn
    from nemo_rl.data.llm_message_utils import add_loss_mask_to_message_log, batched_message_log_to_flat_message

    from alia_nemo.engines.nemo_rl import build_datasets

    _, compiled = tiny_compiled
    master = _master(compiled.config)
    tokenizer = get_tokenizer(master.policy["tokenizer"])
    train, val = build_datasets(master, tokenizer)
    assert len(train) == 282 and len(val) == 18
    batch = rl_collate_fn([train[i] for i in range(16)])
    add_loss_mask_to_message_log(batch["message_log"], roles_to_train_on=["assistant"])
    flat, lengths = batched_message_log_to_flat_message(
        batch["message_log"],
        pad_value_dict={"token_ids": tokenizer.pad_token_id},
        make_sequence_length_divisible_by=master.policy["make_sequence_length_divisible_by"],
    )
    trained = 0
    for i in range(16):
        ours = tokenize_conversation(tokenizer, train.dataset[i]["messages"])
        n = int(lengths[i])
        assert flat["token_ids"][i, :n].tolist() == ours.input_ids
        assert flat["token_loss_mask"][i, :n].tolist() == ours.loss_mask
        assert flat["token_loss_mask"][i, n:].sum() == 0
        trained += sum(ours.loss_mask)
    assert int(flat["token_loss_mask"].sum()) == trained > 0
    assert batch["loss_multiplier"].tolist() == [1.0] * 16


def test_nemo_rls_data_path_trains_the_stored_ids_without_tokenising(tiny_compiled, monkeypatch, capsys):
    """Tokenise once: through NeMo-RL's own tokenizer loading and dataset, the processor never tokenises."""
    from nemo_rl.algorithms.utils import get_tokenizer

    import alia_nemo.nemo_rl.processor as processor
    from alia_nemo.engines.nemo_rl import build_datasets

    def refuse(*args, **kwargs):
        raise AssertionError("the processor tokenised a prepared conversation again")

    _, compiled = tiny_compiled
    master = _master(compiled.config)
    tokenizer = get_tokenizer(master.policy["tokenizer"])  # NeMo-RL's loading: its hash must match prepare's
    train, val = build_datasets(master, tokenizer)
    monkeypatch.setattr(processor, "tokenize_conversation", refuse)
    for ds in (train, val):
        for i in range(len(ds)):
            datum = ds[i]
            ours = tokenize_conversation(tokenizer, ds.dataset[i]["messages"])
            assert [t for m in datum["message_log"] for t in m["token_ids"].tolist()] == ours.input_ids
    assert "tokenising every conversation again" not in capsys.readouterr().err


NEMO_RL_RECIPES = [r for r in available_recipes() if load_config([f"recipe={r}"]).engine.name == "nemo_rl"]


@pytest.mark.parametrize("recipe", NEMO_RL_RECIPES)
def test_every_recipe_is_accepted_by_nemo_rls_master_config(recipe, tmp_path):
    pytest.importorskip("nemo_rl.algorithms.sft", reason="MasterConfig needs Python >= 3.12")
    cfg = load_config([f"recipe={recipe}", f"run.output_dir={tmp_path}"])
    if cfg.stage.kind == "dpo":
        pytest.skip("DPO recipes compile to NeMo-RL's DPO MasterConfig: tests/nemo_rl/test_dpo.py checks them")
    compiled = compile_stage(cfg, prepare=cfg.data.name == "sample", progress=False)
    master = _master(compiled.config)
    resolved = compiled.derived["resolved"]
    gbs = master.policy["train_global_batch_size"]
    if cfg.stage.kind == "sft":
        assert gbs == cfg.stage.global_batch_size
    else:  # CPT: tokens_per_update / seq_length, rounded to a multiple of DP x micro-batch (cfg.stage leaves it None)
        unit = resolved["layout"]["dp"] * cfg.stage.micro_batch_size
        assert cfg.stage.global_batch_size is None
        assert gbs == max(unit, round(cfg.stage.tokens_per_update / cfg.stage.seq_length / unit) * unit)
    assert gbs == resolved["global_batch_size"] == resolve(cfg).global_batch_size
    assert master.sft.max_num_steps == resolved["steps"] > 0
    assert master.data["add_eos"] is False
    expected = "AliaTextDataset" if cfg.stage.kind == "cpt" else "AliaSFTDataset"
    assert master.data["train"]["dataset_name"] == f"alia_nemo.nemo_rl.{expected}"
    assert master.data["train"]["use_validation"] is (compiled.derived["val_rows"] > 0)


def test_packed_windows_through_nemo_rl_train_every_token(tmp_path):
    from nemo_rl.algorithms.utils import get_tokenizer
    from nemo_rl.data.collate_fn import rl_collate_fn
    from nemo_rl.data.llm_message_utils import add_loss_mask_to_message_log, batched_message_log_to_flat_message

    from alia_nemo.engines.nemo_rl import build_datasets

    cfg = load_config(["stage=cpt_32k_tiny", "data=cpt_sample", "engine=nemo_rl", "engine.backend=dtensor",
                       "cluster=single_gpu", f"run.output_dir={tmp_path}"])  # fmt: skip
    compiled = compile_stage(cfg, progress=False)
    master = _master(compiled.config)
    tokenizer = get_tokenizer(master.policy["tokenizer"])
    train, val = build_datasets(master, tokenizer)
    assert len(train) == 160 and len(val) == 4
    batch = rl_collate_fn([train[i] for i in range(4)])
    add_loss_mask_to_message_log(batch["message_log"], roles_to_train_on=["assistant"])
    flat, lengths = batched_message_log_to_flat_message(
        batch["message_log"], pad_value_dict={"token_ids": tokenizer.pad_token_id}, make_sequence_length_divisible_by=1
    )
    assert lengths.tolist() == [256] * 4
    assert int(flat["token_loss_mask"].sum()) == 4 * 256
    for i in range(4):
        assert flat["token_ids"][i].tolist() == train.dataset[i]["input_ids"]
