"""Read messages-JSONL conversations, check them, split train/validation and tokenise with loss masks.

Nothing is dropped silently: every conversation left out is counted under its reason in the report
that ``prepare_sft`` returns (and the engines write to ``data_report.json``); rows read == train + val +
dropped.

Bad input follows the same policy as the mixture (:mod:`alia_nemo.sft_mixture`, which reads the lines):
a line that is not valid UTF-8, not JSON, not a JSON object, or not a usable conversation is a bad row
(``data.on_invalid=error`` stops at it naming file:line and the fix, ``drop`` counts it under its reason); a
UTF-8 byte order mark is stripped; a file that is not UTF-8 text at all is an error naming the file.
Message contents follow :func:`alia_nemo.chatml.content_text` (text parts are joined, any other
non-string content is the bad-row reason ``content_not_text``), exactly as in the mixture.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alia_nemo.chatml import ConversationError, checked_messages, tokenize_conversation
from alia_nemo.config_schema import AliaConfig, DataConfig, TextCorpusConfig
from alia_nemo.errors import AliaError


class DataError(AliaError, ValueError):
    """A data file or row that can not be used; names the file, the row and the fix."""


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
    from alia_nemo.sft_mixture import InvalidRow, iter_jsonl

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
    """Seeded, disjoint split; at least one validation conversation when the fraction is positive."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(items) * val_fraction)) if val_fraction > 0 and len(items) > 1 else 0
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


def prepare_data(cfg: AliaConfig, tokenizer) -> PreparedSFT:
    """Training rows for a run: JSONL files tokenised now, a mixture or a packed corpus prepared (or cached)."""
    if isinstance(cfg.data, DataConfig):
        return prepare_sft(cfg.data, tokenizer, cfg.stage.seq_length, cfg.run.seed)
    if isinstance(cfg.data, TextCorpusConfig):
        from alia_nemo.packing import load_packed, prepare_corpus

        directory = prepare_corpus(cfg.data, tokenizer, cfg.stage.seq_length, corpus_tokens(cfg), cfg.run.seed)
        train, val, manifest = load_packed(directory)
        report = {
            "prepared": str(directory),
            "train": len(train),
            "val": len(val),
            "shortfall_windows": manifest["shortfall_windows"],
            "packing": manifest["packing"],
            "sources": manifest["sources"],
        }
        return PreparedSFT(train, val, report)
    from alia_nemo.sft_mixture import load_prepared, prepare_mixture

    max_tokens = min(cfg.data.max_tokens or cfg.stage.seq_length, cfg.stage.seq_length)
    directory = prepare_mixture(cfg.data, tokenizer, max_tokens, cfg.run.seed)
    train, val, manifest = load_prepared(directory)
    report = {"prepared": str(directory), "train": len(train), "val": len(val), **manifest["totals"]}
    return PreparedSFT(train, val, report)


def corpus_tokens(cfg: AliaConfig) -> int:
    """Training tokens to pack for a CPT stage: data.max_tokens, else every step's full windows."""
    assert isinstance(cfg.data, TextCorpusConfig)
    if cfg.data.max_tokens:
        return cfg.data.max_tokens
    steps = cfg.stage.max_steps
    if steps is None:
        raise DataError("a CPT stage needs stage.token_budget or stage.max_steps to know how much to pack")
    return steps * (cfg.stage.global_batch_size or 1) * cfg.stage.seq_length
