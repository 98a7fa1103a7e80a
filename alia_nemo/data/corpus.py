"""Plain-text corpora for continued pretraining, streamed: local JSONL / Parquet / Arrow files or the hub.

Nothing is loaded whole: files are read in record batches, hub datasets with ``streaming=True``. Sources
are interleaved in a seeded order that follows their weights, and each source stops once it has supplied
its share of the token budget. Every document left out is counted with its reason.

Bad input follows the policy of the shared reader (:mod:`alia_nemo.data.reader`): a JSONL line that is not
valid UTF-8, not JSON or not a JSON object is a dropped record, counted under its reason; a UTF-8 byte order
mark is stripped; a file that is not UTF-8 text (compressed, UTF-16), or a Parquet / Arrow file that can not
be read, is a :class:`CorpusError` naming the file and the fix.
"""

from __future__ import annotations

import glob
import itertools
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alia_nemo.config.schema import CorpusSourceConfig, TextCorpusConfig
from alia_nemo.data.reader import DataError, InvalidRow, read_local_rows
from alia_nemo.data.workers import Workers

# Texts per tokenising task. Fixed, never derived from the worker count: blocks (and so unused_read_ahead) are
# the same however many workers tokenise them.
TOKENIZE_BLOCK = 64


class CorpusError(DataError):
    """A corpus that can not be read as configured; names the source, the file and the fix."""


@dataclass
class SourceStats:
    """What one source gave: records read == documents + unused_read_ahead + sum(dropped).

    Texts are read and tokenised in blocks of :data:`TOKENIZE_BLOCK`; the counts cover the blocks the packer
    used, whatever the workers read and tokenised beyond them (that speculative read-ahead counts nowhere), so
    they never depend on the number of workers.
    """

    records: int = 0  # records read (every pass) up to the end of the last block used, bad lines included
    documents: int = 0
    tokens: int = 0
    unused_read_ahead: int = 0  # texts of the block in use when the quota was met that were not needed
    passes: int = 0  # completed reads of the whole source (on_shortfall=repeat reads it again)
    dropped: Counter = field(default_factory=Counter)


def _matches(pattern: str) -> list[str]:
    """The files a ``files`` entry names: a glob pattern's matches (sorted), or the path itself when it is a file."""
    matched = sorted(glob.glob(str(Path(pattern).expanduser()))) if any(c in pattern for c in "*?[") else [pattern]
    return [f for f in matched if Path(f).is_file()]


def missing_patterns(corpus: TextCorpusConfig) -> dict[str, list[str]]:
    """Per local source, the ``files`` entries that match no file (what ``prepare --dry-run`` marks MISSING)."""
    missing = {}
    for name, source in corpus.sources.items():
        absent = [pattern for pattern in source.files or [] if not _matches(pattern)]
        if absent:
            missing[name] = absent
    return missing


def expand_files(name: str, patterns: list[str]) -> list[str]:
    """Glob patterns to sorted files; a pattern that matches nothing is an error, not an empty source."""
    files: list[str] = []
    for pattern in patterns:
        matched = _matches(pattern)
        if not matched:
            raise CorpusError(f"corpus source {name!r}: {pattern!r} matches no file; fix data.sources.{name}.files")
        files += matched
    return files


def _read_file(path: str) -> Iterator[dict | InvalidRow]:
    if path.endswith((".parquet", ".jsonl", ".json")):
        yield from read_local_rows([path], CorpusError)
    elif path.endswith(".arrow"):
        import pyarrow as pa

        try:
            yield from _arrow_rows(path)
        except pa.ArrowException as exc:  # not Arrow IPC, truncated, or corrupt
            why = " ".join(str(exc).split())[:300]
            raise CorpusError(
                f"{path}: not a readable Arrow file ({type(exc).__name__}: {why}); re-export it (datasets' "
                "save_to_disk writes Arrow streams), or remove it from the source's files"
            ) from None
    else:
        raise CorpusError(f"{path}: unsupported file type; use .jsonl, .parquet or .arrow")


