"""Prepare preference pairs for a DPO stage: exact counts per dataset and language, every row accounted for.

``prepare_preferences`` does for pairs what :mod:`alia_nemo.data.mixture` does for conversations: it reads each
dataset (hub, hub cache or local files, :func:`read_rows`), converts it with its preference adapter
(:mod:`alia_nemo.data.preference_adapters`), and drops, counting each under its reason:

- pairs that can not be trained (:func:`alia_nemo.model.chatml.check_preference`: empty or identical answers, a
  prompt that does not end with a user turn, control tokens, contents that are not text);
- duplicates: the same prompt, chosen and rejected answer (sha256 of their canonical JSON) seen before in this or
  an earlier dataset (the first one keeps it, in configuration order);
- pairs whose chosen OR rejected sequence (prompt + answer, ChatML, one BOS) is longer than ``max_tokens``.

From what passes it selects, in a seeded order per dataset and language, exactly ``counts[language]`` training
pairs plus :func:`alia_nemo.config.resolve.validation_count` validation pairs (``data.on_shortfall``: stop with
an error naming what is missing, repeat pairs, or take what there is), shuffles the training order with the
seed, and writes Parquet shards (``train-00000.parquet``, ``val-00000.parquet``, ...) with each pair's text and
both sequences' token ids and loss masks (:func:`alia_nemo.model.chatml.tokenize_preferences`: the final
answer's content and its ``<|im_end|>`` only), then ``manifest.json``, into a cache directory keyed by a hash of
everything that shapes the result (:func:`cache_key`; built once, atomically, under a lock:
:func:`alia_nemo.data.cache.build_cached`).

Unlike the SFT mixture (712k conversations, streamed to disk), a preference set is tens of thousands of pairs, so
the build holds the candidate pairs and the selected rows in memory. Only candidates the selection reaches are
tokenised, so the length filter's count (like the mixture's) covers the pairs looked at, and the rest are
reported as ``unselected``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from alia_nemo.config.resolve import validation_count
from alia_nemo.config.schema import PreferenceConfig, PreferenceDatasetConfig
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
from alia_nemo.data.mixture import MixtureError, active_datasets, missing_files
from alia_nemo.data.mixture import read_rows as _read_source_rows
from alia_nemo.data.reader import DataError, InvalidRow
from alia_nemo.model.chatml import (
    CHAT_TEMPLATE,
    ConversationError,
    TokenizedConversation,
    check_preference,
    tokenize_preferences,
)

SHARD_ROWS = 10_000  # pairs per Parquet shard (each pair holds two sequences)
TOKENIZE_BATCH = 256  # pairs per tokenizer call
COLUMNS = ("id", "source", "language", "prompt", "chosen", "rejected", "chosen_input_ids", "chosen_loss_mask",
           "rejected_input_ids", "rejected_loss_mask")  # fmt: skip
ROW_KEYS = ("id", "chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask")
PAIR_FORMAT = (
    "pair JSONL (one {'id', 'language', 'prompt': str or messages, 'chosen': str, 'rejected': str} object per "
    "line, or NeMo-RL's {'context', 'completions': [{'rank', 'completion'}, ...]}) or Parquet with the same columns"
)


class PreferenceError(DataError):
    """A preference set that can not be built as configured; the message names the problem and its fix."""


# ---------------------------------------------------------------------------------------------- plan


def plan(cfg: PreferenceConfig) -> dict[str, Any]:
    """What a prepare would do, without reading any data (``prepare --dry-run``)."""
    missing = missing_files(cfg)
    datasets = {}
    for name, entry in cfg.datasets.items():
        datasets[name] = {
            "licence": entry.licence,
            "adapter": entry.adapter,
            "origin": entry.origin.model_dump(exclude_none=True),
            "counts": dict(entry.counts),
            "val": {lang: validation_count(n, cfg.val_fraction) for lang, n in entry.counts.items()},
            "total": sum(entry.counts.values()),
            "excluded_by_licence": entry.licence in cfg.exclude_licenses,
            "missing_files": missing.get(name, []),
        }
    kept = [d for d in datasets.values() if not d["excluded_by_licence"]]
    languages: Counter = Counter()
    for d in kept:
        languages.update(d["counts"])
    return {
        "name": cfg.name,
        "format": "preference",
        "unit": "pairs",
        "datasets": datasets,
        "languages": dict(sorted(languages.items())),
        "total": sum(d["total"] for d in kept),
        "val_total": sum(sum(d["val"].values()) for d in kept),
        "excluded_licenses": list(cfg.exclude_licenses),
        "on_shortfall": cfg.on_shortfall,
        "val_fraction": cfg.val_fraction,
        "prepared_root": cfg.prepared_root,
        "internal_dir": cfg.internal_dir,  # where the MISSING internal sets were looked for (the legend names it)
        "allow_missing_internal": cfg.allow_missing_internal,
    }


def read_rows(name: str, entry: PreferenceDatasetConfig, revisions: list | None = None) -> Iterator[dict | InvalidRow]:
    """Raw rows of a dataset in its source's schema, read as the mixture reads them (local files, or the hub and
    its cache: :func:`alia_nemo.data.mixture.read_rows`); what was read is appended to ``revisions``."""
    try:
        yield from _read_source_rows(name, entry, revisions)  # type: ignore[arg-type]
    except MixtureError as exc:  # one reader, this module's error class
        raise PreferenceError(str(exc)) from None


def pair_digest(prompt: list[dict[str, str]], chosen: str, rejected: str) -> str:
    """sha256 of a checked pair's canonical JSON: what the duplicate filter compares, across datasets."""
    blob = json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}, ensure_ascii=False,
                      sort_keys=True, separators=(",", ":"))  # fmt: skip
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def cache_key(cfg: PreferenceConfig, tokenizer, max_tokens: int, seed: int) -> str:
    """Hash of the active datasets (and local files' content hashes), tokenizer, template, filters, seed and code.

    The set's name, its directories and data.max_tokens (folded into ``max_tokens``) are left out: they do not
    change the pairs (the name and prepared_root place the directory; internal_dir is in the files' paths).
    """
    datasets = {}
    for name, entry in active_datasets(cfg).items():
        d = entry.model_dump(mode="json")
        d["files"] = [file_fingerprint(f) for f in entry.origin.files or [] if Path(f).is_file()]
        datasets[name] = d
    inputs = {
        "format": "preference",
        "datasets": datasets,
        "tokenizer": tokenizer_hash(tokenizer),
        "template": hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest(),
        "max_tokens": max_tokens,
        "seed": seed,
        "val_fraction": cfg.val_fraction,
        "on_shortfall": cfg.on_shortfall,
        "allow_missing_internal": cfg.allow_missing_internal,
        "exclude_licenses": sorted(cfg.exclude_licenses),
        "code": code_version(__name__),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- prepare


def prepare_preferences(
    cfg: PreferenceConfig, tokenizer, max_tokens: int, seed: int, progress: bool = True, wait_s: float = WAIT_S
) -> Path:
    """Build (or find in the cache) the prepared preference set and return its directory.

    A concurrent ``prepare`` of the same inputs is waited for, up to ``wait_s`` seconds, and its result reused.
    """
    missing = missing_files(cfg)
    if missing and not cfg.allow_missing_internal:
        listed = "; ".join(f"{name}: {', '.join(files)}" for name, files in sorted(missing.items()))
        raise PreferenceError(
            f"{len(missing)} dataset(s) of preference set {cfg.name!r} have missing files ({listed}). Expected "
            f"format: {PAIR_FORMAT}. Set data.internal_dir (or each origin.files) to where they are, exclude them by "
            "licence, or set data.allow_missing_internal=true to build without them (the shortfall is recorded in "
            "the manifest)."
        )
    root = Path(cfg.prepared_root).expanduser()
    # The content hashes the key is made of (sha256_file remembers them): the build checks that what it read is
    # still what the key describes.
    keyed = {
        str(Path(f).resolve()): sha256_file(f)
        for name, entry in active_datasets(cfg).items()
        if name not in missing
        for f in entry.origin.files or []
    }
    key = cache_key(cfg, tokenizer, max_tokens, seed)
    final = cache_dir(root, cfg.name, key[:16], "data.name", PreferenceError)

    def build(tmp: Path) -> None:
        _build(cfg, tokenizer, max_tokens, seed, progress, missing, key, keyed, tmp)

    return build_cached(
        root, final, key, build, what=f"prepare of preference set {cfg.name}", error=PreferenceError, wait_s=wait_s
    )


class _Build:
    """What a build collects: selected rows (in memory), kept-pair digests, per-dataset reports, lengths."""

    def __init__(self) -> None:
        self.train: list[dict[str, Any]] = []
        self.val: list[dict[str, Any]] = []
        self.seen: dict[str, str] = {}  # pair digest -> the dataset that kept it
        self.datasets: dict[str, dict[str, dict[str, Any]]] = {}  # name -> language -> report
        self.sources: dict[str, dict[str, Any]] = {}  # name -> where its rows came from, rows read, other drops
        self.lengths: dict[str, list[int]] = {"chosen": [], "rejected": []}  # of training sequences


def _build(
    cfg: PreferenceConfig,
    tokenizer,
    max_tokens: int,
    seed: int,
    progress: bool,
    missing: dict[str, list[str]],
    key: str,
    keyed: dict[str, str],
    tmp: Path,
) -> None:
    """Read, check, select and tokenise every dataset; write the shards and (last) ``manifest.json`` into ``tmp``."""
    from tqdm import tqdm

    started = time.time()
    out = _Build()
    active = active_datasets(cfg)
    # Bars are closed when an error leaves them (with-blocks), so the CLI's one-line error starts a line.
    with tqdm(total=len(cfg.datasets), desc="datasets", disable=not progress) as bar:
        for name, entry in cfg.datasets.items():
            bar.update()
            if name not in active:
                out.sources[name] = {"excluded_by_licence": entry.licence, "requested": dict(entry.counts)}
                continue
            if name in missing:
                out.sources[name] = {"licence": entry.licence, "missing_files": missing[name]}
                out.datasets[name] = {lang: _language_report(n, validation_count(n, cfg.val_fraction))
                                      for lang, n in entry.counts.items()}  # fmt: skip
                continue
            revisions: list[dict] = []
            with tqdm(read_rows(name, entry, revisions), desc=name, unit=" rows", leave=False,
                      disable=not progress) as rows:  # fmt: skip
                _add_dataset(cfg, name, entry, rows, tokenizer, max_tokens, seed, progress, out)
            for rev in revisions:
                if "sha256" in rev and keyed.get(rev["file"], rev["sha256"]) != rev["sha256"]:
                    raise PreferenceError(
                        f"dataset {name!r}: {rev['file']} changed while prepare read it; rerun prepare once it is final"
                    )
            out.sources[name]["revisions"] = revisions
    _check_selection(cfg, out)
    # Sources interleaved; the shuffle is part of the cache key (seed).
    random.Random(seed).shuffle(out.train)
    files = {"train": _write_shards(out.train, tmp, "train"), "val": _write_shards(out.val, tmp, "val")}
    manifest = _manifest(cfg, out, files, key, tokenizer, max_tokens, seed, time.time() - started)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))  # written last


