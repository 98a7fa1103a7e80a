"""Prepare a weighted SFT mixture: exact counts per dataset and language, every row accounted for.

``prepare_mixture`` reads each dataset (hub, hub cache or local files), converts it with its source
adapter, drops malformed, duplicate and over-long conversations (each counted with its reason),
selects exactly the configured count per language with a seeded shuffle, holds out a validation share,
tokenises once with assistant-only masks, and writes Parquet shards plus ``manifest.json`` into a
directory keyed by a hash of everything that shapes the result (local files by their content's sha256).
The directory appears atomically: an interrupted build never looks complete, and an identical rebuild is
a no-op. One build per key at a time, across hosts sharing the filesystem: a build holds a heartbeated
lock (:class:`alia_nemo.locks.DirLock`); a second ``prepare`` of the same key waits for it and reuses its
result (:func:`build_cached`, shared with the CPT packing cache).

Local files are read by one reader for every data path (:func:`iter_jsonl`, :func:`read_local_rows`;
``data=jsonl`` and the CPT corpus use it too), with one policy for bad input:

- a line that is not valid UTF-8, not valid JSON, or not a JSON object is a row dropped and counted
  under its reason ("invalid UTF-8", "invalid JSON", "not a JSON object"); the rest of the file is kept;
- a UTF-8 byte order mark is stripped (the row after it is kept);
- a file that is not UTF-8 text at all (compressed, UTF-16/32, Parquet or Arrow named .jsonl), and a
  Parquet file that can not be read, are file-level errors naming the file and the fix.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alia_nemo.chatml import CHAT_TEMPLATE, ConversationError, tokenize_conversations, validate_conversation
from alia_nemo.config_schema import MixtureConfig, MixtureDatasetConfig
from alia_nemo.errors import AliaError, LockedError
from alia_nemo.locks import STALE_S, DirLock, holder_alive, read_lock

SHARD_ROWS = 20_000
TOKENIZE_BATCH = 256
HASH_CHUNK = 1 << 20  # sha256 of local files in 1 MiB reads: flat memory, near disk speed
WAIT_S = 6 * 3600.0  # longest wait for another live process building the same cache entry
POLL_S = 1.0  # how often a waiting prepare looks at the other build's lock
CODE_FILES = ("sft_mixture.py", "sft_sources.py", "chatml.py")
INTERNAL_FORMAT = (
    "messages JSONL (one {'id', 'language', 'messages': [{'role', 'content'}, ...]} object per line) "
    "or Parquet with the same columns"
)


class MixtureError(AliaError, ValueError):
    """A mixture that can not be built as configured; the message lists every problem and its fix."""


# ---------------------------------------------------------------------------------------------- plan


def active_datasets(mix: MixtureConfig) -> dict[str, MixtureDatasetConfig]:
    """Datasets left after the licence filter."""
    return {n: d for n, d in mix.datasets.items() if d.licence not in mix.exclude_licenses}


def missing_files(mix: MixtureConfig) -> dict[str, list[str]]:
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
    }


# ------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class InvalidRow:
    """A line of a local file that is not a row: why (a short, stable reason, counted) and where (file:line)."""

    reason: str
    where: str


# Signatures of files that are not UTF-8 text: reading them line by line would only count garbage.
_NOT_TEXT = (
    (b"\x1f\x8b", "gzip-compressed", "decompress it (gunzip)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it (zstd -d)"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it (xz -d)"),
    (b"PK\x03\x04", "zip archive", "extract it"),
    (b"PAR1", "Parquet", "give it the .parquet extension"),
    (b"ARROW1", "Arrow", "give it the .arrow extension (CPT corpora) or convert it to .parquet"),
    (codecs.BOM_UTF32_LE, "UTF-32", "convert it to UTF-8 (iconv -f UTF-32 -t UTF-8)"),
    (codecs.BOM_UTF32_BE, "UTF-32", "convert it to UTF-8 (iconv -f UTF-32 -t UTF-8)"),
    (codecs.BOM_UTF16_LE, "UTF-16", "convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)"),
    (codecs.BOM_UTF16_BE, "UTF-16", "convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)"),
)
_BZIP2 = re.compile(rb"BZh[1-9]1AY&SY")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_text_file(path: str, head: bytes, error: type[AliaError]) -> None:
    """Raise ``error`` when ``head`` (a file's first bytes) shows that it is not UTF-8 JSONL at all."""
    for magic, kind, fix in _NOT_TEXT:
        if head.startswith(magic):
            raise error(f"{path}: not UTF-8 JSON lines: it looks like a {kind} file; {fix}, or list another file")
    if _BZIP2.match(head):
        raise error(f"{path}: not UTF-8 JSON lines: it looks like a bzip2-compressed file; decompress it (bunzip2)")


def _parse_line(raw: bytes, where: str) -> dict | InvalidRow | None:
    """One JSONL line: its object, an :class:`InvalidRow`, or None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return InvalidRow("invalid UTF-8", where)
    if line.startswith("\ufeff"):  # a byte order mark (an editor's, or files joined with cat): not data
        line = line[1:]
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError, an over-long integer, absurd nesting
        return InvalidRow("invalid JSON", where)
    if not isinstance(row, dict):
        return InvalidRow("not a JSON object", where)
    if _SURROGATE_ESCAPE.search(line):
        # A "\ud800"-style escape without its pair decodes to a string that can not be written as UTF-8.
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return InvalidRow("invalid Unicode (unpaired surrogate escape)", where)
    return row


def iter_jsonl(path: str, error: type[AliaError] | None = None) -> Iterator[tuple[int, dict | InvalidRow]]:
    """``(line number, row)`` for each non-blank line of a JSONL file, streamed; see the module's bad-input policy.

    A bad line comes as an :class:`InvalidRow` (the caller counts or refuses it); a file that is not UTF-8
    text raises ``error`` (default :class:`MixtureError`) naming the file and the fix.
    """
    error = error or MixtureError
    name = Path(path).name
    with open(path, "rb") as f:
        _check_text_file(path, f.read(16), error)
        f.seek(0)
        for lineno, raw in enumerate(f, 1):
            row = _parse_line(raw, f"{name}:{lineno}")
            if row is not None:
                yield lineno, row


def _parquet_rows(path: str, error: type[AliaError]) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=2048):
            yield from batch.to_pylist()
    except pa.ArrowException as exc:  # not Parquet, truncated, or a corrupt page
        why = " ".join(str(exc).split())[:300]
        raise error(
            f"{path}: not a readable Parquet file ({type(exc).__name__}: {why}); re-export or re-download it, "
            "or remove it from the configured files"
        ) from None


def read_local_rows(files: list[str], error: type[AliaError] | None = None) -> Iterator[dict | InvalidRow]:
    """Rows of local Parquet / JSONL files, streamed; a bad JSONL line comes as an :class:`InvalidRow`.

    ``error`` is the class raised for a file that can not be read at all (default :class:`MixtureError`).
    """
    error = error or MixtureError
    for file in files:
        if file.endswith(".parquet"):
            yield from _parquet_rows(file, error)
        else:
            for _, row in iter_jsonl(file, error):
                yield row


_HASHES: dict[tuple, str] = {}


def sha256_file(path: str) -> str:
    """The sha256 of a file's content, read in :data:`HASH_CHUNK` pieces.

    Remembered for this process under the file's identity and times (device, inode, size, mtime and
    ctime): a rewrite, even one that keeps size and mtime (``os.utime``), changes the ctime, so it is hashed
    again. Across processes nothing is trusted: every ``prepare`` hashes its inputs once.
    """
    st = os.stat(path)
    sig = (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if sig in _HASHES:
        return _HASHES[sig]
    digest = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    _HASHES[sig] = digest.hexdigest()
    return _HASHES[sig]


def read_rows(name: str, entry: MixtureDatasetConfig, revisions: list | None = None) -> Iterator[dict | InvalidRow]:
    """Raw rows of a dataset in its source's schema: local files, or the hub (the cache when offline).

    What was actually read is appended to ``revisions`` (file hashes; hub revision and data fingerprint).
    A local file that changes while it is read is an error: the cache key would not describe the data.
    """
    origin = entry.origin
    revisions = revisions if revisions is not None else []
    if origin.files:
        revisions += [{"file": str(Path(f).resolve()), "sha256": sha256_file(f)} for f in origin.files]
        yield from read_local_rows(origin.files)
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


def _select_dataset(
    name: str,
    entry: MixtureDatasetConfig,
    rows: Iterable[dict],
    tokenizer,
    max_tokens: int,
    seed: int,
    val_fraction: float,
    on_shortfall: str,
    seen: dict[str, str],
    progress: bool = True,
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Convert, filter and select one dataset; ``seen`` maps content hashes to the dataset that kept them."""
    from alia_nemo.sft_sources import ADAPTERS, PROMPT_ADAPTERS

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

    by_lang: dict[str, list[dict]] = defaultdict(list)
    drops: dict[str, Counter] = defaultdict(Counter)
    converted = Counter()
    try:
        conversations = ADAPTERS[entry.adapter](
            count_rows(rows), source=name, languages=list(entry.counts), drops=adapter_drops, options=entry.options
        )
    except ValueError as exc:  # an adapter's option check (dolly without options.language)
        raise MixtureError(f"dataset {name!r}: {exc}") from None
    for conv in conversations:
        lang = conv["language"]
        if lang not in entry.counts:  # adapters filter already; counted all the same, so the rows balance
            adapter_drops[(lang, "language_not_requested")] += 1
            continue
        converted[lang] += 1
        try:
            validate_conversation(conv["messages"], conv["id"])
        except ConversationError as exc:
            drops[lang][exc.reason] += 1
            continue
        digest = content_hash(conv["messages"])
        if digest in seen:
            first = seen[digest]
            # The shared filter keeps a conversation once, in the first dataset that has it: say which one.
            reason = "duplicate (same normalised content)" if first == name else f"duplicate of dataset {first!r}"
            drops[lang][reason] += 1
            continue
        seen[digest] = name
        by_lang[lang].append(conv)

    from tqdm import tqdm

    train, val, langs = [], [], {}
    for lang, wanted in entry.counts.items():
        pool = by_lang.get(lang, [])
        random.Random(f"{seed}:{name}:{lang}").shuffle(pool)
        # An adapter may rank its records (flores: every sentence once before a second source for any): lower
        # tiers are taken first, each in its shuffled order (the sort is stable).
        pool.sort(key=lambda conv: conv.get("tier", 0))
        want_val = math.ceil(wanted * val_fraction) if val_fraction > 0 else 0
        picked, held = [], []
        used = 0
        bar = tqdm(total=wanted + want_val, desc=f"{name}/{lang} tokenise", unit=" conv", leave=False,
                   disable=not progress)  # fmt: skip
        # Tokenise in batches of the shuffled pool, and only as far as the counts need.
        for start in range(0, len(pool), TOKENIZE_BATCH):
            if len(picked) >= wanted and len(held) >= want_val:
                break
            chunk = pool[start : start + TOKENIZE_BATCH]
            toks = tokenize_conversations(tokenizer, [c["messages"] for c in chunk], [c["id"] for c in chunk])
            for conv, tok in zip(chunk, toks):
                if len(picked) >= wanted and len(held) >= want_val:
                    break
                used += 1
                if len(tok.input_ids) > max_tokens:
                    drops[lang][f"longer than {max_tokens} tokens"] += 1
                    continue
                row = {**conv, "input_ids": tok.input_ids, "loss_mask": tok.loss_mask}
                (picked if len(picked) < wanted else held).append(row)
                bar.update()
        bar.close()
        shortfall = wanted - len(picked)
        repeated = 0
        if shortfall and on_shortfall == "repeat" and picked:
            extra = [dict(picked[i % len(picked)], id=f"{picked[i % len(picked)]['id']}#r{i // len(picked) + 1}")
                     for i in range(shortfall)]  # fmt: skip
            picked += extra
            repeated, shortfall = len(extra), 0
        train += picked
        val += held
        langs[lang] = {
            "requested": wanted,
            "selected": len(picked) - repeated,
            "repeated": repeated,
            "shortfall": shortfall,
            "val": len(held),
            "val_requested": want_val,
            "val_shortfall": want_val - len(held),
            "converted": converted[lang],
            "dropped": dict(drops[lang]),
            "unselected": len(pool) - used,
        }
    for lang in set(drops) - set(langs):
        langs[lang] = {"dropped": dict(drops[lang])}
    stats = {
        "input_rows": counted_rows["rows"],
        "converted": sum(converted.values()),
        "adapter_drops": {f"{lang}: {reason}": n for (lang, reason), n in sorted(adapter_drops.items())},
        "languages": langs,
        "tokens": _quantiles([len(r["input_ids"]) for r in train]),
    }
    return train, val, stats