def _arrow_rows(path: str) -> Iterator[dict]:
    import pyarrow as pa

    with open(path, "rb") as f:
        try:
            reader = pa.ipc.open_stream(f)  # what datasets' save_to_disk writes
        except pa.ArrowInvalid:
            f.seek(0)
            file_reader = pa.ipc.open_file(f)
            for i in range(file_reader.num_record_batches):
                yield from file_reader.get_batch(i).to_pylist()
            return
        for batch in reader:
            yield from batch.to_pylist()


def read_source(name: str, src: CorpusSourceConfig) -> Iterator[dict | InvalidRow]:
    """Raw records of one source, streamed; a bad JSONL line comes as an :class:`InvalidRow`."""
    if src.kind == "local":
        for path in expand_files(name, src.files or []):
            yield from _read_file(path)
        return
    import datasets

    try:
        ds = datasets.load_dataset(src.path, src.name, split=src.split, revision=src.revision, streaming=True)
    except Exception as exc:  # the hub client raises many types; all mean "not available here"
        raise CorpusError(
            f"corpus source {name!r}: could not stream {src.path} ({src.name}, {src.split}): {exc}. "
            f"Download it where there is network, or point data.sources.{name} at local files (kind=local)."
        ) from None
    yield from ds


def documents(
    name: str, src: CorpusSourceConfig, stats: SourceStats, repeat: bool, min_chars: int = 1
) -> Iterator[str]:
    """Document texts of a source, bad records (and texts under ``min_chars``) counted in ``stats.dropped``.

    Endless when ``repeat``, unless a whole pass gave no usable text.
    """
    too_short = f"shorter than min_chars={min_chars}"
    while True:
        produced = False
        for record in read_source(name, src):
            stats.records += 1
            if isinstance(record, InvalidRow):
                stats.dropped[record.reason] += 1
                continue
            if not isinstance(record, dict):  # a hub record is a dict; anything else is no document
                stats.dropped["not a JSON object"] += 1
                continue
            text = record.get(src.text_field)
            if not isinstance(text, str):
                stats.dropped[f"no text in field {src.text_field!r}"] += 1
                continue
            if not text.strip():
                stats.dropped["empty text"] += 1
                continue
            if len(text) < min_chars:
                stats.dropped[too_short] += 1
                continue
            produced = True
            yield text
        stats.passes += 1
        if not (repeat and produced):
            return


def quotas(corpus: TextCorpusConfig, budget: int) -> dict[str, int]:
    """Tokens each source contributes: its weight's share of ``budget`` (largest remainders get the rest)."""
    total = sum(s.weight for s in corpus.sources.values())
    exact = {n: budget * s.weight / total for n, s in corpus.sources.items()}
    out = {n: int(v) for n, v in exact.items()}
    for n in sorted(exact, key=lambda n: exact[n] - out[n], reverse=True)[: budget - sum(out.values())]:
        out[n] += 1
    return out


@dataclass
class TextBlock:
    """Up to :data:`TOKENIZE_BLOCK` consecutive texts of a source (a worker's task), with what reading them took.

    ``records``, ``passes`` and ``dropped`` are the reading done since the previous block; the packer adds them to
    the source's :class:`SourceStats` only when it starts on this block, so blocks read ahead for the workers and
    never used count nowhere.
    """

    texts: list[str]
    add_bos: bool
    records: int = 0
    passes: int = 0
    dropped: Counter = field(default_factory=Counter)


