"""Human-readable reports of data plans and prepared manifests (``alia-nemo prepare``)."""

from __future__ import annotations

from alia_nemo.config.schema import LANGUAGES


def console():
    """A rich console; pipes and logs get the whole table (160 columns), not a terminal's width."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)  # pipes and logs get the whole table


MISSING_NOTE = " (not found)"  # after a file of the "from" column that is not there
HUB_CONFIGS_SHOWN = 3  # a hub set read in many configs (FLORES: one per language) shows the first few


def origin_text(origin: dict, missing: list[str]) -> str:
    """Where a dataset's rows come from, for a plan's ``from`` column: each local file (one per line, the missing
    ones marked), or the hub id with its configs and a split other than ``train``."""
    if origin.get("files"):
        return "\n".join(f + (MISSING_NOTE if f in missing else "") for f in origin["files"])
    text = f"hub {origin.get('path')}"
    configs = origin.get("configs") or ([origin["name"]] if origin.get("name") else [])
    if configs:
        more = len(configs) - HUB_CONFIGS_SHOWN
        text += f" ({', '.join(configs[:HUB_CONFIGS_SHOWN])}{f' +{more} more' if more > 0 else ''})"
    if origin.get("split", "train") != "train":
        text += f" split {origin['split']}"
    return text


def plan_label(name: str, d: dict) -> str:
    """A plan row's dataset name with its mark: (excluded) by licence, or (MISSING) files (see the legend)."""
    return name + (" (excluded)" if d["excluded_by_licence"] else " (MISSING)" if d["missing_files"] else "")


def print_plan_legend(p: dict, unit: str) -> None:
    """The lines under a mixture's or preference set's plan that say what its marks mean and how to clear them."""
    datasets = p["datasets"].values()
    missing = {
        n: d["missing_files"] for n, d in p["datasets"].items() if d["missing_files"] and not d["excluded_by_licence"]
    }
    if missing:
        allowed = "; it is set, so prepare builds without them" if p.get("allow_missing_internal") else ""
        lines = [
            f"MISSING: {len(missing)} dataset(s) read local files that are not at the paths shown "
            f"(marked{MISSING_NOTE}):",
            # Listed whole here too: a narrow table folds long paths, and these are the paths to copy or create.
            *[f"  {name}: {', '.join(paths)}" for name, paths in missing.items()],
            "  The internal sets are your own messages-JSONL / Parquet files, looked for under data.internal_dir "
            f"({p.get('internal_dir')}).",
            "  Fix: data.internal_dir=DIR where they are (or set the dataset's origin.files), or "
            "data.allow_missing_internal=true",
            f"  to build without them (their shortfall is recorded in the manifest){allowed}.",
        ]
        print("\n".join(lines))
    if any(d["excluded_by_licence"] for d in datasets):
        print(f"(excluded): the dataset's licence is in data.exclude_licenses; its {unit} are not in the totals.")


def print_mixture_plan(p: dict) -> None:
    """The dry-run plan of a mixture as a table: conversations per dataset and language, and where each comes from;
    a legend below says what MISSING and (excluded) mean and how to fix them."""
    from rich.table import Table

    langs = list(LANGUAGES)
    table = Table(title=f"mixture {p['name']}: {p['total']:,} conversations (dry run, nothing read)")
    for col in ("dataset", *langs, "total", "licence"):
        table.add_column(col, justify="right" if col in langs or col == "total" else "left")
    table.add_column("from", overflow="fold")
    for name, d in p["datasets"].items():
        table.add_row(plan_label(name, d),
                      *[f"{d['counts'].get(lang, ''):,}" if lang in d["counts"] else "" for lang in langs],
                      f"{d['total']:,}", d["licence"], origin_text(d["origin"], d["missing_files"]))  # fmt: skip
    table.add_row("total", *[f"{p['languages'].get(lang, 0):,}" for lang in langs], f"{p['total']:,}", "", "")
    console().print(table)
    print_plan_legend(p, "conversations")


