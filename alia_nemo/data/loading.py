"""Read messages-JSONL conversations, check them, split train/validation and tokenise with loss masks.

Nothing is dropped silently: every conversation left out is counted under its reason in the report
that ``prepare_sft`` returns (and the local engine writes to ``data_report.json``); rows read == train + val +
dropped.

Bad input follows the same policy as the mixture (:mod:`alia_nemo.data.mixture`, which reads the lines):
a line that is not valid UTF-8, not JSON, not a JSON object, or not a usable conversation is a bad row
(``data.on_invalid=error`` stops at it naming file:line and the fix, ``drop`` counts it under its reason); a
UTF-8 byte order mark is stripped; a file that is not UTF-8 text at all is an error naming the file.
Message contents follow :func:`alia_nemo.model.chatml.content_text` (text parts are joined, any other
non-string content is the bad-row reason ``content_not_text``), exactly as in the mixture.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alia_nemo.config.resolve import validation_count
from alia_nemo.config.schema import DataConfig
from alia_nemo.data.reader import DataError, InvalidRow, iter_jsonl
from alia_nemo.model.chatml import ConversationError, checked_messages, tokenize_conversation


@dataclass
class Conversation:
    id: str
    messages: list[dict[str, str]]
    language: str | None = None


@dataclass
class PreparedSFT:
    train: list[dict[str, list[int]]]
    val: list[dict[str, list[int]]]
    report: dict[str, Any] = field(default_factory=dict)


def _row_id(row: dict, fallback: str) -> str:
    """The row's id as text (a string or a number); ``fallback`` (its file:line) when it has none usable."""
    value = row.get("id")
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return fallback


def read_conversations(files: list[str], on_invalid: str = "error") -> tuple[list[Conversation], Counter]:
    """Parse and check every row of ``files``. Bad rows stop the read (``error``) or are counted (``drop``)."""
    conversations: list[Conversation] = []
    dropped: Counter = Counter()
    seen: set[str] = set()
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise DataError(f"data file {file!r} does not exist; fix data.files")
        for lineno, row in iter_jsonl(file, DataError):
            where = f"{path.name}:{lineno}"
            try:
                if isinstance(row, InvalidRow):
                    raise ConversationError(where, row.reason)
                if "messages" not in row:
                    raise ConversationError(where, "row must be a JSON object with a 'messages' list")
                # Rows without an id are named by file:line; the path as given keeps two d.jsonl apart.
                cid = _row_id(row, where if len({Path(f).name for f in files}) == len(files) else f"{file}:{lineno}")
                if cid in seen:
                    raise ConversationError(
                        cid, f"duplicate id at {where}; ids must be unique across data.files", reason="duplicate id"
                    )
                messages = checked_messages(row["messages"], cid)
            except ConversationError as exc:
                if on_invalid == "error":
                    problem = exc.problem if isinstance(row, InvalidRow) else str(exc)
                    raise DataError(
                        f"{where}: {problem}. Fix the row, or set data.on_invalid=drop to skip and count such rows"
                    ) from None
                dropped[exc.reason] += 1
                continue
            seen.add(cid)
            language = row.get("language")
            conversations.append(Conversation(cid, messages, language if isinstance(language, str) else None))
    return conversations, dropped


def split_train_val(
    items: list[Conversation], val_fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Seeded, disjoint split: ceil(fraction x conversations) held out (the rule every count uses)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = validation_count(len(items), val_fraction) if len(items) > 1 else 0
    val_idx = set(order[:n_val])
    return [c for i, c in enumerate(items) if i not in val_idx], [c for i, c in enumerate(items) if i in val_idx]


def prepare_sft(data: DataConfig, tokenizer, seq_length: int, seed: int) -> PreparedSFT:
    """Read, check, split and tokenise; overlong conversations are dropped and counted, never truncated."""
    conversations, dropped = read_conversations(data.files, data.on_invalid)
    rows_read = len(conversations) + sum(dropped.values())
    train_c, val_c = split_train_val(conversations, data.val_fraction, seed)
    out: dict[str, list[dict[str, list[int]]]] = {"train": [], "val": []}
    tokens: Counter = Counter()
    languages: Counter = Counter()
    for split, convs in (("train", train_c), ("val", val_c)):
        for conv in convs:
            tok = tokenize_conversation(tokenizer, conv.messages, conv.id)
            if len(tok.input_ids) > seq_length:
                # Cutting a conversation would train on a truncated answer; drop it and say so.
                dropped[f"longer than stage.seq_length={seq_length} tokens"] += 1
                continue
            out[split].append({"input_ids": tok.input_ids, "labels": tok.labels})
            tokens[f"{split}_tokens"] += len(tok.input_ids)
            tokens[f"{split}_trained_tokens"] += sum(tok.loss_mask)
            if split == "train":
                languages[conv.language or "unknown"] += 1
    if not out["train"]:
        raise DataError(
            f"no training conversation left in {list(data.files)} ({rows_read} rows read, dropped: {dict(dropped)}); "
            "check data.files (one {'messages': [...]} object per line), data.on_invalid and stage.seq_length"
        )
    report = {
        "files": list(data.files),
        "conversations_read": rows_read,
        "train": len(out["train"]),
        "val": len(out["val"]),
        "dropped": dict(dropped),
        "train_languages": dict(sorted(languages.items())),
        **dict(tokens),
    }
    return PreparedSFT(out["train"], out["val"], report)