def text_blocks(
    name: str, src: CorpusSourceConfig, corpus: TextCorpusConfig, errors: list[Exception]
) -> Iterator[TextBlock]:
    """The source's usable texts in blocks of :data:`TOKENIZE_BLOCK` (the last one shorter, possibly empty).

    Safe to read ahead of the packer: an error while reading (a corrupt file further on) ends the blocks and is
    appended to ``errors``; the packer raises it only if it needs the texts past it, as when it read on demand.
    """
    read = SourceStats()
    texts_in = documents(name, src, read, corpus.on_shortfall == "repeat", corpus.min_chars)
    try:
        while True:
            records, passes, dropped = read.records, read.passes, read.dropped.copy()
            texts: list[str] = []
            try:
                for text in texts_in:
                    texts.append(text)
                    if len(texts) == TOKENIZE_BLOCK:
                        break
            except Exception as exc:  # any reader error (CorpusError, OSError, the hub's): raised if reached
                errors.append(exc)
                return
            yield TextBlock(texts, corpus.add_bos, read.records - records, read.passes - passes,
                            read.dropped - dropped)  # fmt: skip
            if len(texts) < TOKENIZE_BLOCK:
                return
    finally:
        texts_in.close()  # the source's open file, when the packer stops early


def tokenize_block(tokenizer, block: TextBlock) -> tuple[np.ndarray, np.ndarray]:
    """BOS? + text + EOS of each text of ``block`` as one int32 array, and each document's end in it (a worker task).

    One flat array rather than a list per document: it is what crosses the process (or Ray) boundary.
    """
    if not block.texts:
        return np.empty(0, dtype=np.int32), np.empty(0, dtype=np.int64)
    encoded = tokenizer(block.texts, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if block.add_bos else []
    eos = [tokenizer.eos_token_id]
    ends = np.cumsum([len(bos) + len(ids) + 1 for ids in encoded])
    flat = np.fromiter(itertools.chain.from_iterable(bos + ids + eos for ids in encoded), np.int32, int(ends[-1]))
    return flat, ends


def interleave(
    corpus: TextCorpusConfig,
    tokenizer,
    budget: int,
    seed: int,
    stats: dict[str, SourceStats],
    workers: Workers | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """``(source, token ids)`` per document (BOS? + text + EOS), sources drawn in a seeded weighted order.

    Each source is read until it has supplied its quota of tokens; the document that crosses the quota is
    kept whole (packing cuts at window edges, not here). Texts are tokenised in blocks of :data:`TOKENIZE_BLOCK`
    on ``workers`` (default: this process), a few blocks ahead per source, and used in order: the documents
    and ``stats`` are the same whatever the workers.
    """
    want = quotas(corpus, budget)
    pool = workers if workers is not None else Workers(tokenizer, 1)
    errors: dict[str, list[Exception]] = {n: [] for n in corpus.sources}
    blocks = {n: text_blocks(n, s, corpus, errors[n]) for n, s in corpus.sources.items()}
    streams = {n: pool.imap(tokenize_block, blocks[n]) for n in corpus.sources}
    for n in corpus.sources:
        stats.setdefault(n, SourceStats())
    pending: dict[str, list[np.ndarray]] = {n: [] for n in corpus.sources}
    rng = random.Random(seed)
    active = [n for n in corpus.sources if want[n] > 0]
    try:
        while active:
            name = rng.choices(active, weights=[corpus.sources[n].weight for n in active])[0]
            st = stats[name]
            if not pending[name]:
                got = next(streams[name], None)
                if got is None and errors[name]:
                    raise errors[name][0]  # reading failed where this source's texts were needed
                if got is not None:
                    block, (flat, ends) = got
                    st.records += block.records  # counted now that the block is used, not when read ahead
                    st.passes += block.passes
                    st.dropped.update(block.dropped)
                if got is None or not block.texts:
                    active.remove(name)  # exhausted before its quota: the caller checks the shortfall
                    continue
                pending[name] = np.split(flat, ends[:-1])[::-1]
            ids = pending[name].pop()
            st.documents += 1
            st.tokens += len(ids)
            if st.tokens >= want[name]:
                active.remove(name)
                st.unused_read_ahead += len(pending[name])
                pending[name] = []
                streams[name].close()  # its blocks in flight are not needed
            yield name, ids
    finally:
        for n in corpus.sources:
            streams[n].close()
            blocks[n].close()
