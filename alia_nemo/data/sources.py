"""The data sources, keyed by ``data.format``: the one place that chooses code by the kind of data config.

Each source knows how to

- ``plan``: what a prepare would do, reading nothing (``prepare --dry-run``);
- ``prepare``: build the prepared artifact, or find it in the cache (:mod:`alia_nemo.data.cache`);
- ``count``: training and validation rows, from a prepared manifest or, before preparing, from the config;
- ``load``: the tokenised rows the local engine trains on (preparing first where there is a cache).

``prepare``, ``compile``, both engines and the pipeline go through :func:`source_for`; adding a format is one
class here plus its schema section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from alia_nemo.errors import ConfigError

if TYPE_CHECKING:
    from alia_nemo.config.resolve import ResolvedStage
    from alia_nemo.config.schema import AliaConfig


@dataclass(frozen=True)
class Counts:
    train: int | None  # None: unknown until the data is read
    val: int
    counted_from: str


@dataclass
class Prepared:
    """A source's rows for the local engine, with the report (or manifest) they came with."""

    train: list[dict[str, list[int]]]
    val: list[dict[str, list[int]]]
    report: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None  # what :meth:`DataSource.count` reads


class DataSource:
    """The interface every ``data.format`` implements (see the module docstring)."""

    format: ClassVar[str]
    unit: ClassVar[str]  # what a row is
    stage_kind: ClassVar[str]  # the stage kind it feeds: sft (conversations) or cpt (plain text)
    cached: ClassVar[bool]  # prepare writes a directory NeMo-RL can read (compile needs one)

    def train_tokens(self, cfg: AliaConfig, step_cap: int | None, tokens_per_step: int) -> int | None:
        """Training tokens to prepare (CPT sources only)."""
        return None

    def max_tokens(self, cfg: AliaConfig) -> int:
        """The longest sequence a row may have (longer conversations are dropped and counted, never cut)."""
        return cfg.stage.seq_length

    def plan(self, cfg: AliaConfig, stage: ResolvedStage) -> dict[str, Any]:
        raise NotImplementedError

    def prepare(self, cfg: AliaConfig, stage: ResolvedStage, tokenizer, progress: bool = True) -> Path:
        raise NotImplementedError

    def count(self, cfg: AliaConfig, manifest: dict[str, Any] | None, train_tokens: int | None) -> Counts:
        raise NotImplementedError

    def load(self, cfg: AliaConfig, stage: ResolvedStage, tokenizer) -> Prepared:
        raise NotImplementedError

    def print_plan(self, plan: dict[str, Any]) -> None:
        import json

        print(json.dumps(plan, indent=2))

    def print_prepared(self, cfg: AliaConfig, directory: Path, manifest: dict[str, Any]) -> None:
        raise NotImplementedError


class MessagesJsonl(DataSource):
    """Conversations straight from messages-JSONL files, tokenised at train time (the quick path, no cache)."""

    format, unit, stage_kind, cached = "messages_jsonl", "conversations", "sft", False

    def _refuse(self, cfg: AliaConfig, what: str) -> ConfigError:
        return ConfigError(
            f"{what} needs prepared data; data={cfg.data.name} is format messages_jsonl, which `train` on the local "
            "engine tokenises directly. Put the files into a mixture through the `messages` adapter (data.format="
            "mixture, e.g. data=sample) to prepare or compile them"
        )

    def plan(self, cfg: AliaConfig, stage: ResolvedStage) -> dict[str, Any]:
        raise self._refuse(cfg, "alia-nemo prepare")

    def prepare(self, cfg: AliaConfig, stage: ResolvedStage, tokenizer, progress: bool = True) -> Path:
        raise self._refuse(cfg, "alia-nemo prepare / compile")

    def count(self, cfg: AliaConfig, manifest: dict[str, Any] | None, train_tokens: int | None) -> Counts:
        if manifest is None:
            return Counts(None, 0, "plain JSONL: counted when train reads it")
        return Counts(manifest["train"], manifest["val"], "conversations read and tokenised")

    def load(self, cfg: AliaConfig, stage: ResolvedStage, tokenizer) -> Prepared:
        from alia_nemo.data.loading import prepare_sft

        data = prepare_sft(cfg.data, tokenizer, stage.max_tokens, cfg.run.seed)  # type: ignore[arg-type]
        return Prepared(data.train, data.val, data.report, data.report)


