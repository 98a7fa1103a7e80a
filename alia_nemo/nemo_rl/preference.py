"""``AliaPreferenceDataset`` and ``alia_preference_processor``: prepared preference pairs for NeMo-RL's DPO.

A prepared preference directory (``alia-nemo prepare`` with ``data.format=preference``) holds ``manifest.json`` and
Parquet shards of pairs: ``prompt`` (the JSON message list, ending with a user turn), ``chosen`` and ``rejected``
answers, and the ids and loss masks ``prepare`` computed for both (``chosen_input_ids``, ``chosen_loss_mask``,
``rejected_input_ids``, ``rejected_loss_mask``; mask 1 on the answer's content and its ``<|im_end|>`` only).

NeMo-RL builds the dataset as ``AliaPreferenceDataset(**data.train)`` through its own ``load_preference_dataset``
(dotted path). Each row also carries NeMo-RL's preference shape, ``context`` (the prompt messages) and
``completions`` (``[{rank 0, [chosen]}, {rank 1, [rejected]}]``), so upstream ``examples/run_dpo.py``, which uses
NeMo-RL's own ``preference_preprocessor``, reads the same pairs (that preprocessor tokenises again and trains the
whole final turn, header and EOS included; ``alia-nemo train`` uses :func:`alia_preference_processor`).

NeMo-RL's DPO collate (``preference_collate_fn``) builds the loss mask with ``only_unmask_final=True``: only the
last message-log entry of each sequence is trained. The processor therefore cuts each sequence in two entries,
the prompt (BOS, every prompt turn and the ``<|im_start|>assistant\\n`` header) and the answer (its content and
``<|im_end|>``): NeMo-RL then trains exactly our mask.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from alia_nemo.nemo_rl.dataset import AliaDataError, PreparedRawDataset, shard_files

PREFERENCE_PROCESSOR_NAME = "alia_preference_processor"
PREFERENCE_TASK = "alia_dpo"
STORED_PAIR_COLUMNS = ("chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask")
SPLITS = ("train", "validation")


def _decode_pairs(batch: dict[str, list], prepared_with: dict[str, str | None]) -> dict[str, list]:
    """Rows as read: the prompt decoded, NeMo-RL's ``context``/``completions`` added, the prepare hashes attached."""
    batch = dict(batch)
    prompts = [json.loads(p) for p in batch["prompt"]]
    batch["prompt"] = prompts
    batch["context"] = prompts
    batch["completions"] = [
        [{"rank": 0, "completion": [{"role": "assistant", "content": chosen}]},
         {"rank": 1, "completion": [{"role": "assistant", "content": rejected}]}]
        for chosen, rejected in zip(batch["chosen"], batch["rejected"])
    ]  # fmt: skip
    if "chosen_input_ids" in batch:
        # What the stored ids were made with: the processor uses them only for the same tokenizer and template.
        for key, value in prepared_with.items():
            batch[key] = [value] * len(prompts)
    return batch


def _load_pairs(directory: Path, names: list[str], task_name: str, prepared_with: dict[str, str | None]):
    import datasets
    import pyarrow.parquet as pq

    files = shard_files(directory, names, "prepared preference set")
    columns = ["id", "source", "language", "prompt", "chosen", "rejected"]
    if files and all(c in pq.read_schema(files[0]).names for c in STORED_PAIR_COLUMNS):
        columns += STORED_PAIR_COLUMNS  # tokenised by prepare: the processor need not tokenise again
    ds = datasets.Dataset.from_parquet(files, columns=columns)
    ds = ds.add_column("task_name", [task_name] * len(ds))
    ds.set_transform(partial(_decode_pairs, prepared_with=prepared_with))  # decoded per row read, not up front
    return ds


