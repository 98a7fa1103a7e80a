"""Prepare a weighted SFT mixture: exact counts per dataset and language, every row accounted for.

``prepare_mixture`` reads each dataset (hub, hub cache or local files), converts it with its source
adapter, drops malformed, duplicate and over-long conversations (each counted with its reason),
optionally drops conversations an LLM judge scores below a threshold (``data.quality_filter``, off by default:
:mod:`alia_nemo.data.quality`), selects exactly the configured count per language with a seeded shuffle from
the rows that passed every filter, holds out a validation share,
tokenises once with assistant-only masks, and writes Parquet shards plus ``manifest.json`` into a
directory keyed by a hash of everything that shapes the result (local files by their content's sha256).
The directory appears atomically: an interrupted build never looks complete, and an identical rebuild is
a no-op. One build per key at a time, across hosts sharing the filesystem: a build holds a heartbeated
lock (:class:`alia_nemo.locks.DirLock`); a second ``prepare`` of the same key waits for it and reuses its
result (:func:`alia_nemo.data.cache.build_cached`, shared with the CPT packing cache).

Local files are read by :mod:`alia_nemo.data.reader` (``data=jsonl`` and the CPT corpus use it too), with
one policy for bad input:

- a line that is not valid UTF-8, not valid JSON, or not a JSON object is a row dropped and counted
  under its reason ("invalid UTF-8", "invalid JSON", "not a JSON object"); the rest of the file is kept;
- a UTF-8 byte order mark is stripped (the row after it is kept);
- a file that is not UTF-8 text at all (compressed, UTF-16/32, Parquet or Arrow named .jsonl), and a
  Parquet file that can not be read, are file-level errors naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import sys
import time
import unicodedata
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alia_nemo.config.schema import MixtureConfig, MixtureDatasetConfig, PreferenceConfig, PreferenceDatasetConfig
from alia_nemo.data.cache import (
    WAIT_S,
    build_cached,
    cache_dir,
    code_version,
    file_fingerprint,
    read_manifest,
    sha256_file,
    tokenizer_hash,
)
from alia_nemo.data.digests import SeenDigests
from alia_nemo.data.reader import DataError, InvalidRow, read_local_rows
from alia_nemo.data.spill import ConversationSpill, RowStore
from alia_nemo.data.workers import Workers
from alia_nemo.model.chatml import CHAT_TEMPLATE, ConversationError, tokenize_conversations, validate_conversation

if TYPE_CHECKING:
    from alia_nemo.data.quality import QualityFilter

SHARD_ROWS = 20_000
WRITE_ROWS = 1_000  # rows per Parquet row group: what a shard writer holds in memory
TOKENIZE_BATCH = 256  # conversations per worker task
INTERNAL_FORMAT = (
    "messages JSONL (one {'id', 'language', 'messages': [{'role', 'content'}, ...]} object per line) "
    "or Parquet with the same columns"
)


class MixtureError(DataError):
    """A mixture that can not be built as configured; the message lists every problem and its fix."""


# ---------------------------------------------------------------------------------------------- plan


def active_datasets(
    mix: MixtureConfig | PreferenceConfig,
) -> dict[str, MixtureDatasetConfig] | dict[str, PreferenceDatasetConfig]:
    """Datasets left after the licence filter (of an SFT mixture or a preference set: the same rule)."""
    return {n: d for n, d in mix.datasets.items() if d.licence not in mix.exclude_licenses}


def missing_files(mix: MixtureConfig | PreferenceConfig) -> dict[str, list[str]]:
    """Local files named by active datasets that do not exist (internal sets, local copies)."""
    missing = {}
    for name, entry in active_datasets(mix).items():
        absent = [f for f in entry.origin.files or [] if not Path(f).is_file()]
        if absent:
            missing[name] = absent
    return missing


def plan(mix: MixtureConfig) -> dict[str, Any]:
    """What a prepare would do, without reading any data (``--dry-run``)."""
    missing = missing_files(mix)
    datasets = {}
    for name, entry in mix.datasets.items():
        origin = entry.origin.model_dump(exclude_none=True)
        datasets[name] = {
            "licence": entry.licence,
            "adapter": entry.adapter,
            "origin": origin,
            "counts": dict(entry.counts),
            "total": sum(entry.counts.values()),
            "excluded_by_licence": entry.licence in mix.exclude_licenses,
            "missing_files": missing.get(name, []),
        }
    kept = [d for d in datasets.values() if not d["excluded_by_licence"]]
    languages: Counter = Counter()
    for d in kept:
        languages.update(d["counts"])
    return {
        "name": mix.name,
        "datasets": datasets,
        "languages": dict(sorted(languages.items())),
        "total": sum(d["total"] for d in kept),
        "excluded_licenses": list(mix.exclude_licenses),
        "on_shortfall": mix.on_shortfall,
        "val_fraction": mix.val_fraction,
        "prepared_root": mix.prepared_root,
        "internal_dir": mix.internal_dir,  # where the MISSING internal sets were looked for (the legend names it)
        "allow_missing_internal": mix.allow_missing_internal,
    }


def read_rows(name: str, entry: MixtureDatasetConfig, revisions: list | None = None) -> Iterator[dict | InvalidRow]:
    """Raw rows of a dataset in its source's schema: local files, or the hub (the cache when offline).

    What was actually read is appended to ``revisions`` (file hashes; hub revision and data fingerprint).
    A local file that changes while it is read is an error: the cache key would not describe the data.
    """
    origin = entry.origin
    revisions = revisions if revisions is not None else []
    if origin.files:
        revisions += [{"file": str(Path(f).resolve()), "sha256": sha256_file(f)} for f in origin.files]
        yield from read_local_rows(origin.files, MixtureError)
        for rev, f in zip(revisions[-len(origin.files) :], origin.files):
            if sha256_file(f) != rev["sha256"]:  # a stat when unchanged (sha256_file remembers)
                raise MixtureError(
                    f"dataset {name!r}: {f} changed while it was being read; rerun prepare once the file is final"
                )
        return
    import datasets

    for config in origin.configs or [origin.name]:
        try:
            ds = datasets.load_dataset(origin.path, config, split=origin.split, revision=origin.revision)
        except Exception as exc:  # the hub client raises many types; all mean "not available here"
            raise MixtureError(
                f"dataset {name!r}: could not load {origin.path} (config {config}, split {origin.split}): "
                f"{' '.join(str(exc).split())}. "
                "Download it where there is network (it lands in the Hugging Face cache), or point "
                f"data.datasets.{name}.origin.files at local copies in the source's schema."
            ) from None
        revisions.append(
            {"hub": origin.path, "config": config, "split": origin.split, "revision": origin.revision,
             "fingerprint": getattr(ds, "_fingerprint", None)}
        )  # fmt: skip
        yield from ds


# --------------------------------------------------------------------------------------- selection


def content_hash(messages: list[dict[str, str]]) -> str:
    """Hash of a conversation's normalised text (NFKC, case-folded, whitespace collapsed) for dedup."""
    norm = "\x1e".join(
        m["role"] + "\x1f" + re.sub(r"\s+", " ", unicodedata.normalize("NFKC", m["content"])).strip().casefold()
        for m in messages
    )
    return hashlib.sha256(norm.encode()).hexdigest()


