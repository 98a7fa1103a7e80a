"""Prepare a weighted SFT mixture: exact counts per dataset and language, every row accounted for.

``prepare_mixture`` reads each dataset (hub, hub cache or local files), converts it with its source
adapter, drops malformed, duplicate and over-long conversations (each counted with its reason),
selects exactly the configured count per language with a seeded shuffle, holds out a validation share,
tokenises once with assistant-only masks, and writes Parquet shards plus ``manifest.json`` into a
directory keyed by a hash of everything that shapes the result. The directory appears atomically:
an interrupted build never looks complete, and an identical rebuild is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from alia_nemo.chatml import CHAT_TEMPLATE, ConversationError, tokenize_conversations, validate_conversation
from alia_nemo.config_schema import MixtureConfig, MixtureDatasetConfig
from alia_nemo.errors import AliaError

SHARD_ROWS = 20_000
TOKENIZE_BATCH = 256
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


def read_local_rows(files: list[str]) -> Iterator[dict]:
    """Rows of local Parquet / JSONL files, streamed; a bad JSON line yields ``{"__invalid_json__": "file:line"}``."""
    import pyarrow.parquet as pq

    for file in files:
        if file.endswith(".parquet"):
            for batch in pq.ParquetFile(file).iter_batches(batch_size=2048):
                yield from batch.to_pylist()
        else:
            with open(file, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError:
                            yield {"__invalid_json__": f"{Path(file).name}:{lineno}"}


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_rows(name: str, entry: MixtureDatasetConfig, revisions: list | None = None) -> Iterator[dict]:
    """Raw rows of a dataset in its source's schema: local files, or the hub (the cache when offline).

    What was actually read is appended to ``revisions`` (file hashes; hub revision and data fingerprint).
    """
    origin = entry.origin
    revisions = revisions if revisions is not None else []
    if origin.files:
        revisions += [{"file": str(Path(f).resolve()), "sha256": _sha256_file(f)} for f in origin.files]
        yield from read_local_rows(origin.files)
        return
    import datasets

    for config in origin.configs or [origin.name]:
        try:
            ds = datasets.load_dataset(origin.path, config, split=origin.split, revision=origin.revision)
        except Exception as exc:  # the hub client raises many types; all mean "not available here"
            raise MixtureError(
                f"dataset {name!r}: could not load {origin.path} (config {config}, split {origin.split}): {exc}. "
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
    seen: set[str],
    progress: bool = True,
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    from alia_nemo.sft_sources import ADAPTERS

    if entry.adapter not in ADAPTERS:
        raise MixtureError(f"dataset {name!r}: unknown adapter {entry.adapter!r}; choose one of {sorted(ADAPTERS)}")
    adapter_drops: Counter = Counter()
    counted_rows = Counter()

    def count_rows(it: Iterable[dict]) -> Iterator[dict]:
        for row in it:
            counted_rows["rows"] += 1
            if "__invalid_json__" in row:
                adapter_drops[("unknown", "invalid JSON")] += 1
                continue
            yield row

    by_lang: dict[str, list[dict]] = defaultdict(list)
    drops: dict[str, Counter] = defaultdict(Counter)
    converted = Counter()
    for conv in ADAPTERS[entry.adapter](
        count_rows(rows), source=name, languages=list(entry.counts), drops=adapter_drops, options=entry.options
    ):
        lang = conv["language"]
        if lang not in entry.counts:
            continue
        converted[lang] += 1
        try:
            validate_conversation(conv["messages"], conv["id"])
        except ConversationError as exc:
            drops[lang][exc.problem.split(";")[0]] += 1
            continue
        digest = content_hash(conv["messages"])
        if digest in seen:
            drops[lang]["duplicate (same normalised content)"] += 1
            continue
        seen.add(digest)
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
            "converted": converted[lang],
            "dropped": dict(drops[lang]),
            "unselected": len(pool) - used,
        }
    for lang in set(drops) - set(langs):
        langs[lang] = {"dropped": dict(drops[lang])}
    stats = {
        "input_rows": counted_rows["rows"],
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


def code_version() -> str:
    """Package version plus a hash of the code that shapes prepared data."""
    from alia_nemo import __version__

    here = Path(__file__).parent
    digest = hashlib.sha256(b"".join((here / f).read_bytes() for f in CODE_FILES if (here / f).is_file()))
    return f"{__version__}+{digest.hexdigest()[:12]}"


def file_fingerprint(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(mix: MixtureConfig, tokenizer, max_tokens: int, seed: int) -> str:
    """Hash of sources (and local file fingerprints), tokenizer, template, filters and code version."""
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


def clean_stale_tmp(root: Path, key: str) -> None:
    for tmp in root.glob(f".tmp-{key[:16]}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        alive = pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid()
        if not alive:
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------- prepare


def prepare_mixture(mix: MixtureConfig, tokenizer, max_tokens: int, seed: int, progress: bool = True) -> Path:
    """Build (or find in the cache) the prepared mixture and return its directory."""
    missing = missing_files(mix)
    if missing and not mix.allow_missing_internal:
        lines = [f"  {name}: {', '.join(files)}" for name, files in sorted(missing.items())]
        raise MixtureError(
            f"{len(missing)} dataset(s) of mixture {mix.name!r} have missing files:\n"
            + "\n".join(lines)
            + f"\nExpected format: {INTERNAL_FORMAT}.\nSet data.internal_dir (or each origin.files) to where they "
            "are, exclude them by licence, or set data.allow_missing_internal=true to build without them "
            "(the shortfall is recorded in the manifest)."
        )
    root = Path(mix.prepared_root).expanduser()
    key = cache_key(mix, tokenizer, max_tokens, seed)
    final = root / f"{mix.name}-{key[:16]}"
    if (final / "manifest.json").is_file():
        return final  # identical inputs: nothing to do
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(root, key)
    tmp = root / f".tmp-{key[:16]}-{os.getpid()}"
    tmp.mkdir()

    from tqdm import tqdm

    started = time.time()
    seen: set[str] = set()
    train, val, report = [], [], {}
    active = active_datasets(mix)
    for name, entry in tqdm(list(mix.datasets.items()), desc="datasets", disable=not progress):
        if name not in active:
            report[name] = {"excluded_by_licence": entry.licence, "requested": dict(entry.counts)}
            continue
        if name in missing:
            report[name] = {
                "missing_files": missing[name],
                "languages": {
                    lang: {"requested": n, "selected": 0, "repeated": 0, "shortfall": n, "val": 0}
                    for lang, n in entry.counts.items()
                },
            }
            continue
        revisions: list[dict] = []
        rows = tqdm(read_rows(name, entry, revisions), desc=name, unit=" rows", leave=False, disable=not progress)
        t, v, stats = _select_dataset(
            name, entry, rows, tokenizer, max_tokens, seed, mix.val_fraction, mix.on_shortfall, seen, progress
        )
        train += t
        val += v
        report[name] = {
            "licence": entry.licence,
            "origin": entry.origin.model_dump(exclude_none=True),
            "revisions": revisions,
            **stats,
        }

    shortfalls = [
        f"  {name}/{lang}: {s['selected']} of {s['requested']}"
        for name, r in report.items()
        if "missing_files" not in r
        for lang, s in r.get("languages", {}).items()
        if s.get("shortfall")
    ]
    if shortfalls and mix.on_shortfall == "error":
        shutil.rmtree(tmp, ignore_errors=True)
        raise MixtureError(
            "not enough usable conversations:\n" + "\n".join(shortfalls) + "\nSet data.on_shortfall=repeat "
            "(reuse rows) or data.on_shortfall=take_all (train on fewer); either is recorded in the manifest."
        )

    random.Random(seed).shuffle(train)  # sources interleaved; the shuffle is part of the cache key (seed)
    files = {"train": _write_shards(train, tmp, "train"), "val": _write_shards(val, tmp, "val") if val else []}
    manifest = _manifest(mix, report, files, key, tokenizer, max_tokens, seed, time.time() - started)
    _composition_plot(manifest, tmp / "composition.png")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))  # written last
    if final.exists():  # a concurrent build finished first: keep its result
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def _manifest(mix, report, files, key, tokenizer, max_tokens, seed, seconds) -> dict[str, Any]:
    totals: Counter = Counter()
    for r in report.values():
        for s in r.get("languages", {}).values():
            for k in ("requested", "selected", "repeated", "shortfall", "val", "converted", "unselected"):
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
    ax.legend(ncol=len(langs), fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def load_prepared(directory: Path) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Training and validation rows (``input_ids``, ``labels``) and the manifest of a prepared mixture."""
    import pyarrow.parquet as pq

    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    out: dict[str, list[dict]] = {"train": [], "val": []}
    for split, names in manifest["files"].items():
        for name in names:
            table = pq.read_table(directory / name, columns=["input_ids", "loss_mask"])
            for ids, mask in zip(table.column("input_ids").to_pylist(), table.column("loss_mask").to_pylist()):
                out[split].append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]})
    return out["train"], out["val"], manifest