def _language_report(wanted: int, want_val: int) -> dict[str, Any]:
    """A language's report before anything is selected (all of it short)."""
    return {"requested": wanted, "selected": 0, "repeated": 0, "shortfall": wanted, "val": 0,
            "val_requested": want_val, "val_shortfall": want_val, "candidates": 0, "dropped": {},
            "unselected": 0}  # fmt: skip


def _add_dataset(
    cfg: PreferenceConfig,
    name: str,
    entry: PreferenceDatasetConfig,
    rows: Iterable[dict | InvalidRow],
    tokenizer,
    max_tokens: int,
    seed: int,
    progress: bool,
    out: _Build,
) -> None:
    """Convert, check and deduplicate one dataset's pairs, then select each language into ``out``."""
    from alia_nemo.data.preference_adapters import PREFERENCE_ADAPTERS

    adapter_drops: Counter = Counter()
    read = Counter()

    def counted(it: Iterable[dict | InvalidRow]) -> Iterator[dict]:
        for row in it:
            read["rows"] += 1
            if isinstance(row, InvalidRow):  # a line of a local file that is not a JSON object
                adapter_drops[("unknown", row.reason)] += 1
                continue
            yield row

    pairs = PREFERENCE_ADAPTERS[entry.adapter](
        counted(rows), source=name, languages=list(entry.counts), drops=adapter_drops, options=entry.options
    )
    drops: dict[str, Counter] = defaultdict(Counter)
    pools: dict[str, list[dict[str, Any]]] = defaultdict(list)
    candidates: Counter = Counter()
    for pair in pairs:
        lang = pair["language"]
        if lang not in entry.counts:  # adapters filter already; counted all the same, so the rows balance
            adapter_drops[(lang, "language_not_requested")] += 1
            continue
        candidates[lang] += 1
        try:
            checked = check_preference(pair["prompt"], pair["chosen"], pair["rejected"], pair["id"])
        except ConversationError as exc:
            drops[lang][exc.reason] += 1
            continue
        prompt, chosen, rejected = checked
        digest = pair_digest(prompt, chosen, rejected)
        first = out.seen.get(digest)
        if first is not None:
            # Kept once, by the first dataset that has it: say which one.
            drops[lang]["duplicate pair" if first == name else f"duplicate of dataset {first!r}"] += 1
            continue
        out.seen[digest] = name
        pools[lang].append({**pair, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    other: Counter = Counter()
    for (lang, reason), n in adapter_drops.items():
        if lang in entry.counts:
            drops[lang][reason] += n
        else:  # rows in languages this dataset does not request, or none readable
            other[f"{lang}: {reason}"] += n
    languages = {}
    for lang, wanted in entry.counts.items():
        languages[lang] = _select_language(
            name, lang, wanted, pools.get(lang, []), tokenizer, max_tokens, seed, cfg.val_fraction,
            cfg.on_shortfall, drops[lang], out, progress,
        )  # fmt: skip
        languages[lang]["candidates"] = candidates[lang]
    out.datasets[name] = languages
    out.sources[name] = {
        "licence": entry.licence,
        "adapter": entry.adapter,
        "origin": entry.origin.model_dump(exclude_none=True),
        "input_rows": read["rows"],
        "pairs": sum(candidates.values()),
        "other_drops": dict(sorted(other.items())),
    }


def _select_language(
    name: str,
    lang: str,
    wanted: int,
    pool: list[dict[str, Any]],
    tokenizer,
    max_tokens: int,
    seed: int,
    val_fraction: float,
    on_shortfall: str,
    drops: Counter,
    out: _Build,
    progress: bool,
) -> dict[str, Any]:
    """Pick ``wanted`` training pairs (+ the validation share) of one language in a seeded order; append their rows
    to ``out``. Returns the language's report."""
    from tqdm import tqdm

    random.Random(f"{seed}:{name}:{lang}").shuffle(pool)
    want_val = validation_count(wanted, val_fraction)
    picked: list[dict[str, Any]] = []
    held = used = 0
    with tqdm(total=wanted + want_val, desc=f"{name}/{lang} tokenise", unit=" pairs", leave=False,
              disable=not progress) as bar:  # fmt: skip
        # Tokenise batches of the shuffled pool, only as far as the counts need.
        for start in range(0, len(pool), TOKENIZE_BATCH):
            if len(picked) >= wanted and held >= want_val:
                break
            chunk = pool[start : start + TOKENIZE_BATCH]
            toks = tokenize_preferences(
                tokenizer, [(p["prompt"], p["chosen"], p["rejected"]) for p in chunk], [p["id"] for p in chunk]
            )
            for pair, (chosen, rejected) in zip(chunk, toks):
                if len(picked) >= wanted and held >= want_val:
                    break
                used += 1
                if max(len(chosen.input_ids), len(rejected.input_ids)) > max_tokens:
                    drops[f"longer than {max_tokens} tokens"] += 1
                    continue
                row = _row(pair, chosen, rejected)
                if len(picked) < wanted:
                    picked.append(row)
                    out.train.append(row)
                    _count_lengths(out, row)
                else:
                    out.val.append(row)
                    held += 1
                bar.update()
    shortfall, repeated = wanted - len(picked), 0
    if shortfall and on_shortfall == "repeat" and picked:
        for i in range(shortfall):
            row = picked[i % len(picked)]
            out.train.append({**row, "id": f"{row['id']}#r{i // len(picked) + 1}"})
            _count_lengths(out, row)
        repeated, shortfall = shortfall, 0
    return {
        "requested": wanted,
        "selected": len(picked),
        "repeated": repeated,
        "shortfall": shortfall,
        "val": held,
        "val_requested": want_val,
        "val_shortfall": want_val - held,
        "candidates": 0,  # set by the caller: pairs the adapter gave in this language
        "dropped": dict(drops),
        "unselected": len(pool) - used,
    }


def _row(pair: dict[str, Any], chosen: TokenizedConversation, rejected: TokenizedConversation) -> dict[str, Any]:
    """A prepared row: the pair's text (the prompt as JSON) and both sequences' ids (int32) and masks (int8)."""
    return {
        "id": pair["id"],
        "source": pair["source"],
        "language": pair["language"],
        "prompt": json.dumps(pair["prompt"], ensure_ascii=False),
        "chosen": pair["chosen"],
        "rejected": pair["rejected"],
        "chosen_input_ids": np.asarray(chosen.input_ids, dtype=np.int32),
        "chosen_loss_mask": np.asarray(chosen.loss_mask, dtype=np.int8),
        "rejected_input_ids": np.asarray(rejected.input_ids, dtype=np.int32),
        "rejected_loss_mask": np.asarray(rejected.loss_mask, dtype=np.int8),
    }


def _count_lengths(out: _Build, row: dict[str, Any]) -> None:
    """Record a training row's sequence lengths (repeats included: they are trained again)."""
    out.lengths["chosen"].append(len(row["chosen_input_ids"]))
    out.lengths["rejected"].append(len(row["rejected_input_ids"]))


def _check_selection(cfg: PreferenceConfig, out: _Build) -> None:
    """Stop on a shortfall (on_shortfall=error) or an empty training set; warn of validation shortfalls."""
    short = [
        (name, lang, s)
        for name, langs in out.datasets.items()
        if "missing_files" not in out.sources.get(name, {})  # allow_missing_internal: recorded, not an error
        for lang, s in langs.items()
        if s["shortfall"]
    ]
    if short and cfg.on_shortfall == "error":
        listed = "; ".join(
            f"dataset {name!r} language {lang}: need {s['requested']} training pairs (+{s['val_requested']} "
            f"validation), have {s['selected']} usable ({_top_drops(s['dropped'])})"
            for name, lang, s in short
        )
        raise PreferenceError(
            f"not enough usable preference pairs: {listed}. Fix or add data, lower data.datasets.<name>.counts, or "
            "set data.on_shortfall=repeat (reuse pairs) or data.on_shortfall=take_all (train on fewer); either is "
            "recorded in the manifest"
        )
    if not out.train:
        reasons = "; ".join(
            f"{name!r}: read {src.get('input_rows', 0)} rows"
            + (f", missing files {src['missing_files']}" if "missing_files" in src else "")
            + (f", excluded by licence {src['excluded_by_licence']}" if "excluded_by_licence" in src else "")
            for name, src in out.sources.items()
        )
        raise PreferenceError(
            f"preference set {cfg.name!r} has no training pair ({reasons}). Check the files (expected {PAIR_FORMAT}, "
            "or the source's own schema for its adapter) and the counts' languages"
        )
    val_short = [
        f"{name}/{lang}: {s['val']} of {s['val_requested']}"
        for name, langs in out.datasets.items()
        for lang, s in langs.items()
        if s["val_shortfall"]
    ]
    if val_short:
        print(f"[alia-nemo] warning: validation shortfall ({'; '.join(val_short)}): fewer held-out pairs than "
              "data.val_fraction asks, recorded in the manifest", file=sys.stderr, flush=True)  # fmt: skip


def _top_drops(dropped: dict[str, int]) -> str:
    """The three most frequent drop reasons of a language, for the shortfall error."""
    top = ", ".join(f"{reason} x{n}" for reason, n in Counter(dropped).most_common(3))
    return f"most dropped: {top}" if top else "nothing dropped: the source has too few pairs"


def _write_shards(rows: list[dict[str, Any]], out: Path, split: str) -> list[str]:
    """``rows`` as Parquet shards ``{split}-00000.parquet``, ... of :data:`SHARD_ROWS` rows (none when empty)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [(c, pa.string()) for c in COLUMNS[:6]]
        + [(c, pa.list_(pa.int32() if c.endswith("input_ids") else pa.int8())) for c in COLUMNS[6:]]
    )
    names = []
    for i in range(math.ceil(len(rows) / SHARD_ROWS)):
        shard = rows[i * SHARD_ROWS : (i + 1) * SHARD_ROWS]
        columns: dict[str, Any] = {c: pa.array([r[c] for r in shard], pa.string()) for c in COLUMNS[:6]}
        for c in COLUMNS[6:]:
            offsets = np.cumsum([0] + [len(r[c]) for r in shard], dtype=np.int32)
            values = np.concatenate([r[c] for r in shard])
            columns[c] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, schema.field(c).type.value_type))
        name = f"{split}-{i:05d}.parquet"
        pq.write_table(pa.table(columns, schema=schema), out / name)
        names.append(name)
    return names


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


def _manifest(
    cfg: PreferenceConfig,
    out: _Build,
    files: dict[str, list[str]],
    key: str,
    tokenizer,
    max_tokens: int,
    seed: int,
    seconds: float,
) -> dict[str, Any]:
    """The manifest: inputs (tokenizer, template, seed, limits), files, totals, per-dataset reports, lengths."""
    totals: Counter = Counter()
    for langs in out.datasets.values():
        for s in langs.values():
            for k in ("requested", "selected", "repeated", "shortfall", "val", "val_requested", "val_shortfall",
                      "candidates", "unselected"):  # fmt: skip
                totals[k] += s[k]
            totals["dropped"] += sum(s["dropped"].values())
    for src in out.sources.values():
        totals["input_rows"] += src.get("input_rows", 0)
        totals["dropped"] += sum(src.get("other_drops", {}).values())
    return {
        "name": cfg.name,
        "format": "preference",
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 1),
        "code_version": code_version(__name__),
        "tokenizer": {
            "name_or_path": getattr(tokenizer, "name_or_path", None),
            "sha256": tokenizer_hash(tokenizer),
            "vocab_size": len(tokenizer),
        },
        # equal to alia_nemo.nemo_rl.processor.TEMPLATE_SHA256 (the data layer does not import the plugins)
        "template_sha256": hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest(),
        "seed": seed,
        "max_tokens": max_tokens,
        "val_fraction": cfg.val_fraction,
        "on_shortfall": cfg.on_shortfall,
        "exclude_licenses": list(cfg.exclude_licenses),
        "allow_missing_internal": cfg.allow_missing_internal,
        "files": files,
        "columns": list(COLUMNS),
        "totals": {k: totals[k] for k in ("requested", "selected", "repeated", "shortfall", "val", "val_requested",
                                          "val_shortfall", "input_rows", "candidates", "dropped", "unselected")},
        "tokens": {"chosen": _quantiles(out.lengths["chosen"]), "rejected": _quantiles(out.lengths["rejected"])},
        "datasets": out.datasets,
        "sources": out.sources,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------- load


def load_prepared_preferences(directory: Path) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Training and validation rows and the manifest of a prepared preference set.

    Each row is ``{"id", "chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask"}``
    (lists of int), in the prepared (shuffled) order.
    """
    import pyarrow.parquet as pq

    directory = Path(directory)
    manifest = read_manifest(directory, PreferenceError)
    if manifest.get("format") != "preference":
        raise PreferenceError(
            f"{directory} holds {manifest.get('format') or 'non-preference'} data, not preference pairs; prepare a "
            "preference set (data.format=preference, e.g. data=dpo_sample) for a DPO stage"
        )
    out: dict[str, list[dict]] = {"train": [], "val": []}
    for split, names in manifest["files"].items():
        for name in names:
            table = pq.read_table(directory / name, columns=list(ROW_KEYS)).to_pydict()
            out[split] += [dict(zip(ROW_KEYS, values)) for values in zip(*(table[k] for k in ROW_KEYS))]
    return out["train"], out["val"], manifest


# --------------------------------------------------------------------------------------------- report


def print_preference_plan(p: dict[str, Any]) -> None:
    """The dry-run plan of a preference set as a table: training pairs per dataset and language (+ validation)."""
    from rich.table import Table

    from alia_nemo.config.schema import LANGUAGES
    from alia_nemo.data.report import console, origin_text, plan_label, print_plan_legend

    langs = list(LANGUAGES)
    table = Table(title=f"preference set {p['name']}: {p['total']:,} training + {p['val_total']:,} validation pairs "
                  "(dry run, nothing read)")  # fmt: skip
    for col in ("dataset", *langs, "total", "licence"):
        table.add_column(col, justify="left" if col in ("dataset", "licence") else "right")
    table.add_column("from", overflow="fold")
    for name, d in p["datasets"].items():
        table.add_row(plan_label(name, d), *[f"{d['counts'][lang]:,}" if lang in d["counts"] else "" for lang in langs],
                      f"{d['total']:,}", d["licence"], origin_text(d["origin"], d["missing_files"]))  # fmt: skip
    table.add_row("total", *[f"{p['languages'].get(lang, 0):,}" for lang in langs], f"{p['total']:,}", "", "")
    console().print(table)
    print_plan_legend(p, "pairs")


def print_preference_manifest(m: dict[str, Any]) -> None:
    """A prepared preference set's manifest as a table: requested, selected, dropped and lengths per dataset."""
    from rich.table import Table

    from alia_nemo.data.report import console

    keys = ("requested", "selected", "repeated", "shortfall", "val", "val_shortfall")
    table = Table(title=f"prepared preference set {m['name']} ({m['seconds']} s)")
    for col in ("dataset", *keys, "dropped"):
        table.add_column(col, justify="left" if col == "dataset" else "right")
    for name, langs in m["datasets"].items():
        tot = {k: sum(s[k] for s in langs.values()) for k in keys}
        dropped = sum(sum(s["dropped"].values()) for s in langs.values())
        dropped += sum(m["sources"].get(name, {}).get("other_drops", {}).values())
        label = name + (" (missing)" if "missing_files" in m["sources"].get(name, {}) else "")
        table.add_row(label, *[f"{tot[k]:,}" for k in keys], f"{dropped:,}")
    t = m["totals"]
    table.add_row("total", *[f"{t.get(k, 0):,}" for k in keys], f"{t.get('dropped', 0):,}")
    console().print(table)
    for side in ("chosen", "rejected"):
        q = m["tokens"][side]
        if q.get("count"):
            print(f"[alia-nemo] {side} sequences: {q['count']:,}, tokens p50 {q['p50']:,} / p95 {q['p95']:,} / "
                  f"max {q['max']:,} (max_tokens {m['max_tokens']:,})")  # fmt: skip
