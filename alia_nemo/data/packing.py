"""Token packing for continued pretraining: documents joined with EOS into windows of exactly seq_length.

The token stream (each document as BOS? + text + EOS, in the corpus' seeded order) is cut into
consecutive windows: no padding inside the stream, nothing lost or repeated, documents split across
window edges. Each window keeps its document boundaries (``doc_starts``: offsets where a segment of a
single document starts, 0 always included; ``continues``: whether offset 0 continues the previous
window's document) so a backend can reset positions or mask attention across documents. The last,
partial window is dropped or padded by policy, and counted. ``prepare_corpus`` writes windows as
Parquet shards plus ``manifest.json`` into a hash-keyed directory (local files keyed by their content's
sha256) that appears atomically, built once per key across processes and hosts: a concurrent prepare of the
same key waits for the build's lock and reuses its result (:func:`alia_nemo.data.cache.build_cached`). Texts
are tokenised on ``data.workers`` (in-process, local processes or Ray actors) in fixed blocks used in order, so
the output never depends on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alia_nemo.config.schema import TextCorpusConfig
from alia_nemo.data.cache import (
    WAIT_S,
    build_cached,
    cache_dir,
    code_version,
    file_fingerprint,
    read_manifest,
    tokenizer_hash,
)
from alia_nemo.data.corpus import CorpusError, SourceStats, expand_files, interleave
from alia_nemo.data.workers import Workers

# Flush windows to Parquet every ~4M tokens (one shard each): peak memory is a few batches' worth of
# tokens whatever the corpus size (benchmarks/bench_packing.py measures it).
WRITE_BATCH_TOKENS = 1 << 22


@dataclass
class Window:
    input_ids: np.ndarray  # int32, exactly seq_length long
    doc_starts: list[int]  # offsets where a single-document segment starts; always starts with 0
    continues: bool  # offset 0 continues the previous window's document
    valid_length: int  # tokens before padding (seq_length unless this is a padded tail)
    sources: list[str] = field(default_factory=list)  # the source of each segment


@dataclass
class PackReport:
    seq_length: int
    tail_policy: str
    documents: int = 0
    stream_tokens: int = 0
    windows: int = 0
    pad_tokens: int = 0
    tail_tokens: int = 0  # tokens of the last partial window (dropped, or kept with padding)
    tail: list[int] = field(default_factory=list, repr=False)  # the dropped tail itself

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("tail")
        packed = self.windows * self.seq_length
        d["real_token_fraction"] = (packed - self.pad_tokens) / packed if packed else 0.0
        return d


def pack_windows(
    docs: Iterable[list[int] | tuple[str, list[int]]],
    seq_length: int,
    report: PackReport | None = None,
    tail: str = "drop",
    pad_id: int = 0,
) -> Iterator[Window]:
    """Cut the concatenated documents into windows of ``seq_length`` tokens, lazily.

    ``docs`` yields token lists (already ending with EOS) or ``(source, tokens)`` pairs. ``report``
    (filled as windows go out) counts documents, tokens, windows and the tail.
    """
    if tail not in ("drop", "pad"):
        raise ValueError(f"tail must be 'drop' or 'pad', not {tail!r}")
    report = report if report is not None else PackReport(seq_length, tail)
    buf = np.empty(seq_length, dtype=np.int32)
    pos, starts, sources, continues = 0, [0], [], False
    for item in docs:
        source, ids = item if isinstance(item, tuple) else ("", item)
        arr = np.asarray(ids, dtype=np.int32)
        report.documents += 1
        report.stream_tokens += len(arr)
        offset = 0
        while offset < len(arr):
            if offset == 0:
                if pos:
                    starts.append(pos)
                sources.append(source)
            take = min(seq_length - pos, len(arr) - offset)
            buf[pos : pos + take] = arr[offset : offset + take]
            pos += take
            offset += take
            if pos == seq_length:
                report.windows += 1
                yield Window(buf.copy(), starts, continues, seq_length, sources)
                continues = offset < len(arr)
                pos, starts, sources = 0, [0], [source] if continues else []
    if pos:
        report.tail_tokens = pos
        if tail == "pad":
            buf[pos:] = pad_id
            report.windows += 1
            report.pad_tokens += seq_length - pos
            yield Window(buf.copy(), starts, continues, pos, sources)
        else:
            report.tail = buf[:pos].tolist()


# ------------------------------------------------------------------------------------------- prepare


def cache_key(corpus: TextCorpusConfig, tokenizer, seq_length: int, tokens: int, seed: int) -> str:
    """Hash of sources (and local files' content hashes), tokenizer, window length, budget, seed and code."""
    sources = {}
    for name, src in corpus.sources.items():
        d = src.model_dump(mode="json")
        if src.kind == "local":
            d["files"] = [file_fingerprint(f) for f in expand_files(name, src.files or [])]
        sources[name] = d
    inputs = {
        "corpus": {**corpus.model_dump(mode="json", exclude={"prepared_root", "name", "workers"}), "sources": sources},
        "tokenizer": tokenizer_hash(tokenizer),
        "seq_length": seq_length,
        "tokens": tokens,
        "seed": seed,
        "code": code_version(__name__),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


class ShardWriter:
    """Windows -> Parquet shards of ~WRITE_BATCH_TOKENS tokens each, one row group per flush."""

    def __init__(self, out: Path, split: str, seq_length: int):
        self.out, self.split, self.seq_length = out, split, seq_length
        self.rows: list[Window] = []
        self.files: list[str] = []
        self.count = 0

    def add(self, w: Window) -> None:
        self.rows.append(w)
        self.count += 1
        if len(self.rows) * self.seq_length >= WRITE_BATCH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "input_ids": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.concatenate([w.input_ids for w in self.rows])), self.seq_length
                ),
                "doc_starts": pa.array([w.doc_starts for w in self.rows], type=pa.list_(pa.int32())),
                "continues": pa.array([w.continues for w in self.rows]),
                "valid_length": pa.array([w.valid_length for w in self.rows], type=pa.int32()),
                "sources": pa.array([w.sources for w in self.rows], type=pa.list_(pa.string())),
            }
        )
        name = f"{self.split}-{len(self.files):05d}.parquet"
        # Dictionary-encoding random-looking token ids only costs memory; the source names repeat.
        pq.write_table(table, self.out / name, use_dictionary=["sources"])
        self.files.append(name)
        self.rows = []


