"""``AliaTextDataset`` and ``alia_text_processor``: a token-packed CPT corpus for NeMo-RL's SFT loop.

Each row is one window of exactly the stage's sequence length (``alia-nemo prepare`` / ``packing.py``).
The processor puts the whole window into one ``assistant`` message-log entry, so NeMo-RL's role-based
loss mask trains every real token (plain-text CPT has no prompt). Padding of a padded tail window is
left out of the log (NeMo-RL pads batches itself). Rows keep ``doc_starts``/``continues`` for backends
that reset positions at document boundaries; NeMo-RL v0.7's SFT loop has no input for them, so there
attention spans the whole window (as in Megatron's default pretraining).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alia_nemo.nemo_rl.dataset import PreparedRawDataset, shard_files

TEXT_PROCESSOR_NAME = "alia_text_processor"


def _load_windows(directory: Path, names: list[str], task_name: str):
    import datasets

    files = shard_files(directory, names, "packed corpus")
    ds = datasets.Dataset.from_parquet(files, columns=["input_ids", "valid_length", "doc_starts", "continues"])
    return ds.add_column("task_name", [task_name] * len(ds))


class AliaTextDataset(PreparedRawDataset):
    """A packed corpus as NeMo-RL's raw dataset: ``dataset`` (train windows) and ``val_dataset``."""

    KIND = "packed corpus"
    DEFAULT_TASK = "alia_cpt"
    PROCESSOR = TEXT_PROCESSOR_NAME
    PROMPT_FILE_PROBLEM = "prompt_file/system_prompt_file do not apply to plain-text windows; set them to null"

    def load_split(self, directory: Path, names: list[str], task_name: str):
        return _load_windows(directory, names, task_name)

    def processor_function(self):
        return alia_text_processor


def alia_text_processor(
    datum_dict: dict[str, Any],
    task_data_spec: Any,
    tokenizer: Any,
    max_seq_length: int | None,
    idx: int,
    add_bos: bool = True,
    add_eos: bool = False,
    add_generation_prompt: bool = False,
) -> dict[str, Any]:
    """NeMo-RL ``TaskDataProcessFnCallable``: a packed window -> a DatumSpec with every real token trained.

    The window already holds BOS/EOS per document, so ``add_bos``/``add_eos`` must not add more.
    """
    import torch

    if add_eos or add_generation_prompt:
        raise ValueError(
            "packed windows already end documents with EOS: set data.add_eos and add_generation_prompt false"
        )
    n = int(datum_dict["valid_length"])
    ids = torch.tensor(datum_dict["input_ids"][:n], dtype=torch.long)
    if max_seq_length is not None and n > max_seq_length:
        raise ValueError(
            f"window {idx} has {n} tokens > max_input_seq_length={max_seq_length}; pack the corpus for this stage"
        )
    return {
        "message_log": [{"role": "assistant", "content": "", "token_ids": ids}],
        "length": n,
        "extra_env_info": None,
        "loss_multiplier": 1.0,
        "idx": idx,
        "task_name": datum_dict.get("task_name", getattr(task_data_spec, "task_name", None)),
    }