class Mixture(DataSource):
    """A weighted SFT mixture: exact counts per dataset and language, prepared once into the cache."""

    format, unit, stage_kind, cached = "mixture", "conversations", "sft", True

    def max_tokens(self, cfg: AliaConfig) -> int:
        """data.max_tokens, never more than stage.seq_length (what prepare, train and compile all use)."""
        return min(cfg.data.max_tokens or cfg.stage.seq_length, cfg.stage.seq_length)  # type: ignore[union-attr]

    def plan(self, cfg: AliaConfig, stage: ResolvedStage) -> dict[str, Any]:
        from alia_nemo.data.mixture import plan

        return plan(cfg.data)  # type: ignore[arg-type]

    def prepare(self, cfg: AliaConfig, stage: ResolvedStage, tokenizer, progress: bool = True) -> Path:
        from alia_nemo.data.mixture import prepare_mixture
        from alia_nemo.data.workers import cluster_address

        return prepare_mixture(cfg.data, tokenizer, stage.max_tokens, cfg.run.seed, progress=progress,  # type: ignore[arg-type]
                               address=cluster_address(cfg))  # fmt: skip

    def count(self, cfg: AliaConfig, manifest: dict[str, Any] | None, train_tokens: int | None) -> Counts:
        from alia_nemo.config.resolve import validation_count
        from alia_nemo.data.mixture import active_datasets

        if manifest is not None:
            totals = manifest["totals"]
            train = totals.get("selected", 0) + totals.get("repeated", 0)
            return Counts(train, totals.get("val", 0), f"prepared mixture {manifest['name']}-{manifest['key'][:16]}")
        datasets = active_datasets(cfg.data).values()  # type: ignore[arg-type]
        requested = sum(n for d in datasets for n in d.counts.values())
        val = sum(validation_count(n, cfg.data.val_fraction) for d in datasets for n in d.counts.values())  # type: ignore[union-attr]
        return Counts(requested, val, "requested by the config, not yet prepared")

    def load(self, cfg: AliaConfig, stage: ResolvedStage, tokenizer) -> Prepared:
        from alia_nemo.data.mixture import load_prepared

        directory = self.prepare(cfg, stage, tokenizer)
        train, val, manifest = load_prepared(directory)
        report = {"prepared": str(directory), "train": len(train), "val": len(val), **manifest["totals"]}
        return Prepared(train, val, report, manifest)

    def print_plan(self, plan: dict[str, Any]) -> None:
        from alia_nemo.data.report import print_mixture_plan

        print_mixture_plan(plan)

    def print_prepared(self, cfg: AliaConfig, directory: Path, manifest: dict[str, Any]) -> None:
        from alia_nemo.data.report import print_mixture_manifest

        print_mixture_manifest(manifest)
        print(f"[alia-nemo] prepared mixture: {directory}")


