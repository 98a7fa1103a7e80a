"""``AliaTextDataset`` and ``alia_text_processor``: a token-packed CPT corpus for NeMo-RL's SFT loop.

Each row is one window of exactly the stage's sequence length (``alia-nemo prepare`` / ``packing.py``).
The processor puts the whole window into one ``assistant`` message-log entry, so NeMo-RL's role-based
loss mask trains every real token (plain-text CPT has no prompt). Padding of a padded tail window is
left out of the log (NeMo-RL pads batches itself). Rows keep ``doc_starts``/``continues`` for backends
that reset positions at document boundaries; NeMo-RL v0.7's SFT loop has no input for them, so there
attention spans the whole window (as in Megatron's default pretraining).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alia_nemo.nemo_rl.dataset import _IGNORED_KEYS, AliaDataError

TEXT_PROCESSOR_NAME = "alia_text_processor"


def _load_windows(directory: Path, names: list[str], task_name: str):
    import datasets

    files = [str(directory / n) for n in names]
    ds = datasets.Dataset.from_parquet(files, columns=["input_ids", "valid_length", "doc_starts", "continues"])
    return ds.add_column("task_name", [task_name] * len(ds))


class AliaTextDataset:
    """A packed corpus as NeMo-RL's raw dataset: ``dataset`` (train windows) and ``val_dataset``."""

    def __init__(
        self,
        data_path: str,
        task_name: str = "alia_cpt",
        use_validation: bool = True,
        prompt_file: str | None = None,
        system_prompt_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - _IGNORED_KEYS)
        if unknown:
            raise TypeError(f"AliaTextDataset got unknown keys {unknown} in data.train; it takes data_path, task_name")
        if prompt_file or system_prompt_file:
            raise AliaDataError("prompt_file/system_prompt_file do not apply to plain-text windows; set them to null")
        directory = Path(data_path).expanduser()
        if not (directory / "manifest.json").is_file():
            raise AliaDataError(
                f"data.train.data_path={data_path!r} is not a packed corpus (no manifest.json); build it with "
                "`alia-nemo prepare <overrides>` and compile again"
            )
        self.manifest: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
        self.data_path = str(directory)
        self.task_name = task_name
        self.processor_name = kwargs.get("processor") or TEXT_PROCESSOR_NAME
        self.dataset = _load_windows(directory, self.manifest["files"]["train"], task_name)
        val = self.manifest["files"].get("val") or []
        self.val_dataset = _load_windows(directory, val, task_name) if use_validation and val else None
        self.data_config: dict[str, Any] = {}
        self.task_spec: Any = None
        self.processor: Any = None
        self.preprocessor = None

    def __len__(self) -> int:
        return len(self.dataset)

    def set_task_spec(self, data_config: dict[str, Any]) -> None:
        """NeMo-RL's RawDataset contract: keep the entry and build the TaskDataSpec."""
        from nemo_rl.data.interfaces import TaskDataSpec

        self.data_config = dict(data_config)
        self.task_spec = TaskDataSpec(task_name=self.task_name)

    def set_processor(self) -> None:
        """Register the text processor with NeMo-RL (once per process) and bind it."""
        from nemo_rl.data.processors import PROCESSOR_REGISTRY, register_processor

        if TEXT_PROCESSOR_NAME not in PROCESSOR_REGISTRY:
            register_processor(TEXT_PROCESSOR_NAME, alia_text_processor)
        if self.processor_name not in PROCESSOR_REGISTRY:
            raise AliaDataError(f"processor {self.processor_name!r} is not registered; use {TEXT_PROCESSOR_NAME!r}")
        self.processor = PROCESSOR_REGISTRY[self.processor_name]


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
