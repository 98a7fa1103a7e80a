"""The CPT side of the NeMo-RL plugins: packed windows as a raw dataset, every real token trained."""

from __future__ import annotations

import pytest
import torch

from alia_nemo.config.compose import load_config
from alia_nemo.config.to_nemo_rl import TEXT_DATASET_CLASS
from alia_nemo.engines.nemo_rl_prepare import compile_stage
from alia_nemo.nemo_rl import AliaTextDataset, alia_text_processor
from alia_nemo.nemo_rl.dataset import AliaDataError


@pytest.fixture(scope="module")
def cpt_compiled(tmp_path_factory, _isolated_cache):
    out = tmp_path_factory.mktemp("cpt_run")
    # Megatron-Core applies llama3 scaling from 8192 positions whatever the config says (test_rope_megatron.py).
    cfg = load_config(["stage=cpt_160k_tiny", "data=cpt_sample", "engine=nemo_rl", "cluster=single_gpu",
                       "engine.backend=megatron", "stage.rope.original_max_position_embeddings=8192",
                       "stage.rope.factor=8", f"run.output_dir={out}"])  # fmt: skip
    return cfg, compile_stage(cfg, progress=False)


def test_compiled_cpt_config(cpt_compiled):
    _, compiled = cpt_compiled
    c = compiled.config
    assert c["data"]["train"]["dataset_name"] == TEXT_DATASET_CLASS
    assert c["data"]["train"]["processor"] == "alia_text_processor"
    assert c["policy"]["max_total_sequence_length"] == c["data"]["max_input_seq_length"] == 1024
    assert c["policy"]["train_global_batch_size"] == 8 and c["sft"]["max_num_steps"] == 4
    m = c["policy"]["megatron_cfg"]
    assert m["optimizer"]["lr"] == m["optimizer"]["min_lr"] == 1e-3 and m["scheduler"]["lr_decay_style"] == "constant"
    assert c["policy"]["hf_config_overrides"]["max_position_embeddings"] == 1024
    assert c["policy"]["hf_config_overrides"]["rope_parameters"]["factor"] == 8.0
    assert compiled.derived["train_rows"] == 32 and compiled.derived["val_rows"] == 4


def test_text_dataset_and_processor(cpt_compiled):
    _, compiled = cpt_compiled
    ds = AliaTextDataset(**compiled.config["data"]["train"])
    assert ds.task_name == "alia_cpt" and len(ds.dataset) == 32 and len(ds.val_dataset) == 4
    row = ds.dataset[0]
    assert len(row["input_ids"]) == 1024 and row["task_name"] == "alia_cpt" and row["doc_starts"][0] == 0
    datum = alia_text_processor(row, None, None, 1024, 3)
    (entry,) = datum["message_log"]
    assert entry["role"] == "assistant"  # NeMo-RL trains every token of an assistant entry
    assert entry["token_ids"].dtype == torch.long and entry["token_ids"].tolist() == row["input_ids"]
    assert datum["length"] == 1024 and datum["loss_multiplier"] == 1.0 and datum["idx"] == 3
    padded = alia_text_processor({**row, "valid_length": 1000}, None, None, 1024, 0)
    assert padded["length"] == 1000  # padding of a tail window is not trained
    with pytest.raises(ValueError, match="add_eos"):
        alia_text_processor(row, None, None, 1024, 0, add_eos=True)
    with pytest.raises(ValueError, match="pack the corpus for this stage"):
        alia_text_processor(row, None, None, 512, 0)
    with pytest.raises(AliaDataError, match="not a packed corpus"):
        AliaTextDataset(data_path="/nonexistent")
