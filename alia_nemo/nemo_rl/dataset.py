"""``AliaSFTDataset``: a prepared SFT mixture as a NeMo-RL raw dataset (loaded by dotted path).

NeMo-RL builds it as ``AliaSFTDataset(**data.train)`` and then calls ``set_task_spec`` and
``set_processor``; it reads ``task_name``, ``dataset``, ``val_dataset``, ``task_spec`` and ``processor``.
Rows are read from the mixture's Parquet shards, memory-mapped by ``datasets``; each row gives
``messages`` (decoded on access), ``task_name``, ``id``, ``source`` and ``language``, and the token ids and loss
mask ``prepare`` stored (``input_ids``, ``loss_mask``) with the hashes of the tokenizer and template that made them
(``prepared_tokenizer_sha256``, ``prepared_template_sha256``), so the processor does not tokenise again.
NeMo-RL is imported only inside ``set_task_spec``/``set_processor``, which only NeMo-RL calls.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from alia_nemo.errors import AliaError

PROCESSOR_NAME = "alia_sft_processor"
# Keys NeMo-RL's dataset entries may carry that mean nothing for a prepared mixture.
_IGNORED_KEYS = {"dataset_name", "processor", "env_name", "split", "seed", "download_dir"}


class AliaDataError(AliaError, ValueError):
    """A prepared mixture that can not be read; names the path and how to build it."""


def _decode(batch: dict[str, list], prepared_with: dict[str, str] | None = None) -> dict[str, list]:
    batch = dict(batch)
    batch["messages"] = [json.loads(m) for m in batch["messages"]]
    if prepared_with and "input_ids" in batch:
        # What the stored ids were made with: the processor uses them only for the same tokenizer and template.
        n = len(batch["messages"])
        for key, value in prepared_with.items():
            batch[key] = [value] * n
    return batch


def shard_files(directory: Path, names: list[str], kind: str = "prepared mixture") -> list[str]:
    """The shard paths a manifest lists, each one checked to be a file inside ``directory``."""
    files = [str(directory / n) for n in names]
    outside = [n for n in names if not isinstance(n, str) or Path(n).name != n]
    if outside:  # a manifest names its own shards only: a path elsewhere means it was edited or is corrupt
        raise AliaDataError(
            f"{kind} {directory} lists shards outside it: {outside}; rebuild it with `alia-nemo prepare`"
        )
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise AliaDataError(f"{kind} {directory} lacks {missing}; rebuild it with `alia-nemo prepare`")
    return files


STORED_COLUMNS = ("input_ids", "loss_mask")


def _load_split(directory: Path, names: list[str], task_name: str, prepared_with: dict[str, str] | None = None):
    import datasets
    import pyarrow.parquet as pq

    files = shard_files(directory, names)
    columns = ["id", "source", "language", "messages"]
    if files and all(c in pq.read_schema(files[0]).names for c in STORED_COLUMNS):
        columns += STORED_COLUMNS  # tokenised by prepare: the processor need not tokenise again
    ds = datasets.Dataset.from_parquet(files, columns=columns)
    ds = ds.add_column("task_name", [task_name] * len(ds))
    # JSON -> list of messages when a row is read, not for the whole set up front
    ds.set_transform(partial(_decode, prepared_with=prepared_with))
    return ds


class PreparedRawDataset:
    """NeMo-RL's RawDataset contract over a directory we prepared (``manifest.json`` + Parquet shards).

    NeMo-RL builds it as ``Class(**data.train)``, then calls ``set_task_spec`` and ``set_processor``; it reads
    ``task_name``, ``dataset``, ``val_dataset``, ``task_spec`` and ``processor``. Subclasses say what kind of
    directory they read, how rows load, and which processor they register.

    Args:
        data_path: the prepared directory (it holds ``manifest.json``).
        task_name: the NeMo-RL task these rows belong to.
        use_validation: expose the held-out rows as ``val_dataset``.
        prompt_file, system_prompt_file: must be null (prepared rows are final).
    Other keys NeMo-RL passes from the dataset entry (``dataset_name``, ``processor``, ...) are accepted;
    unknown keys are refused so a typo does not pass silently.
    """

    KIND = "prepared directory"
    DEFAULT_TASK = "alia"
    PROCESSOR = ""
    PROMPT_FILE_PROBLEM = "prompt_file/system_prompt_file do not apply here; set them to null"

    def __init__(
        self,
        data_path: str,
        task_name: str | None = None,
        use_validation: bool = True,
        prompt_file: str | None = None,
        system_prompt_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - _IGNORED_KEYS)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown keys {unknown} in data.train; it takes data_path, task_name, "
                "use_validation (and NeMo-RL's dataset_name/processor)"
            )
        if prompt_file or system_prompt_file:
            raise AliaDataError(self.PROMPT_FILE_PROBLEM)
        directory = Path(data_path).expanduser()
        manifest_path = directory / "manifest.json"
        if not manifest_path.is_file():
            raise AliaDataError(
                f"data.train.data_path={data_path!r} is not a {self.KIND} (no manifest.json); build it with "
                "`alia-nemo prepare <overrides>` and compile again (alia-nemo compile fills in the path)"
            )
        self.data_path = str(directory)
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
            train_files = self.manifest["files"]["train"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AliaDataError(
                f"{manifest_path} is corrupt ({type(exc).__name__}: {exc}); delete {directory} and run "
                "`alia-nemo prepare` again"
            ) from None
        self.task_name = task_name or self.DEFAULT_TASK
        self.processor_name = kwargs.get("processor") or self.PROCESSOR
        self.dataset = self.load_split(directory, train_files, self.task_name)
        val_files = self.manifest["files"].get("val") or []
        use_val = use_validation and val_files
        self.val_dataset = self.load_split(directory, val_files, self.task_name) if use_val else None
        self.data_config: dict[str, Any] = {}
        self.task_spec: Any = None
        self.processor: Any = None
        self.preprocessor = None

    def load_split(self, directory: Path, names: list[str], task_name: str):
        raise NotImplementedError

    def processor_function(self):
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.dataset)

    def set_task_spec(self, data_config: dict[str, Any]) -> None:
        """NeMo-RL's RawDataset contract: keep the entry and build the TaskDataSpec."""
        from nemo_rl.data.interfaces import TaskDataSpec

        self.data_config = dict(data_config)
        self.task_spec = TaskDataSpec(task_name=self.task_name)

    def set_processor(self) -> None:
        """Register our processor with NeMo-RL (once per process) and bind the one the entry names."""
        from nemo_rl.data.processors import PROCESSOR_REGISTRY, register_processor

        if self.PROCESSOR not in PROCESSOR_REGISTRY:
            register_processor(self.PROCESSOR, self.processor_function())
        if self.processor_name not in PROCESSOR_REGISTRY:
            raise AliaDataError(f"processor {self.processor_name!r} is not registered; use {self.PROCESSOR!r}")
        self.processor = PROCESSOR_REGISTRY[self.processor_name]


class AliaSFTDataset(PreparedRawDataset):
    """A mixture prepared by ``alia-nemo prepare``, split into ``dataset`` (train) and ``val_dataset``."""

    KIND = "prepared mixture"
    DEFAULT_TASK = "alia_sft"
    PROCESSOR = PROCESSOR_NAME
    PROMPT_FILE_PROBLEM = (
        "prompt_file/system_prompt_file would rewrite prepared conversations; set them to null "
        "(system turns belong in the data)"
    )

    def load_split(self, directory: Path, names: list[str], task_name: str):
        tokenizer = self.manifest.get("tokenizer") or {}
        prepared_with = {"prepared_tokenizer_sha256": tokenizer.get("sha256"),
                         "prepared_template_sha256": self.manifest.get("template_sha256")}  # fmt: skip
        return _load_split(directory, names, task_name, prepared_with)

    def processor_function(self):
        from alia_nemo.nemo_rl.processor import alia_sft_processor

        return alia_sft_processor