# ------------------------------------------------------------------------------------------- caching


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def code_version(files: tuple[str, ...] = CODE_FILES) -> str:
    """Package version plus a hash of the code that shapes prepared data (``files``, in this package)."""
    from alia_nemo import __version__

    here = Path(__file__).parent
    digest = hashlib.sha256(b"".join((here / f).read_bytes() for f in files if (here / f).is_file()))
    return f"{__version__}+{digest.hexdigest()[:12]}"


def file_fingerprint(path: str) -> dict[str, Any]:
    """What a cache key records of a local file: its path, size and content hash (never its mtime, which
    an edit can keep)."""
    return {"path": str(Path(path).resolve()), "size": os.stat(path).st_size, "sha256": sha256_file(path)}


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
        "code": code_version(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def cache_dir(root: Path, name: str, suffix: str, key: str, error: type[AliaError] | None = None) -> Path:
    """``root / f"{name}-{suffix}"``, refused unless that is one entry directly inside ``root``.

    ``name`` comes from the configuration (``key``, e.g. ``data.name``): it must never place a cache, or what
    a rebuild deletes, outside ``prepared_root``. The error (``error``, default :class:`MixtureError`)
    names the key and the fix. The configuration checks names too; this guards every other caller.
    """
    entry = f"{name}-{suffix}"
    parts = Path(entry).parts
    inside = (
        len(parts) == 1
        and parts[0] not in (".", "..")
        and os.sep not in entry
        and (os.altsep is None or os.altsep not in entry)
        and "\0" not in entry
    )
    if inside:
        base = Path(os.path.abspath(root))
        inside = Path(os.path.abspath(base / entry)).parent == base
    if not inside:
        raise (error or MixtureError)(
            f"{key}={name!r} would place the prepared data outside {root} (at {root / entry}); set {key} to a "
            "plain name (letters, digits, '.', '_', '-'; no '/' or '..')"
        )
    return root / entry


def _lock_path(root: Path, key: str) -> Path:
    return root / f".lock-{key[:16]}"


def clean_stale_tmp(root: Path, key: str, stale_s: float = STALE_S) -> list[Path]:
    """Remove the temporary build directories of ``key`` whose builder is provably gone; return them.

    A build's temporary directory is ``.tmp-<key16>-<token12>``, the token being that of the lock
    (``.lock-<key16>``) its builder holds. It is kept while that lock names it and its holder is alive
    (:func:`alia_nemo.locks.holder_alive`: the same host and PID namespace with the PID running, or, from
    another host or container, a heartbeat younger than ``stale_s``); any other is a leftover of a build that
    was killed, and is removed.
    """
    info = read_lock(_lock_path(root, key))
    live = str(info.get("token", ""))[:12] if info and holder_alive(info, stale_s) else None
    removed = []
    for tmp in root.glob(f".tmp-{key[:16]}-*"):
        if live and tmp.name == f".tmp-{key[:16]}-{live}":
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def build_cached(
    root: Path,
    final: Path,
    key: str,
    build: Callable[[Path], None],
    *,
    what: str,
    error: type[AliaError],
    wait_s: float = WAIT_S,
    poll_s: float = POLL_S,
) -> Path:
    """``final`` once it is complete (it holds ``manifest.json``), built at most once per key across processes.

    The builder holds ``<root>/.lock-<key16>`` (a heartbeated :class:`~alia_nemo.locks.DirLock`), clears
    stale temporary directories of the key, runs ``build(tmp)`` (which writes ``manifest.json`` last) and
    renames ``tmp`` to ``final``. Another process wanting the same key meanwhile waits, saying once per
    holder whom it waits for, and returns ``final`` when that build is done (or builds it itself if the
    holder died: its lock is then stale and taken over). After ``wait_s`` seconds of a live holder it
    raises ``error``.
    """
    if (final / "manifest.json").is_file():
        return final  # identical inputs: nothing to do
    root.mkdir(parents=True, exist_ok=True)
    lock = DirLock(_lock_path(root, key), what)
    deadline = time.monotonic() + wait_s
    announced = None
    while True:
        try:
            lock.acquire()
            break
        except LockedError:
            info = read_lock(lock.path) or {}
        if (final / "manifest.json").is_file():
            return final
        holder = (info.get("host", "?"), info.get("pid", "?"))
        if holder != announced:
            print(
                f"[alia-nemo] waiting for PID {holder[1]} on host {holder[0]}, which is building {final.name} "
                f"(lock {lock.path}); its result is used when it is done",
                file=sys.stderr,
                flush=True,
            )
            announced = holder
        if time.monotonic() > deadline:
            raise error(
                f"gave up after {wait_s:.0f} s waiting for PID {holder[1]} on host {holder[0]} to finish building "
                f"{final} (lock {lock.path}, heartbeat {info.get('age_s', 0):.0f} s ago); wait for it, stop it, or "
                "use another data.prepared_root"
            )
        time.sleep(poll_s)
    try:
        if (final / "manifest.json").is_file():
            return final  # finished by the holder we waited for
        clean_stale_tmp(root, key)
        tmp = root / f".tmp-{key[:16]}-{lock.token[:12]}"
        tmp.mkdir()
        print(f"[alia-nemo] building {final} (lock {lock.path})", file=sys.stderr, flush=True)
        try:
            build(tmp)
            if final.exists() and not (final / "manifest.json").is_file():
                shutil.rmtree(final)  # an incomplete directory under the final name (not ours): replace it
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / "manifest.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # complete already (a builder after a lost lock): keep it
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()
    return final


def _write_shards(rows: list[dict], out: Path, split: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = []
    n_shards = max(1, math.ceil(len(rows) / SHARD_ROWS))
    for i in range(n_shards):
        chunk = rows[i * SHARD_ROWS : (i + 1) * SHARD_ROWS]
        table = pa.table(
            {
                "id": [r["id"] for r in chunk],
                "source": [r["source"] for r in chunk],
                "language": [r["language"] for r in chunk],
                "messages": [json.dumps(r["messages"], ensure_ascii=False) for r in chunk],
                "input_ids": pa.array([r["input_ids"] for r in chunk], type=pa.list_(pa.int32())),
                "loss_mask": pa.array([r["loss_mask"] for r in chunk], type=pa.list_(pa.int8())),
            }
        )
        name = f"{split}-{i:05d}-of-{n_shards:05d}.parquet"
        pq.write_table(table, out / name)
        names.append(name)
    return names


# ------------------------------------------------------------------------------------------- prepare


def prepare_mixture(
    mix: MixtureConfig, tokenizer, max_tokens: int, seed: int, progress: bool = True, wait_s: float = WAIT_S
) -> Path:
    """Build (or find in the cache) the prepared mixture and return its directory.

    A concurrent ``prepare`` of the same inputs (another process, another host sharing the filesystem) is
    waited for, up to ``wait_s`` seconds, and its result reused (:func:`build_cached`).
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
        _build_mixture(mix, tokenizer, max_tokens, seed, progress, missing, key, keyed, tmp)

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
) -> None:
    """Read, select and tokenise every dataset and write the shards and (last) ``manifest.json`` into ``tmp``."""
    from tqdm import tqdm

    started = time.time()
    seen: dict[str, str] = {}
    train, val, report = [], [], {}
    active = active_datasets(mix)
    # Bars are closed when an error leaves them (with-blocks), so the CLI's one-line error starts a line.
    with tqdm(total=len(mix.datasets), desc="datasets", disable=not progress) as datasets_bar:
        for name, entry in mix.datasets.items():
            datasets_bar.update()
            _add_dataset(mix, name, entry, active, missing, keyed, tokenizer, max_tokens, seed, progress, seen,
                         train, val, report)  # fmt: skip
    _check_selection(mix, report, train)

    random.Random(seed).shuffle(train)  # sources interleaved; the shuffle is part of the cache key (seed)
    files = {"train": _write_shards(train, tmp, "train"), "val": _write_shards(val, tmp, "val") if val else []}
    manifest = _manifest(mix, report, files, key, tokenizer, max_tokens, seed, time.time() - started)
    _composition_plot(manifest, tmp / "composition.png")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))  # written last


def _add_dataset(
    mix: MixtureConfig,
    name: str,
    entry: MixtureDatasetConfig,
    active: dict[str, MixtureDatasetConfig],
    missing: dict[str, list[str]],
    keyed: dict[str, str],
    tokenizer,
    max_tokens: int,
    seed: int,
    progress: bool,
    seen: dict[str, str],
    train: list[dict],
    val: list[dict],
    report: dict[str, dict],
) -> None:
    """Select one dataset into ``train`` / ``val`` and record its report."""
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
        t, v, stats = _select_dataset(
            name, entry, rows, tokenizer, max_tokens, seed, mix.val_fraction, mix.on_shortfall, seen, progress
        )
    for rev in revisions:
        if "sha256" in rev and keyed.get(rev["file"], rev["sha256"]) != rev["sha256"]:
            raise MixtureError(
                f"dataset {name!r}: {rev['file']} changed while prepare read it; rerun prepare once it is final"
            )
    train += t
    val += v
    report[name] = {
        "licence": entry.licence,
        "origin": entry.origin.model_dump(exclude_none=True),
        "revisions": revisions,
        **stats,
    }


def _check_selection(mix: MixtureConfig, report: dict[str, dict], train: list[dict]) -> None:
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
    if not train:
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
        "code_version": code_version(),
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


def read_manifest(directory: Path, error: type[AliaError] | None = None) -> dict[str, Any]:
    """A prepared directory's ``manifest.json``; ``error`` (default :class:`MixtureError`) when it is absent or
    unreadable, naming the directory and the fix (prepared data is only ever rebuilt, never repaired)."""
    path = Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise (error or MixtureError)(
            f"{directory} is not prepared data (no manifest.json); run alia-nemo prepare"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise (error or MixtureError)(
            f"{path} is corrupt ({exc}); delete {directory} and run alia-nemo prepare again"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise (error or MixtureError)(f"{path} has no file list; delete {directory} and run alia-nemo prepare again")
    return manifest


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
