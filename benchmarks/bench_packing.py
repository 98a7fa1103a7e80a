"""Throughput and memory of token packing (``alia_nemo.data.packing.pack_windows``) and its Parquet writer.

A synthetic corpus is generated lazily (one document at a time, never materialised): document lengths
are lognormal with a mean of ~1,500 tokens, clipped to [16, 200,000]; token ids are uniform int32 in
[6, 256,000) and every document ends with an EOS id (2), as the packer expects. Each document is
yielded as ``(source, ids)`` with the source drawn from three names, so window ``sources`` are filled.
The stream is packed into windows of ``--seq-length`` tokens and, with ``--write`` (default), every
window goes through ``ShardWriter`` into Parquet shards in a temporary directory (deleted afterwards),
which is what ``alia-nemo prepare`` does for a CPT corpus.

Each corpus size runs in a fresh child process (this script re-invoked with a hidden ``--child``
flag), so its memory is its own. The child reads its RSS after the imports (the baseline, pyarrow
included) and its peak RSS at the end (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, KiB on Linux).

Per size: tokens, windows, seconds (total, of which generating the synthetic documents and writing
Parquet), tokens/s of packing (+ writing) with generation time taken out, real-token fraction
(``PackReport.summary()``), dropped/padded tail tokens, peak RSS and its growth over the baseline.

Targets:
  real-token fraction >= 99.99% at every size (with ``--tail drop`` no padding is emitted, so this is
            1.0 by construction; the dropped tail is printed next to it)
  flat memory: max peak RSS - min peak RSS across sizes < 15% of the min peak (the writer flushes every
            ~4M tokens, WRITE_BATCH_TOKENS, so memory must not grow with the corpus)

    .venv/bin/python benchmarks/bench_packing.py [--sizes 10e6,50e6,100e6] [--seq-length 32768]
        [--tail drop|pad] [--write|--no-write] [--seed 0] [--json OUT]

Always exits 0 (a benchmark, not a test); PASS/FAIL is printed per target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REAL_FRACTION_TARGET = 0.9999
FLAT_MEMORY_TARGET = 0.15  # (max peak - min peak) / min peak

MEAN_DOC_TOKENS = 1_500
DOC_SIGMA = 1.0  # lognormal shape of document lengths
MIN_DOC, MAX_DOC = 16, 200_000
LOW_ID, HIGH_ID = 6, 256_000
EOS_ID = 2
SOURCES = ("ca", "es", "en")


def rss_kib() -> int:
    """Current resident set size of this process, KiB (Linux ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def synthetic_docs(total_tokens: int, seed: int, timer: list[float]) -> Iterator[tuple[str, Any]]:
    """``(source, ids)`` documents, lazily, until exactly ``total_tokens`` tokens; generation time -> ``timer[0]``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mu = np.log(MEAN_DOC_TOKENS) - DOC_SIGMA**2 / 2  # lognormal mean = exp(mu + sigma^2 / 2)
    left = total_tokens
    while left > 0:
        t0 = time.perf_counter()
        n = int(np.clip(rng.lognormal(mu, DOC_SIGMA), MIN_DOC, MAX_DOC))
        n = min(n, left)
        ids = rng.integers(LOW_ID, HIGH_ID, size=n, dtype=np.int32)
        ids[-1] = EOS_ID
        source = SOURCES[int(rng.integers(len(SOURCES)))]
        left -= n
        timer[0] += time.perf_counter() - t0
        yield source, ids


def child(size: int, seq_length: int, tail: str, write: bool, seed: int) -> dict[str, Any]:
    """Pack (and write) one corpus of ``size`` tokens in this process; figures as a dict."""
    import numpy as np  # noqa: F401  (imported before the baseline, like everything the run uses)
    import pyarrow.parquet  # noqa: F401

    from alia_nemo.data.packing import WRITE_BATCH_TOKENS, PackReport, ShardWriter, pack_windows

    baseline = rss_kib()
    baseline_peak = peak_rss_kib()
    gen = [0.0]
    write_s = 0.0
    report = PackReport(seq_length, tail)
    shards, bytes_on_disk, docs_ok = 0, 0, True
    with tempfile.TemporaryDirectory(prefix="bench_packing_") as tmp:
        writer = ShardWriter(Path(tmp), "train", seq_length) if write else None
        start = time.perf_counter()
        for w in pack_windows(synthetic_docs(size, seed, gen), seq_length, report, tail=tail):
            docs_ok &= len(w.input_ids) == seq_length and w.doc_starts[0] == 0
            if writer is not None:
                t0 = time.perf_counter()
                writer.add(w)
                write_s += time.perf_counter() - t0
        if writer is not None:
            t0 = time.perf_counter()
            writer.flush()
            write_s += time.perf_counter() - t0
            shards = len(writer.files)
            bytes_on_disk = sum(f.stat().st_size for f in Path(tmp).iterdir())
        seconds = time.perf_counter() - start
    summary = report.summary()
    full = summary["windows"] - (1 if tail == "pad" and summary["tail_tokens"] else 0)
    conserved = full * seq_length + summary["tail_tokens"] == summary["stream_tokens"] == size
    return {
        "size": size,
        **summary,
        "seconds": seconds,
        "gen_seconds": gen[0],
        "write_seconds": write_s,
        "pack_seconds": seconds - gen[0],  # packing + writing, synthetic generation taken out
        "tokens_per_s": size / (seconds - gen[0]),
        "tokens_conserved": conserved and docs_ok,
        "shards": shards,
        "parquet_bytes": bytes_on_disk,
        "write_batch_tokens": WRITE_BATCH_TOKENS,
        "baseline_rss_kib": baseline,
        "baseline_peak_kib": baseline_peak,
        "peak_rss_kib": peak_rss_kib(),
        "vm_hwm_kib": _vm_hwm_kib(),
    }


def _vm_hwm_kib() -> int:
    """Peak RSS of this address space (``VmHWM``), a cross-check of ``ru_maxrss``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run_child(size: int, args: argparse.Namespace) -> dict[str, Any]:
    """This script again, in a fresh interpreter, for one size; its last stdout line is the figures' JSON."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(size),
        "--seq-length",
        str(args.seq_length),
        "--tail",
        args.tail,
        "--seed",
        str(args.seed),
        "--write" if args.write else "--no-write",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"size": size, "error": (proc.stderr or proc.stdout).strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def mib(kib: float) -> float:
    return kib / 1024


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10e6,50e6,100e6", help="corpus sizes in tokens (default 10e6,50e6,100e6)")
    parser.add_argument("--seq-length", type=int, default=32768)
    parser.add_argument("--tail", choices=("drop", "pad"), default="drop")
    parser.add_argument(
        "--write", action=argparse.BooleanOptionalAction, default=True, help="also write Parquet shards"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures and machine info here")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one size, in this process
    args = parser.parse_args(argv)

    if args.child is not None:
        print(json.dumps(child(args.child, args.seq_length, args.tail, args.write, args.seed)))
        return 0

    sizes = parse_sizes(args.sizes)
    machine = f"{os.cpu_count()}-core {platform.machine()}, Python {platform.python_version()}"
    python = Path(sys.executable)
    python = python.relative_to(Path.cwd()) if python.is_relative_to(Path.cwd()) else python
    command = " ".join(shlex.quote(str(a)) for a in [python, Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    print(f"# bench_packing {time.strftime('%Y-%m-%d %H:%M:%S %Z')} | machine: {machine} | command: {command}")
    print(
        f"seq_length {args.seq_length}, tail {args.tail}, write {'on' if args.write else 'off'}, seed {args.seed}; "
        f"documents lognormal mean ~{MEAN_DOC_TOKENS} tokens in [{MIN_DOC}, {MAX_DOC:,}], ids in [{LOW_ID}, {HIGH_ID})"
    )
    print(
        "one fresh process per size; seconds = total, gen = synthetic documents, write = Parquet; Mtok/s excludes gen\n"
    )

    rows: list[dict[str, Any]] = []
    for size in sizes:
        r = run_child(size, args)
        rows.append(r)
        if "error" in r:
            print(f"size {size:,}: child failed:\n{r['error']}\n", flush=True)

    header = (
        f"{'tokens':>13}{'windows':>9}{'seconds':>9}{'gen s':>7}{'write s':>9}{'Mtok/s':>8}"
        f"{'real frac':>11}{'tail tok':>10}{'base MiB':>10}{'peak MiB':>10}{'growth MiB':>12}"
    )
    print(header)
    good = [r for r in rows if "error" not in r]
    for r in good:
        print(
            f"{r['stream_tokens']:>13,}{r['windows']:>9,}{r['seconds']:>9.1f}{r['gen_seconds']:>7.1f}"
            f"{r['write_seconds']:>9.1f}{r['tokens_per_s'] / 1e6:>8.1f}{r['real_token_fraction']:>11.6f}"
            f"{r['tail_tokens']:>10,}{mib(r['baseline_rss_kib']):>10.0f}{mib(r['peak_rss_kib']):>10.0f}"
            f"{mib(r['peak_rss_kib'] - r['baseline_rss_kib']):>12.0f}"
        )
    for r in good:
        extra = f", {r['shards']} shards, {r['parquet_bytes'] / 2**20:,.0f} MiB Parquet" if args.write else ""
        print(
            f"  {r['size']:,}: {r['documents']:,} documents{extra}; tokens conserved: {r['tokens_conserved']}; "
            f"VmHWM {mib(r['vm_hwm_kib']):.0f} MiB"
        )

    print()
    real_ok = (
        bool(good) and len(good) == len(rows) and all(r["real_token_fraction"] >= REAL_FRACTION_TARGET for r in good)
    )
    worst = min((r["real_token_fraction"] for r in good), default=0.0)
    print(
        f"{'PASS' if real_ok else 'FAIL'} real-token fraction >= {REAL_FRACTION_TARGET:.2%} at every size "
        f"(lowest {worst:.6f})"
    )
    peaks = [r["peak_rss_kib"] for r in good]
    if len(peaks) >= 2:
        spread = max(peaks) - min(peaks)
        flat_ok = spread < FLAT_MEMORY_TARGET * min(peaks)
        print(
            f"{'PASS' if flat_ok else 'FAIL'} flat peak memory: max {mib(max(peaks)):.0f} MiB - min "
            f"{mib(min(peaks)):.0f} MiB = {mib(spread):.0f} MiB = {spread / min(peaks):.1%} of min "
            f"(target < {FLAT_MEMORY_TARGET:.0%})"
        )
        batch = good[0]["write_batch_tokens"]
        full = [r["peak_rss_kib"] for r in good if r["size"] >= batch]
        if args.write and len(full) < len(peaks):
            # Informational: a corpus under one write batch never buffers a full batch, so its peak is lower.
            note = f"{(max(full) - min(full)) / min(full):.1%} of min" if len(full) >= 2 else "fewer than two sizes"
            print(f"  (sizes >= one write batch of {batch:,} tokens only: spread {note}; not part of the verdict)")
    else:
        flat_ok = False
        print("FAIL flat peak memory: needs at least two sizes that ran")
    print(f"verdict: {'PASS' if real_ok and flat_ok else 'FAIL'}")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": "packing",
            "machine": machine,
            "command": command,
            "seq_length": args.seq_length,
            "tail": args.tail,
            "write": args.write,
            "seed": args.seed,
            "runs": rows,
            "real_fraction_target_met": real_ok,
            "flat_memory_target_met": flat_ok,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
