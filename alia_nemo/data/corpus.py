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
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from alia_nemo.config.schema import CorpusSourceConfig, TextCorpusConfig
from alia_nemo.data.reader import DataError, InvalidRow, read_local_rows


class CorpusError(DataError):
    """A corpus that can not be read as configured; names the source, the file and the fix."""


@dataclass
class SourceStats:
    """What one source gave: records read == documents + unused_read_ahead + sum(dropped)."""

    records: int = 0  # records read (every pass), bad lines included
    documents: int = 0
    tokens: int = 0
    unused_read_ahead: int = 0  # documents tokenised in the last batch but not needed once the quota was met
    passes: int = 0  # completed reads of the whole source (on_shortfall=repeat reads it again)
    dropped: Counter = field(default_factory=Counter)


def expand_files(name: str, patterns: list[str]) -> list[str]:
    """Glob patterns to sorted files; a pattern that matches nothing is an error, not an empty source."""
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(str(Path(pattern).expanduser()))) if any(c in pattern for c in "*?[") else [pattern]
        matched = [f for f in matched if Path(f).is_file()]
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


def documents(name: str, src: CorpusSourceConfig, stats: SourceStats, repeat: bool) -> Iterator[str]:
    """Document texts of a source, bad records counted in ``stats.dropped``; endless when ``repeat``."""
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


def interleave(
    corpus: TextCorpusConfig, tokenizer, budget: int, seed: int, stats: dict[str, SourceStats]
) -> Iterator[tuple[str, list[int]]]:
    """``(source, token ids)`` per document (BOS? + text + EOS), sources drawn in a seeded weighted order.

    Each source is read until it has supplied its quota of tokens; the document that crosses the quota is
    kept whole (packing cuts at window edges, not here).
    """
    want = quotas(corpus, budget)
    repeat = corpus.on_shortfall == "repeat"
    streams = {n: documents(n, s, stats.setdefault(n, SourceStats()), repeat) for n, s in corpus.sources.items()}
    pending: dict[str, list[list[int]]] = {n: [] for n in streams}
    rng = random.Random(seed)
    active = [n for n in streams if want[n] > 0]
    bos = [tokenizer.bos_token_id] if corpus.add_bos else []
    eos = [tokenizer.eos_token_id]
    while active:
        name = rng.choices(active, weights=[corpus.sources[n].weight for n in active])[0]
        if not pending[name]:
            texts = []
            for text in streams[name]:
                if len(text) < corpus.min_chars:
                    stats[name].dropped[f"shorter than min_chars={corpus.min_chars}"] += 1
                    continue
                texts.append(text)
                if len(texts) == 64:
                    break
            if not texts:
                active.remove(name)  # exhausted before its quota: the caller checks the shortfall
                continue
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
            pending[name] = [bos + ids + eos for ids in reversed(encoded)]
        ids = pending[name].pop()
        st = stats[name]
        st.documents += 1
        st.tokens += len(ids)
        if st.tokens >= want[name]:
            active.remove(name)
            st.unused_read_ahead += len(pending[name])
            pending[name] = []
        yield name, ids