def print_corpus_plan(p: dict) -> None:
    """The dry-run plan of a CPT corpus as a table: per source its language, weight, token quota and files or hub
    id (patterns that match no file marked MISSING, explained below the table)."""
    from rich.table import Table

    missing = p.get("missing_files", {})
    table = Table(
        title=f"corpus {p['name']}: {p['train_tokens']:,} training tokens in {p['seq_length']:,}-token windows + "
        f"{p['val_windows']:,} validation windows (dry run, nothing read)"
    )
    for col in ("source", "language", "weight", "token quota", "text field"):  # quota: training + validation
        table.add_column(col, justify="right" if col in ("weight", "token quota") else "left")
    table.add_column("from", overflow="fold")
    for name, src in p["sources"].items():
        table.add_row(name + (" (MISSING)" if name in missing else ""), src.get("language") or "mixed",
                      f"{src['weight']:g}", f"{p['quotas'].get(name, 0):,}", src.get("text_field", "text"),
                      origin_text(src, missing.get(name, [])))  # fmt: skip
    table.add_row("total", "", "", f"{sum(p['quotas'].values()):,}", "", "")
    console().print(table)
    if missing:
        lines = [
            f"MISSING: {len(missing)} source(s) name files or glob patterns that match no file (marked{MISSING_NOTE}):",
            *[f"  {name}: {', '.join(paths)}" for name, paths in missing.items()],
            "  Fix: data.sources.NAME.files=[PATH or pattern] pointing at your plain-text files (.jsonl, .parquet, "
            ".arrow),",
            "  or the environment variable the path is built from (long_context: ALIA_NEMO_CPT_DATA).",
        ]
        print("\n".join(lines))


def print_mixture_manifest(m: dict) -> None:
    """A prepared mixture's manifest as a table: requested, selected, dropped and token lengths per dataset."""
    from rich.table import Table

    table = Table(title=f"prepared {m['name']} ({m['seconds']} s)")
    keys = ("requested", "selected", "repeated", "shortfall", "val", "val_shortfall")
    for col in ("dataset", *keys, "dropped", "tokens p50/p95/max"):
        table.add_column(col, justify="left" if col == "dataset" else "right")
    for name, r in m["datasets"].items():
        langs = r.get("languages", {}).values()
        tot = {k: sum(s.get(k, 0) for s in langs) for k in keys}
        dropped = sum(sum(s.get("dropped", {}).values()) for s in langs) + sum(r.get("adapter_drops", {}).values())
        tk = r.get("tokens", {})
        toks = f"{tk.get('p50', '-')}/{tk.get('p95', '-')}/{tk.get('max', '-')}" if tk.get("count") else "-"
        label = name + (" (excluded)" if "excluded_by_licence" in r else " (missing)" if "missing_files" in r else "")
        table.add_row(label, *[f"{tot[k]:,}" for k in tot], f"{dropped:,}", toks)
    t = m["totals"]
    table.add_row("total", *[f"{t.get(k, 0):,}" for k in keys],
                  f"{t.get('dropped', 0) + t.get('adapter_drops', 0):,}", "")  # fmt: skip
    console().print(table)


def print_corpus_manifest(tail: str, seq_length: int, manifest: dict) -> None:
    """A packed corpus' manifest in a few lines: documents, windows, tail, real-token share, per source."""
    pk = manifest["packing"]
    print(
        f"[alia-nemo] packed {pk['documents']:,} documents ({pk['stream_tokens']:,} tokens) into "
        f"{manifest['train_windows']:,} training + {manifest['val_windows']:,} validation windows of "
        f"{seq_length:,} tokens; tail {pk['tail_tokens']:,} tokens ({tail}); real tokens "
        f"{pk['real_token_fraction']:.4%}"
    )
    for name, src in manifest["sources"].items():
        print(f"[alia-nemo]   {name}: {src['documents']:,} documents, {src['tokens']:,} tokens, "
              f"{src['passes']} full passes, dropped {src['dropped'] or 0}")  # fmt: skip