class AliaPreferenceDataset(PreparedRawDataset):
    """A prepared preference set as NeMo-RL's raw dataset: ``dataset`` (train pairs) and ``val_dataset``.

    ``split: validation`` (the compiled ``data.validation`` entry) exposes the held-out pairs as ``dataset``, which
    is where NeMo-RL's ``setup_preference_data`` (upstream ``run_dpo.py``) and our driver take validation rows from.
    """

    KIND = "prepared preference set"
    DEFAULT_TASK = PREFERENCE_TASK
    PROCESSOR = PREFERENCE_PROCESSOR_NAME
    PROMPT_FILE_PROBLEM = (
        "prompt_file/system_prompt_file would rewrite prepared prompts (and not the stored token ids); set them to "
        "null (system turns belong in the data)"
    )

    def __init__(
        self,
        data_path: str,
        task_name: str | None = None,
        use_validation: bool = True,
        prompt_file: str | None = None,
        system_prompt_file: str | None = None,
        split: str = "train",
        **kwargs: Any,
    ) -> None:
        if split not in SPLITS:
            raise AliaDataError(f"split={split!r} is not a split of a prepared preference set; use one of {SPLITS}")
        super().__init__(
            data_path, task_name, use_validation or split == "validation", prompt_file, system_prompt_file, **kwargs
        )
        self.split = split
        if split == "validation":
            if self.val_dataset is None:
                raise AliaDataError(
                    f"{self.data_path} holds no validation pairs; prepare it with data.val_fraction > 0, or compile "
                    "without validation (data.validation: null)"
                )
            self.dataset, self.val_dataset = self.val_dataset, None

    def load_split(self, directory: Path, names: list[str], task_name: str):
        if self.manifest.get("format") != "preference":
            raise AliaDataError(
                f"{directory} holds no preference pairs (its manifest's format is {self.manifest.get('format')!r}, "
                "not 'preference'); prepare the DPO stage's data (data=dpo_sample, data=preference_mixture) and "
                "compile again"
            )
        tokenizer = self.manifest.get("tokenizer") or {}
        prepared_with = {"prepared_tokenizer_sha256": tokenizer.get("sha256"),
                         "prepared_template_sha256": self.manifest.get("template_sha256")}  # fmt: skip
        return _load_pairs(directory, names, task_name, prepared_with)

    def processor_function(self):
        return alia_preference_processor


def _trained_suffix(mask: Sequence[int], pair_id: str, which: str) -> int:
    """Where the trained run starts: ``mask`` must be zeros (the prompt, at least its BOS), then ones to its end."""
    flags = bytes(mask) if not hasattr(mask, "astype") else mask.astype("int8").tobytes()
    start = flags.find(1)
    if start < 1 or flags.find(0, start) >= 0:
        raise ValueError(
            f"pair {pair_id}: the {which} loss mask is not one trained run at the end of the sequence (the answer "
            "and its <|im_end|>); the tokenizer merged the answer with the header before it, or the stored mask is "
            "not ALIA's preference mask: prepare the pairs again with alia-nemo prepare"
        )
    return start


def _message_log(
    prompt: Sequence[Mapping[str, str]], answer: str, ids: Sequence[int], mask: Sequence[int], bos: str,
    pair_id: str, which: str,
) -> list[dict[str, Any]]:  # fmt: skip
    """Two entries: the prompt (untrained) and the answer's content + ``<|im_end|>`` (trained, the last entry)."""
    from alia_nemo.model.chatml import preference_segments

    cut = _trained_suffix(mask, pair_id, which)
    segments = preference_segments(prompt, answer, bos)
    return [
        {"role": prompt[0]["role"], "content": "".join(s.text for s in segments[:-1]), "token_ids": list(ids[:cut])},
        {"role": "assistant", "content": segments[-1].text, "token_ids": list(ids[cut:])},
    ]