def _quantiles(values: list[int]) -> dict[str, int | float]:
    if not values:
        return {"count": 0}
    s = sorted(values)
    return {
        "count": len(s),
        "total": sum(s),
        "mean": round(sum(s) / len(s), 1),
        "p50": s[len(s) // 2],
        "p95": s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)],
        "max": s[-1],
    }


def content_digest(messages: list[dict[str, str]]) -> bytes:
    """:func:`content_hash` as 32 raw bytes (what the duplicate filter keeps in memory: half the size)."""
    return bytes.fromhex(content_hash(messages))


def check_and_digest(tokenizer, convs: list[dict]) -> list[tuple[str | None, bytes | None]]:
    """Per conversation: the shape problem's reason (None when fine) or its content digest (a worker task)."""
    out: list[tuple[str | None, bytes | None]] = []
    for conv in convs:
        try:
            validate_conversation(conv["messages"], conv["id"])
        except ConversationError as exc:
            out.append((exc.reason, None))
            continue
        out.append((None, content_digest(conv["messages"])))
    return out


def tokenize_batch(tokenizer, convs: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids (int32) and assistant-only loss masks (int8) of conversations (a worker task)."""
    toks = tokenize_conversations(tokenizer, [c["messages"] for c in convs], [c["id"] for c in convs])
    return [(np.asarray(t.input_ids, dtype=np.int32), np.asarray(t.loss_mask, dtype=np.int8)) for t in toks]


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class _Output:
    """Where a build puts its selected rows (on disk) and what it remembers of them (lengths, for the report)."""

    train: RowStore
    val: RowStore
    scratch: Path
    workers: Workers


def _select_dataset(
    name: str,
    entry: MixtureDatasetConfig,
    rows: Iterable[dict],
    max_tokens: int,
    seed: int,
    val_fraction: float,
    on_shortfall: str,
    seen: SeenDigests,
    out: _Output,
    progress: bool = True,
    quality: QualityFilter | None = None,
) -> dict[str, Any]:
    """Convert, filter and select one dataset into ``out``; ``seen`` knows the content digests kept so far and
    which dataset kept each. Returns the dataset's report.

    Streams: converted conversations go to a spill file and only their indices stay in memory; selected rows
    are appended to ``out``'s stores. Shape checks, hashing and tokenising run on ``out.workers`` in batches,
    their results consumed in order, so what is selected never depends on the number of workers.
    With ``quality``, a candidate that passed the other filters is kept only if the judge lets it through; the
    judge is asked only about candidates the selection reaches (batches of at least ``quality.batch``).
    """
    from alia_nemo.data.adapters import ADAPTERS, PROMPT_ADAPTERS

    if entry.adapter not in ADAPTERS:
        raise MixtureError(f"dataset {name!r}: unknown adapter {entry.adapter!r}; choose one of {sorted(ADAPTERS)}")
    if entry.adapter in PROMPT_ADAPTERS:
        raise MixtureError(
            f"dataset {name!r}: adapter {entry.adapter!r} extracts prompts, not conversations, so it can not be "
            "trained; generate the responses and use adapter=messages on the resulting files"
        )
    adapter_drops: Counter = Counter()
    counted_rows = Counter()

    def count_rows(it: Iterable[dict | InvalidRow]) -> Iterator[dict]:
        for row in it:
            counted_rows["rows"] += 1
            if isinstance(row, InvalidRow):
                adapter_drops[("unknown", row.reason)] += 1
                continue
            yield row

    drops: dict[str, Counter] = defaultdict(Counter)
    converted = Counter()
    try:
        conversations = ADAPTERS[entry.adapter](
            count_rows(rows), source=name, languages=list(entry.counts), drops=adapter_drops, options=entry.options
        )
    except ValueError as exc:  # an adapter's option check (dolly without options.language)
        raise MixtureError(f"dataset {name!r}: {exc}") from None

    def requested(convs: Iterable[dict]) -> Iterator[dict]:
        for conv in convs:
            lang = conv["language"]
            if lang not in entry.counts:  # adapters filter already; counted all the same, so the rows balance
                adapter_drops[(lang, "language_not_requested")] += 1
                continue
            converted[lang] += 1
            yield conv

    spill = ConversationSpill(out.scratch / f"{name}.candidates.jsonl")
    try:
        by_lang: dict[str, list[int]] = defaultdict(list)  # spill indices, in reading order
        tiers: list[int] = []  # an adapter's rank of each spilled conversation (flores), 0 for most
        checked = out.workers.imap(check_and_digest, _batches(requested(conversations), TOKENIZE_BATCH))
        seen.start(name)
        for batch, results in checked:
            earlier = iter(seen.kept_before([digest for _, digest in results if digest is not None]))
            for conv, (reason, digest) in zip(batch, results):
                lang = conv["language"]
                if reason is not None:
                    drops[lang][reason] += 1
                    continue
                first = next(earlier) or seen.add(digest)
                if first is not None:
                    # The shared filter keeps a conversation once, in the first dataset that has it: say which one.
                    why = "duplicate (same normalised content)" if first == name else f"duplicate of dataset {first!r}"
                    drops[lang][why] += 1
                    continue
                by_lang[lang].append(spill.append(conv))
                tiers.append(conv.get("tier", 0))
        langs = {}
        lengths: list[int] = []
        for lang, wanted in entry.counts.items():
            langs[lang] = _select_language(
                name, lang, wanted, by_lang.get(lang, []), tiers, spill, max_tokens, seed, val_fraction,
                on_shortfall, out, drops[lang], converted[lang], lengths, progress, quality,
            )  # fmt: skip
    finally:
        spill.close()
    for lang in set(drops) - set(langs):
        langs[lang] = {"dropped": dict(drops[lang])}
    return {
        "input_rows": counted_rows["rows"],
        "converted": sum(converted.values()),
        "adapter_drops": {f"{lang}: {reason}": n for (lang, reason), n in sorted(adapter_drops.items())},
        "languages": langs,
        "tokens": _quantiles(lengths),
    }


def _select_language(
    name: str,
    lang: str,
    wanted: int,
    pool: list[int],
    tiers: list[int],
    spill: ConversationSpill,
    max_tokens: int,
    seed: int,
    val_fraction: float,
    on_shortfall: str,
    out: _Output,
    drops: Counter,
    converted: int,
    lengths: list[int],
    progress: bool,
    quality: QualityFilter | None,
) -> dict[str, Any]:
    """Pick ``wanted`` training rows (+ the validation share) of one language from its candidates, in a seeded
    order; append them to ``out`` and their lengths to ``lengths``. Returns the language's report."""
    from tqdm import tqdm

    random.Random(f"{seed}:{name}:{lang}").shuffle(pool)
    # An adapter may rank its records (flores: every sentence once before a second source for any): lower
    # tiers are taken first, each in its shuffled order (the sort is stable).
    pool.sort(key=tiers.__getitem__)
    want_val = math.ceil(wanted * val_fraction) if val_fraction > 0 else 0
    picked: list[int] = []  # indices in out.train
    held = 0
    used = 0
    judged, kept_unscored = 0, Counter()
    bar = tqdm(total=wanted + want_val, desc=f"{name}/{lang} tokenise", unit=" conv", leave=False,
               disable=not progress)  # fmt: skip
    # Tokenise in batches of the shuffled pool, and (give or take the workers' read-ahead) only as far as the
    # counts need.
    starts = range(0, len(pool), TOKENIZE_BATCH)
    chunks = ([spill.get(i) for i in pool[start : start + TOKENIZE_BATCH]] for start in starts)
    for chunk, toks in out.workers.imap(tokenize_batch, chunks):
        if len(picked) >= wanted and held >= want_val:
            break
        fits = [len(ids) <= max_tokens for ids, _ in toks]
        verdicts: dict = {}  # chunk position -> the judge's verdict, fetched a batch ahead
        for j, (conv, (ids, mask)) in enumerate(zip(chunk, toks)):
            if len(picked) >= wanted and held >= want_val:
                break
            used += 1
            if not fits[j]:
                drops[f"longer than {max_tokens} tokens"] += 1
                continue
            if quality is not None:
                if j not in verdicts:
                    # Score the next candidates that fit, as many as are still needed (at least one batch
                    # for the workers): the judge is asked about what the selection can use, no more.
                    need = max(wanted - len(picked), 0) + max(want_val - held, 0)
                    ahead = [i for i in range(j, len(chunk)) if fits[i]][: max(need, quality.batch)]
                    found = quality.score([chunk[i]["messages"] for i in ahead], where=f"{name}/{lang}")
                    verdicts.update(zip(ahead, found))
                judged += 1
                reason = quality.decide(verdicts[j])
                if reason is not None:
                    drops[reason] += 1
                    continue
                if verdicts[j].score is None:
                    kept_unscored[f"quality: {verdicts[j].unscored}"] += 1
            if len(picked) < wanted:
                picked.append(out.train.append(_meta(conv), ids, mask))
                lengths.append(len(ids))
            else:
                out.val.append(_meta(conv), ids, mask)
                held += 1
            bar.update()
    bar.close()
    shortfall = wanted - len(picked)
    repeated = 0
    if shortfall and on_shortfall == "repeat" and picked:
        for i in range(shortfall):
            meta, ids, mask = out.train.get(picked[i % len(picked)])
            out.train.append({**meta, "id": f"{meta['id']}#r{i // len(picked) + 1}"}, ids, mask)
            lengths.append(len(ids))
        repeated, shortfall = shortfall, 0
    report = {
        "requested": wanted,
        "selected": len(picked),
        "repeated": repeated,
        "shortfall": shortfall,
        "val": held,
        "val_requested": want_val,
        "val_shortfall": want_val - held,
        "converted": converted,
        "dropped": dict(drops),
        "unselected": len(pool) - used,
    }
    if quality is not None:  # only with the filter on: an unfiltered build's manifest is unchanged
        report["quality"] = {"judged": judged, "kept_unscored": dict(kept_unscored)}
    return report


def _meta(conv: dict[str, Any]) -> dict[str, Any]:
    """What a prepared row keeps besides its tokens (the shards' text columns)."""
    return {"id": conv["id"], "source": conv["source"], "language": conv["language"],
            "messages": json.dumps(conv["messages"], ensure_ascii=False)}  # fmt: skip


def cache_key(mix: MixtureConfig, tokenizer, max_tokens: int, seed: int) -> str:
    """Hash of sources (and local files' content hashes), tokenizer, template, filters and code version."""
    datasets = {}
    for name, entry in active_datasets(mix).items():
        d = entry.model_dump(mode="json")
        d["files"] = [file_fingerprint(f) for f in entry.origin.files or [] if Path(f).is_file()]
        datasets[name] = d
    inputs = {
        "datasets": datasets,
        "tokenizer": tokenizer_hash(tokenizer),
        "template": hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest(),
        "max_tokens": max_tokens,
        "seed": seed,
        "val_fraction": mix.val_fraction,
        "on_shortfall": mix.on_shortfall,
        "allow_missing_internal": mix.allow_missing_internal,
        "exclude_licenses": sorted(mix.exclude_licenses),
        "code": code_version(__name__),
    }
    if mix.quality_filter is not None:  # absent when off, so a filtered and an unfiltered build never share a key
        from alia_nemo.data.quality import key_settings

        inputs["quality_filter"] = key_settings(mix.quality_filter)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _write_shards(store: RowStore, order: Sequence[int], out: Path, split: str) -> list[str]:
    """Rows of ``store`` in ``order`` as Parquet shards of :data:`SHARD_ROWS` rows, written in row groups of
    :data:`WRITE_ROWS` (memory: one row group, whatever the mixture's size)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("language", pa.string()),
                        ("messages", pa.string()), ("input_ids", pa.list_(pa.int32())),
                        ("loss_mask", pa.list_(pa.int8()))])  # fmt: skip
    names = []
    n_shards = max(1, math.ceil(len(order) / SHARD_ROWS))
    for i in range(n_shards):
        name = f"{split}-{i:05d}-of-{n_shards:05d}.parquet"
        with pq.ParquetWriter(out / name, schema) as writer:
            shard = order[i * SHARD_ROWS : (i + 1) * SHARD_ROWS]
            for start in range(0, len(shard), WRITE_ROWS):
                rows = [store.get(k) for k in shard[start : start + WRITE_ROWS]]
                offsets = np.cumsum([0] + [len(ids) for _, ids, _ in rows], dtype=np.int32)
                columns = {key: pa.array([meta[key] for meta, _, _ in rows], pa.string())
                           for key in ("id", "source", "language", "messages")}  # fmt: skip
                columns["input_ids"] = pa.ListArray.from_arrays(
                    pa.array(offsets), pa.array(np.concatenate([ids for _, ids, _ in rows]), pa.int32())
                )
                columns["loss_mask"] = pa.ListArray.from_arrays(
                    pa.array(offsets), pa.array(np.concatenate([mask for _, _, mask in rows]), pa.int8())
                )
                writer.write_table(pa.table(columns, schema=schema))
                del columns, rows
                pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages otherwise
        names.append(name)
    return names


# ------------------------------------------------------------------------------------------- prepare


def prepare_mixture(
    mix: MixtureConfig,
    tokenizer,
    max_tokens: int,
    seed: int,
    progress: bool = True,
    wait_s: float = WAIT_S,
    workers: int | None = None,
    address: str | None = None,
) -> Path:
    """Build (or find in the cache) the prepared mixture and return its directory.

    A concurrent ``prepare`` of the same inputs (another process, another host sharing the filesystem) is
    waited for, up to ``wait_s`` seconds, and its result reused (:func:`build_cached`). ``workers`` (default
    ``data.workers``; 0: auto) and ``address`` (a Ray cluster; None: this machine) say where checks, hashing and
    tokenising run (:mod:`alia_nemo.data.workers`); the result is the same whatever they are.
    """
    missing = missing_files(mix)
    if missing and not mix.allow_missing_internal:
        listed = "; ".join(f"{name}: {', '.join(files)}" for name, files in sorted(missing.items()))
        raise MixtureError(
            f"{len(missing)} dataset(s) of mixture {mix.name!r} have missing files ({listed}). Expected format: "
            f"{INTERNAL_FORMAT}. Set data.internal_dir (or each origin.files) to where they are, exclude them by "
            "licence, or set data.allow_missing_internal=true to build without them (the shortfall is recorded "
            "in the manifest)."
        )
    root = Path(mix.prepared_root).expanduser()
    # The content hashes the key is made of (sha256_file remembers them, so cache_key does not hash again):
    # the build checks that the files it read are still these.
    keyed = {
        str(Path(f).resolve()): sha256_file(f)
        for name, entry in active_datasets(mix).items()
        if name not in missing
        for f in entry.origin.files or []
    }
    key = cache_key(mix, tokenizer, max_tokens, seed)
    final = cache_dir(root, mix.name, key[:16], "data.name", MixtureError)

    def build(tmp: Path) -> None:
        requested = sum(sum(d.counts.values()) for d in active_datasets(mix).values())
        n = mix.workers if workers is None else workers
        with Workers(tokenizer, n, requested, address) as pool:
            if pool.backend != "inline" and progress:
                print(f"[alia-nemo] checking and tokenising on {pool.describe()}", file=sys.stderr, flush=True)
            _build_mixture(mix, tokenizer, max_tokens, seed, progress, missing, key, keyed, tmp, pool)

    return build_cached(
        root, final, key, build, what=f"prepare of mixture {mix.name}", error=MixtureError, wait_s=wait_s
    )


def _build_mixture(
    mix: MixtureConfig,
    tokenizer,
    max_tokens: int,
    seed: int,
    progress: bool,
    missing: dict[str, list[str]],
    key: str,
    keyed: dict[str, str],
    tmp: Path,
    workers: Workers,
) -> None:
    """Read, select and tokenise every dataset and write the shards and (last) ``manifest.json`` into ``tmp``.

    Memory stays flat: selected rows wait on disk in ``tmp/.scratch`` (removed before the manifest is written);
    what stays in memory is one digest per candidate conversation (the duplicate filter) and row offsets.
    """
    from tqdm import tqdm

    started = time.time()
    seen = SeenDigests()
    report: dict[str, dict] = {}
    scratch = tmp / ".scratch"
    scratch.mkdir()
    out = _Output(RowStore(scratch / "train"), RowStore(scratch / "val"), scratch, workers)
    active = active_datasets(mix)
    quality = None
    if mix.quality_filter is not None:
        from alia_nemo.data.quality import QualityFilter

        quality = QualityFilter(mix.quality_filter, Path(mix.prepared_root).expanduser(), error=MixtureError)
    # Bars are closed when an error leaves them (with-blocks), so the CLI's one-line error starts a line.
    with tqdm(total=len(mix.datasets), desc="datasets", disable=not progress) as datasets_bar:
        for name, entry in mix.datasets.items():
            datasets_bar.update()
            _add_dataset(mix, name, entry, active, missing, keyed, max_tokens, seed, progress, seen, out, report,
                         quality)  # fmt: skip
    if quality is not None:
        q = quality.report()
        print(f"[alia-nemo] quality filter: {q['judged']} conversation(s) judged ({q['cache_hits']} score(s) from "
              f"{q['score_cache']}, {q['requests']} judge request(s)); {q['kept']} kept, dropped {q['dropped'] or 0}"
              + (f", kept unscored {q['kept_unscored']}" if q["kept_unscored"] else ""),
              file=sys.stderr, flush=True)  # fmt: skip
    _check_selection(mix, report, len(out.train))

    # Sources interleaved; the shuffle is part of the cache key (seed). Shuffling row indices gives the same
    # permutation as shuffling the rows (it depends on the length only).
    order = array("q", range(len(out.train)))  # 8 bytes a row, not a Python int's 36
    random.Random(seed).shuffle(order)
    files = {
        "train": _write_shards(out.train, order, tmp, "train"),
        "val": _write_shards(out.val, range(len(out.val)), tmp, "val") if len(out.val) else [],
    }
    out.train.close()
    out.val.close()
    scratch.rmdir()
    manifest = _manifest(mix, report, files, key, tokenizer, max_tokens, seed, time.time() - started)
    if quality is not None:
        manifest["quality_filter"] = quality.report()
    _composition_plot(manifest, tmp / "composition.png")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))  # written last


def _add_dataset(
    mix: MixtureConfig,
    name: str,
    entry: MixtureDatasetConfig,
    active: dict[str, MixtureDatasetConfig],
    missing: dict[str, list[str]],
    keyed: dict[str, str],
    max_tokens: int,
    seed: int,
    progress: bool,
    seen: SeenDigests,
    out: _Output,
    report: dict[str, dict],
    quality: QualityFilter | None = None,
) -> None:
    """Select one dataset into ``out`` and record its report."""
    from tqdm import tqdm

    if name not in active:
        report[name] = {"excluded_by_licence": entry.licence, "requested": dict(entry.counts)}
        return
    if name in missing:
        report[name] = {
            "missing_files": missing[name],
            "languages": {
                lang: {"requested": n, "selected": 0, "repeated": 0, "shortfall": n, "val": 0}
                for lang, n in entry.counts.items()
            },
        }
        return
    revisions: list[dict] = []
    with tqdm(read_rows(name, entry, revisions), desc=name, unit=" rows", leave=False, disable=not progress) as rows:
        stats = _select_dataset(
            name, entry, rows, max_tokens, seed, mix.val_fraction, mix.on_shortfall, seen, out, progress, quality
        )
    import pyarrow as pa

    pa.default_memory_pool().release_unused()  # the dataset's Arrow reads: return the pages, memory stays flat
    for rev in revisions:
        if "sha256" in rev and keyed.get(rev["file"], rev["sha256"]) != rev["sha256"]:
            raise MixtureError(
                f"dataset {name!r}: {rev['file']} changed while prepare read it; rerun prepare once it is final"
            )
    report[name] = {
        "licence": entry.licence,
        "origin": entry.origin.model_dump(exclude_none=True),
        "revisions": revisions,
        **stats,
    }


def _check_selection(mix: MixtureConfig, report: dict[str, dict], train_rows: int) -> None:
    """Stop on a shortfall (on_shortfall=error) or an empty training set; warn of empty datasets and of
    validation shortfalls (both recorded in the manifest)."""
    shortfalls = [
        f"{name}/{lang}: {s['selected']} of {s['requested']}"
        for name, r in report.items()
        if "missing_files" not in r
        for lang, s in r.get("languages", {}).items()
        if s.get("shortfall")
    ]
    if shortfalls and mix.on_shortfall == "error":
        short = {n: r for n, r in report.items() if any(s.get("shortfall") for s in r.get("languages", {}).values())}
        raise MixtureError(
            f"not enough usable conversations ({'; '.join(shortfalls)}); {_drop_summary(short)}. Fix or add data, "
            "or set data.on_shortfall=repeat (reuse rows) or data.on_shortfall=take_all (train on fewer); either "
            "is recorded in the manifest"
        )
    if not train_rows:
        # take_all (or repeat) over nothing: training would die later in its sampler, far from the cause.
        raise MixtureError(f"mixture {mix.name!r} has no training conversation: " + _empty_datasets(report))
    empty = [name for name, r in report.items() if "input_rows" in r and not r["tokens"].get("count")]
    if empty:
        print(f"[alia-nemo] warning: dataset(s) {', '.join(empty)} contributed no training conversation: "
              + _empty_datasets({n: report[n] for n in empty}), file=sys.stderr, flush=True)  # fmt: skip
    val_short = [
        f"{name}/{lang}: {s['val']} of {s['val_requested']}"
        for name, r in report.items()
        for lang, s in r.get("languages", {}).items()
        if s.get("val_shortfall")
    ]
    if val_short:
        print(f"[alia-nemo] warning: validation shortfall ({'; '.join(val_short)}): fewer held-out conversations "
              "than data.val_fraction asks, recorded in the manifest", file=sys.stderr, flush=True)  # fmt: skip


def _empty_datasets(report: dict[str, dict]) -> str:
    """Why each dataset gave nothing (rows read, the main drop reasons) and what to do, on one line."""
    return (
        _drop_summary(report) + f". Check the files (expected {INTERNAL_FORMAT}, or the source's own schema for "
        "its adapter) and the counts' languages, or remove the dataset from the mixture"
    )


def _drop_summary(report: dict[str, dict]) -> str:
    """Per dataset: rows read and the three most frequent drop reasons (or why it was not read)."""
    parts = []
    for name, r in report.items():
        if "excluded_by_licence" in r:
            parts.append(f"{name!r} is excluded by its licence {r['excluded_by_licence']}")
            continue
        if "missing_files" in r:
            parts.append(f"{name!r} has missing files {r['missing_files']}")
            continue
        reasons: Counter = Counter(r.get("adapter_drops", {}))
        for s in r.get("languages", {}).values():
            reasons.update(s.get("dropped", {}))
        top = ", ".join(f"{reason} x{n}" for reason, n in reasons.most_common(3)) or "none"
        parts.append(f"{name!r} read {r.get('input_rows', 0)} rows (most dropped: {top})")
    return "; ".join(parts)


def _manifest(mix, report, files, key, tokenizer, max_tokens, seed, seconds) -> dict[str, Any]:
    totals: Counter = Counter()
    for r in report.values():
        for s in r.get("languages", {}).values():
            for k in ("requested", "selected", "repeated", "shortfall", "val", "val_requested", "val_shortfall",
                      "converted", "unselected"):  # fmt: skip
                totals[k] += s.get(k, 0)
            totals["dropped"] += sum(s.get("dropped", {}).values())
        totals["input_rows"] += r.get("input_rows", 0)
        totals["adapter_drops"] += sum(r.get("adapter_drops", {}).values())
    return {
        "name": mix.name,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 1),
        "code_version": code_version(__name__),
        "tokenizer": {
            "name_or_path": getattr(tokenizer, "name_or_path", None),
            "sha256": tokenizer_hash(tokenizer),
            "vocab_size": len(tokenizer),
        },
        "template_sha256": hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest(),
        "seed": seed,
        "max_tokens": max_tokens,
        "val_fraction": mix.val_fraction,
        "on_shortfall": mix.on_shortfall,
        "exclude_licenses": list(mix.exclude_licenses),
        "files": files,
        "totals": dict(totals),
        "datasets": report,
    }


def _composition_plot(manifest: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in manifest["datasets"].items() if "languages" in r]
    langs = sorted({lang for n in names for lang in manifest["datasets"][n]["languages"]})
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) + 1.5))
    left = [0] * len(names)
    for lang in langs:
        values = [
            manifest["datasets"][n]["languages"].get(lang, {}).get("selected", 0)
            + manifest["datasets"][n]["languages"].get(lang, {}).get("repeated", 0)
            for n in names
        ]
        ax.barh(names, values, left=left, label=lang)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("training conversations")
    ax.set_title(
        f"{manifest['name']}: {manifest['totals'].get('selected', 0) + manifest['totals'].get('repeated', 0):,}"
    )
    ax.legend(ncol=max(1, len(langs)), fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def load_prepared(directory: Path) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Training and validation rows (``input_ids``, ``labels``) and the manifest of a prepared mixture."""
    import pyarrow.parquet as pq

    directory = Path(directory)
    manifest = read_manifest(directory, MixtureError)
    out: dict[str, list[dict]] = {"train": [], "val": []}
    for split, names in manifest["files"].items():
        for name in names:
            table = pq.read_table(directory / name, columns=["input_ids", "loss_mask"])
            for ids, mask in zip(table.column("input_ids").to_pylist(), table.column("loss_mask").to_pylist()):
                out[split].append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]})
    return out["train"], out["val"], manifest