def prepare_corpus(
    corpus: TextCorpusConfig,
    tokenizer,
    seq_length: int,
    tokens: int,
    seed: int,
    progress: bool = True,
    wait_s: float = WAIT_S,
    workers: int | None = None,
    address: str | None = None,
) -> Path:
    """Pack ``tokens`` training tokens (+ ``val_windows`` windows) of the corpus; return the cached directory.

    A concurrent prepare of the same inputs is waited for (up to ``wait_s`` seconds) and its result reused.
    ``workers`` (default ``data.workers``; 0: auto) and ``address`` (a Ray cluster; None: this machine) say where
    the texts are tokenised (:mod:`alia_nemo.data.workers`); the windows and the manifest are the same whatever
    they are.
    """
    root = Path(corpus.prepared_root).expanduser()
    total = tokens + corpus.val_windows * seq_length
    key = cache_key(corpus, tokenizer, seq_length, total, seed)
    final = cache_dir(root, corpus.name, f"{seq_length}-{key[:16]}", "data.name", CorpusError)

    def build(tmp: Path) -> None:
        n = corpus.workers if workers is None else workers
        # Work in the unit auto compares with SMALL_WORK: documents of ~1k tokens.
        with Workers(tokenizer, n, total // 1000, address) as pool:
            if pool.backend != "inline" and progress:
                print(f"[alia-nemo] tokenising on {pool.describe()}", file=sys.stderr, flush=True)
            _pack(corpus, tokenizer, seq_length, tokens, seed, progress, key, tmp, pool)

    return build_cached(root, final, key, build, what=f"packing of corpus {corpus.name}", error=CorpusError,
                        wait_s=wait_s)  # fmt: skip


def _pack(
    corpus: TextCorpusConfig,
    tokenizer,
    seq_length: int,
    tokens: int,
    seed: int,
    progress: bool,
    key: str,
    tmp: Path,
    workers: Workers,
) -> None:
    """Pack the corpus into ``tmp`` (texts tokenised on ``workers``): shards, then ``manifest.json`` last."""
    from tqdm import tqdm

    total = tokens + corpus.val_windows * seq_length
    started = time.time()
    stats: dict[str, SourceStats] = {}
    report = PackReport(seq_length, corpus.tail)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    writers = {"val": ShardWriter(tmp, "val", seq_length), "train": ShardWriter(tmp, "train", seq_length)}
    stream = interleave(corpus, tokenizer, total, seed, stats, workers)
    # A with-block closes the bar when an error leaves it, so the CLI's one-line error starts a line.
    with tqdm(total=total, unit=" tok", unit_scale=True, desc=f"pack {corpus.name}", disable=not progress) as bar:
        for w in pack_windows(stream, seq_length, report, corpus.tail, pad_id):
            split = "val" if writers["val"].count < corpus.val_windows else "train"
            writers[split].add(w)
            bar.update(w.valid_length)
    for w in writers.values():
        w.flush()
    need = -(-tokens // seq_length)
    got = writers["train"].count
    read = {n: f"{s.records:,} records, {s.tokens:,} tokens, dropped {dict(s.dropped) or 0}" for n, s in stats.items()}
    if got == 0 and need > 0:
        # Whatever the shortfall policy, a stage can not train on nothing: say which source gave what.
        raise CorpusError(
            f"corpus {corpus.name!r} packed no training window of {seq_length} tokens (sources: {read}); check "
            "the sources' files and text_field (one JSON object with the text per line, or Parquet / Arrow with "
            "that column), lower data.val_windows or stage.seq_length, or add data"
        )
    if got < need and corpus.on_shortfall == "error":
        raise CorpusError(
            f"corpus {corpus.name!r} packed {got:,} training windows of {seq_length} tokens; the stage needs "
            f"{need:,}. Sources: {read}. Add data, lower stage.token_budget, or set data.on_shortfall=repeat "
            "(read sources again) or take_all (train on fewer windows); either is recorded in the manifest."
        )
    manifest = {
        "name": corpus.name,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 1),
        "code_version": code_version(__name__),
        "tokenizer": {"name_or_path": getattr(tokenizer, "name_or_path", None), "sha256": tokenizer_hash(tokenizer)},
        "seq_length": seq_length,
        "seed": seed,
        "tokens_requested": total,
        "train_windows": got,
        "train_windows_needed": need,
        "val_windows": writers["val"].count,
        "shortfall_windows": max(0, need - got),
        "on_shortfall": corpus.on_shortfall,
        "packing": report.summary(),
        "sources": {
            n: {
                "language": corpus.sources[n].language,
                "weight": corpus.sources[n].weight,
                "records": s.records,
                "documents": s.documents,
                "tokens": s.tokens,
                "passes": s.passes,
                "unused_read_ahead": s.unused_read_ahead,
                "dropped": dict(s.dropped),
            }
            for n, s in stats.items()
        },
        "files": {"train": writers["train"].files, "val": writers["val"].files},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))  # written last


def iter_windows(directory: Path, split: str = "train") -> Iterator[dict[str, Any]]:
    """Rows of a packed corpus (``input_ids``, ``doc_starts``, ``continues``, ``valid_length``, ``sources``)."""
    import pyarrow.parquet as pq

    directory = Path(directory)
    manifest = read_manifest(directory, CorpusError)
    for name in manifest["files"][split]:
        for batch in pq.ParquetFile(directory / name).iter_batches(batch_size=64):
            yield from batch.to_pylist()


def load_packed(directory: Path) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Training and validation rows for a causal LM (every real token trained, padding ignored)."""
    directory = Path(directory)
    manifest = read_manifest(directory, CorpusError)
    out: dict[str, list[dict]] = {"train": [], "val": []}
    for split in out:
        for row in iter_windows(directory, split):
            ids, n = row["input_ids"], row["valid_length"]
            out[split].append({"input_ids": ids, "labels": ids[:n] + [-100] * (len(ids) - n)})
    return out["train"], out["val"], manifest