def _cut(log: list[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """The first ``keep`` tokens of a message log (entries emptied by the cut are dropped)."""
    for m in log:
        m["token_ids"], keep = m["token_ids"][:keep], max(0, keep - len(m["token_ids"]))
    return [m for m in log if len(m["token_ids"])]


def alia_preference_processor(
    datum_dict: dict[str, Any],
    task_data_spec: Any,
    tokenizer: Any,
    max_seq_length: int | None,
    idx: int,
    add_bos: bool = True,
    add_eos: bool = False,
    add_generation_prompt: bool = False,
) -> dict[str, Any]:
    """NeMo-RL ``TaskDataProcessFnCallable``: a prepared pair -> a ``PreferenceDatumSpec``.

    Each message log's last entry is exactly the answer's content and ``<|im_end|>`` (what NeMo-RL's DPO collate
    trains). Stored ids are used when ``prepare`` made them with this tokenizer and our template
    (:func:`~alia_nemo.nemo_rl.processor.stored_tokens_usable`), else the pair is tokenised again. A pair whose
    longer sequence exceeds ``max_seq_length`` is cut to it and gets ``loss_multiplier`` 0 (and a message), as the
    SFT processor does: the driver counts such pairs as batches arrive.
    """
    from alia_nemo.model.chatml import tokenize_preferences
    from alia_nemo.nemo_rl.processor import entry_tensors, stored_tokens_usable

    if add_eos:
        raise ValueError(
            "data.add_eos=true would append </s> after <|im_end|> and train it; ALIA's ChatML ends turns with "
            "<|im_end|>: leave data.add_eos unset or false (alia-nemo compile does)"
        )
    if add_generation_prompt:
        raise ValueError("data.add_generation_prompt=true does not apply to preference pairs; set it to false")
    prompt, chosen, rejected = datum_dict["prompt"], datum_dict["chosen"], datum_dict["rejected"]
    pid = str(datum_dict.get("id", f"#{idx}"))
    stored = {
        "input_ids": datum_dict.get("chosen_input_ids"),
        "loss_mask": datum_dict.get("chosen_loss_mask"),
        "prepared_tokenizer_sha256": datum_dict.get("prepared_tokenizer_sha256"),
        "prepared_template_sha256": datum_dict.get("prepared_template_sha256"),
    }
    if datum_dict.get("rejected_input_ids") is not None and stored_tokens_usable(stored, tokenizer):
        sequences = [
            (datum_dict["chosen_input_ids"], datum_dict["chosen_loss_mask"]),
            (datum_dict["rejected_input_ids"], datum_dict["rejected_loss_mask"]),
        ]
    else:
        ((c, r),) = tokenize_preferences(tokenizer, [(prompt, chosen, rejected)], [pid])
        sequences = [(c.input_ids, c.loss_mask), (r.input_ids, r.loss_mask)]
    logs = [
        _message_log(prompt, answer, ids, mask, tokenizer.bos_token, pid, which)
        for (ids, mask), answer, which in zip(sequences, (chosen, rejected), ("chosen", "rejected"))
    ]
    for log in logs:
        if not add_bos and log[0]["token_ids"][:1] == [tokenizer.bos_token_id]:
            log[0]["token_ids"] = log[0]["token_ids"][1:]
            log[0]["content"] = log[0]["content"].removeprefix(tokenizer.bos_token)
    lengths = [sum(len(m["token_ids"]) for m in log) for log in logs]
    loss_multiplier = 1.0
    if max_seq_length is not None and max(lengths) > max_seq_length:
        # Can not happen with pairs prepared for this length; if it does, say so instead of NeMo-RL's silence.
        # This may run in a dataloader worker process: the engine counts masked pairs where batches are consumed.
        print(
            f"[alia-nemo] preference pair {pid} has {lengths[0]} (chosen) / {lengths[1]} (rejected) tokens > "
            f"max_input_seq_length={max_seq_length}: masked out (loss 0); prepare the pairs for this length",
            file=sys.stderr,
        )
        logs = [_cut(log, max_seq_length) for log in logs]
        lengths = [sum(len(m["token_ids"]) for m in log) for log in logs]
        loss_multiplier = 0.0
    for log in logs:
        entry_tensors(log)
    return {
        "message_log_chosen": logs[0],
        "message_log_rejected": logs[1],
        "length_chosen": lengths[0],
        "length_rejected": lengths[1],
        "loss_multiplier": loss_multiplier,
        "idx": idx,
        "task_name": datum_dict.get("task_name", getattr(task_data_spec, "task_name", None)),
    }