class TextCorpus(DataSource):
    """A token-packed plain-text corpus for continued pretraining: windows of exactly stage.seq_length."""

    format, unit, stage_kind, cached = "text_corpus", "windows", "cpt", True

    def train_tokens(self, cfg: AliaConfig, step_cap: int | None, tokens_per_step: int) -> int | None:
        """data.max_tokens, else every step's full windows (None without a budget or a step cap)."""
        return cfg.data.max_tokens or (step_cap * tokens_per_step if step_cap else None)  # type: ignore[union-attr]

    def _tokens(self, cfg: AliaConfig, stage: ResolvedStage) -> int:
        if stage.train_tokens is None:
            raise ConfigError(
                "a CPT stage needs stage.token_budget or stage.max_steps (or data.max_tokens) to know how much to pack"
            )
        return stage.train_tokens

    def plan(self, cfg: AliaConfig, stage: ResolvedStage) -> dict[str, Any]:
        from alia_nemo.data.corpus import missing_patterns, quotas

        tokens = self._tokens(cfg, stage)
        corpus = cfg.data
        return {
            "name": corpus.name,
            "seq_length": stage.seq_length,
            "train_tokens": tokens,
            "val_windows": corpus.val_windows,  # type: ignore[union-attr]
            "quotas": quotas(corpus, tokens + corpus.val_windows * stage.seq_length),  # type: ignore[arg-type, union-attr]
            "sources": {n: s.model_dump(mode="json") for n, s in corpus.sources.items()},  # type: ignore[union-attr]
            "missing_files": missing_patterns(corpus),  # type: ignore[arg-type]
        }

    def prepare(self, cfg: AliaConfig, stage: ResolvedStage, tokenizer, progress: bool = True) -> Path:
        from alia_nemo.data.packing import prepare_corpus
        from alia_nemo.data.workers import cluster_address

        tokens = self._tokens(cfg, stage)
        return prepare_corpus(cfg.data, tokenizer, stage.seq_length, tokens, cfg.run.seed, progress=progress,  # type: ignore[arg-type]
                              address=cluster_address(cfg))  # fmt: skip

    def count(self, cfg: AliaConfig, manifest: dict[str, Any] | None, train_tokens: int | None) -> Counts:
        if manifest is not None:
            where = f"packed corpus {manifest['name']}-{manifest['seq_length']}-{manifest['key'][:16]}"
            return Counts(manifest["train_windows"], manifest["val_windows"], where)
        windows = -(-train_tokens // cfg.stage.seq_length) if train_tokens else None
        return Counts(windows, cfg.data.val_windows, "token budget (corpus not packed)")  # type: ignore[union-attr]

    def load(self, cfg: AliaConfig, stage: ResolvedStage, tokenizer) -> Prepared:
        from alia_nemo.data.packing import load_packed

        directory = self.prepare(cfg, stage, tokenizer)
        train, val, manifest = load_packed(directory)
        report = {
            "prepared": str(directory),
            "train": len(train),
            "val": len(val),
            "shortfall_windows": manifest["shortfall_windows"],
            "packing": manifest["packing"],
            "sources": manifest["sources"],
        }
        return Prepared(train, val, report, manifest)

    def print_plan(self, plan: dict[str, Any]) -> None:
        from alia_nemo.data.report import print_corpus_plan

        print_corpus_plan(plan)

    def print_prepared(self, cfg: AliaConfig, directory: Path, manifest: dict[str, Any]) -> None:
        from alia_nemo.data.report import print_corpus_manifest

        print_corpus_manifest(cfg.data.tail, cfg.stage.seq_length, manifest)  # type: ignore[union-attr]
        print(f"[alia-nemo] prepared corpus: {directory}")


class Preference(DataSource):
    """Preference pairs for a DPO stage: exact counts per dataset and language, prepared once into the cache."""

    format, unit, stage_kind, cached = "preference", "pairs", "dpo", True

    def max_tokens(self, cfg: AliaConfig) -> int:
        """data.max_tokens, never more than stage.seq_length: the longest chosen or rejected sequence kept."""
        return min(cfg.data.max_tokens or cfg.stage.seq_length, cfg.stage.seq_length)  # type: ignore[union-attr]

    def plan(self, cfg: AliaConfig, stage: ResolvedStage) -> dict[str, Any]:
        from alia_nemo.data.preference import plan

        return {**plan(cfg.data), "max_tokens": stage.max_tokens, "seed": cfg.run.seed}  # type: ignore[arg-type]

    def prepare(self, cfg: AliaConfig, stage: ResolvedStage, tokenizer, progress: bool = True) -> Path:
        from alia_nemo.data.preference import prepare_preferences

        return prepare_preferences(cfg.data, tokenizer, stage.max_tokens, cfg.run.seed, progress=progress)  # type: ignore[arg-type]

    def count(self, cfg: AliaConfig, manifest: dict[str, Any] | None, train_tokens: int | None) -> Counts:
        from alia_nemo.config.resolve import validation_count
        from alia_nemo.data.preference import active_datasets

        if manifest is not None:
            totals = manifest["totals"]
            train = totals.get("selected", 0) + totals.get("repeated", 0)
            where = f"prepared preference set {manifest['name']}-{manifest['key'][:16]}"
            return Counts(train, totals.get("val", 0), where)
        datasets = active_datasets(cfg.data).values()  # type: ignore[arg-type]
        requested = sum(n for d in datasets for n in d.counts.values())
        val = sum(validation_count(n, cfg.data.val_fraction) for d in datasets for n in d.counts.values())  # type: ignore[union-attr]
        return Counts(requested, val, "requested by the config, not yet prepared")

    def load(self, cfg: AliaConfig, stage: ResolvedStage, tokenizer) -> Prepared:
        from alia_nemo.data.preference import load_prepared_preferences

        directory = self.prepare(cfg, stage, tokenizer)
        train, val, manifest = load_prepared_preferences(directory)
        report = {"prepared": str(directory), "train": len(train), "val": len(val), **manifest["totals"]}
        return Prepared(train, val, report, manifest)  # type: ignore[arg-type]

    def print_plan(self, plan: dict[str, Any]) -> None:
        from alia_nemo.data.preference import print_preference_plan

        print_preference_plan(plan)

    def print_prepared(self, cfg: AliaConfig, directory: Path, manifest: dict[str, Any]) -> None:
        from alia_nemo.data.preference import print_preference_manifest

        print_preference_manifest(manifest)
        print(f"[alia-nemo] prepared preference set: {directory}")


SOURCES: dict[str, DataSource] = {s.format: s for s in (MessagesJsonl(), Mixture(), TextCorpus(), Preference())}


def source_for(data: Any) -> DataSource:
    """The source registered for ``data.format``."""
    try:
        return SOURCES[data.format]
    except KeyError:
        raise ConfigError(f"data.format={data.format!r} has no data source; choose one of {sorted(SOURCES)}") from None


def load_for_training(cfg: AliaConfig, tokenizer) -> tuple[Prepared, ResolvedStage]:
    """The stage's rows (prepared or found in the cache first) and the stage resolved from what was read."""
    from alia_nemo.config.resolve import resolve

    data = source_for(cfg.data).load(cfg, resolve(cfg), tokenizer)
    return data, resolve(cfg, data.manifest)
