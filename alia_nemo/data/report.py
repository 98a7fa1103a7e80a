"""Human-readable reports of data plans and prepared manifests (``alia-nemo prepare``)."""

from __future__ import annotations

from alia_nemo.config.schema import LANGUAGES


def console():
    """A rich console; pipes and logs get the whole table (160 columns), not a terminal's width."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)  # pipes and logs get the whole table


def print_mixture_plan(p: dict) -> None:
    """The dry-run plan of a mixture as a table: conversations per dataset and language."""
    from rich.table import Table

    langs = list(LANGUAGES)
    table = Table(title=f"mixture {p['name']}: {p['total']:,} conversations (dry run, nothing read)")
    for col in ("dataset", *langs, "total", "licence"):
        table.add_column(col, justify="right" if col in langs or col == "total" else "left")
    for name, d in p["datasets"].items():
        note = " (excluded)" if d["excluded_by_licence"] else (" (MISSING)" if d["missing_files"] else "")
        table.add_row(name + note, *[f"{d['counts'].get(lang, ''):,}" if lang in d["counts"] else "" for lang in langs],
                      f"{d['total']:,}", d["licence"])  # fmt: skip
    table.add_row("total", *[f"{p['languages'].get(lang, 0):,}" for lang in langs], f"{p['total']:,}", "")
    console().print(table)


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
