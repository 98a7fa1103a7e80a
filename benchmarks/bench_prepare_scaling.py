"""How ``prepare`` scales with workers, and what that means for the card's data on a cluster.

Two workloads, each prepared from scratch in a fresh process with ``data.workers`` = 1 (in-process, one tokenizer
thread) and then 2, 4, ... (local worker processes), side by side in one run:

- ``mixture``: the synthetic stand-in of the card's 20-source SFT mixture (``tests.source_fixtures``) at ``--scale``
  of the card's counts: read, convert, check, deduplicate, tokenise with masks, select, write;
- ``corpus``: a plain-text CPT corpus generated in code (multilingual placeholder documents of 200-8,000 words,
  three weighted sources), tokenised and packed into 4,096-token windows.

For each run: wall time, tokens/s (tokens written), tokens/s per worker, the CPU seconds of the main process
(reading, selection, packing, writing: serial) and of the workers (checks, hashing, tokenising: parallel).

Projection. The main process and the workers overlap (the workers run ahead), so a run takes about
``max(serial CPU, parallel CPU / workers)`` seconds. With the per-token CPU costs measured here, the projected
wall time for ``W`` workers is ``tokens x max(serial s/token, parallel s/token / W)``. It is given for the card's
CPT corpora (2B + 36.8B = 38.8B tokens) and its SFT mixture (712,213 conversations) on one 64-core node
(63 workers) and on 16 such nodes (Ray actors on 1,024 cores; the main process stays one). The speedup actually
measured from 1 to 2 workers on this 2-core machine is reported next to it.

    python benchmarks/bench_prepare_scaling.py --workers 1 2 --json benchmarks/results/prepare_scaling_cpu2.json

The tokenizer is the built-in 1,024-piece test tokenizer (more tokens per word than ALIA's 256k vocabulary, so
tokens/s here are a lower bound on per-token cost for real text).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CPT_TOKENS = 2_000_000_000 + 36_800_000_000
CARD_CONVERSATIONS = 712_213
NODE_CORES = 64
NODES = 16

CHILD = """
import json, random, resource, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from alia_nemo.model.tokenizer import build_test_tokenizer

def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime

def mixture(root, prepared, scale, workers, tok):
    from tests.source_fixtures import synthetic_mixture
    from alia_nemo.data.mixture import prepare_mixture
    mix = synthetic_mixture(root, scale, prepared_root=prepared)
    out = prepare_mixture(mix, tok, 32_768, seed=0, progress=False, workers=workers)
    m = json.loads((out / "manifest.json").read_text())
    tokens = sum(r.get("tokens", {{}}).get("total", 0) for r in m["datasets"].values())
    return tokens, m["totals"]["selected"] + m["totals"]["repeated"]

def corpus(root, prepared, tokens, workers, tok):
    from alia_nemo.config.schema import TextCorpusConfig
    from alia_nemo.data.packing import prepare_corpus
    sources = {{}}
    for name, weight in (("ca", 3.0), ("es", 2.0), ("en", 1.0)):
        sources[name] = {{"kind": "local", "files": [str(Path(root) / f"corpus-{{name}}.jsonl")], "weight": weight}}
    cfg = TextCorpusConfig.model_validate({{"name": "bench", "format": "text_corpus", "prepared_root": prepared,
                                           "sources": sources, "on_shortfall": "take_all"}})
    out = prepare_corpus(cfg, tok, 4096, tokens, seed=0, progress=False, workers=workers)
    m = json.loads((out / "manifest.json").read_text())
    return m["train_windows"] * 4096, m["train_windows"]

if __name__ == "__main__":
    tok = build_test_tokenizer()
    before = cpu()
    start = time.time()
    tokens, rows = {workload}({root!r}, {prepared!r}, {size!r}, {workers!r}, tok)
    seconds = time.time() - start
    after = cpu()
    print(json.dumps({{"seconds": seconds, "tokens": tokens, "rows": rows,
                      "main_cpu_s": after[0] - before[0], "workers_cpu_s": after[1] - before[1]}}))
"""


def write_corpus(root: Path, documents: int) -> None:
    """Three JSONL sources of placeholder documents (reused when present)."""
    import random

    sys.path.insert(0, str(REPO))
    from tests.source_fixtures import VOCABULARY

    for name in ("ca", "es", "en"):
        path = root / f"corpus-{name}.jsonl"
        if path.is_file():
            continue
        rng = random.Random(name)
        words = VOCABULARY[name]
        with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as f:
            for _ in range(documents):
                text = " ".join(rng.choices(words, k=rng.randint(200, 8000)))
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        path.with_suffix(".tmp").rename(path)


def run(workload: str, root: Path, size: float | int, workers: int) -> dict[str, Any]:
    """One prepare in a fresh process; its measurements."""
    prepared = root / f"prepared-{workload}-w{workers}-{os.getpid()}-{time.time_ns()}"
    code = CHILD.format(repo=str(REPO), workload=workload, root=str(root), prepared=str(prepared), size=size,
                        workers=workers)  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if workers == 1:
        env["TOKENIZERS_PARALLELISM"] = "false"  # one worker = one core, like each worker process
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(REPO))
    shutil.rmtree(prepared, ignore_errors=True)  # this run's own output
    if proc.returncode != 0:
        raise SystemExit(f"{workload} with {workers} worker(s) failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    tokens = r["tokens"]
    return {
        "workers": workers,
        "seconds": round(r["seconds"], 1),
        "tokens": tokens,
        "rows": r["rows"],
        "tokens_per_s": round(tokens / r["seconds"]),
        "tokens_per_s_per_worker": round(tokens / r["seconds"] / workers),
        "main_cpu_s": round(r["main_cpu_s"], 1),
        "workers_cpu_s": round(r["workers_cpu_s"], 1),
    }


def project(parallel_runs: list[dict[str, Any]], total_tokens: float) -> dict[str, Any]:
    """Projected wall time for ``total_tokens`` on one 64-core node and on 16 nodes, from the per-token CPU costs
    of the parallel runs (the serial main process bounds it)."""
    best = max(parallel_runs, key=lambda r: r["workers"])
    serial = best["main_cpu_s"] / best["tokens"]
    parallel = best["workers_cpu_s"] / best["tokens"]
    out: dict[str, Any] = {
        "serial_cpu_ms_per_1m_tokens": round(serial * 1e9, 1),
        "parallel_cpu_ms_per_1m_tokens": round(parallel * 1e9, 1),
    }
    for label, workers in (("one_64_core_node", NODE_CORES - 1), ("16_nodes", NODES * NODE_CORES - 1)):
        seconds = total_tokens * max(serial, parallel / workers)
        out[label] = {"workers": workers, "hours": round(seconds / 3600, 2),
                      "bound_by": "main process (serial)" if serial >= parallel / workers else "workers"}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--scale", type=float, default=0.03, help="share of the card's mixture counts")
    ap.add_argument("--corpus-tokens", type=int, default=30_000_000, help="CPT tokens to pack")
    ap.add_argument("--root", type=Path, default=Path("~/.cache/alia-nemo/bench-standin").expanduser())
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from tests.source_fixtures import synthetic_mixture

    synthetic_mixture(args.root, args.scale)  # the stand-in's files, written once
    write_corpus(args.root, documents=max(200, args.corpus_tokens // 15_000))  # ~10k tokens each, 1.5x the need
    results: dict[str, Any] = {}
    for workload, size in (("mixture", args.scale), ("corpus", args.corpus_tokens)):
        runs = []
        for workers in args.workers:
            r = run(workload, args.root, size, workers)
            runs.append(r)
            print(f"{workload:>8} workers {workers}: {r['seconds']:>7.1f} s  {r['tokens_per_s']:>11,} tok/s  "
                  f"{r['tokens_per_s_per_worker']:>11,} tok/s/worker  main CPU {r['main_cpu_s']} s, workers CPU "
                  f"{r['workers_cpu_s']} s", flush=True)  # fmt: skip
        base = runs[0]["tokens_per_s"]
        total = CPT_TOKENS if workload == "corpus" else CARD_CONVERSATIONS * runs[0]["tokens"] / runs[0]["rows"]
        results[workload] = {
            "runs": runs,
            "speedup_vs_1": {str(r["workers"]): round(r["tokens_per_s"] / base, 2) for r in runs},
            "projected_tokens": round(total),
            "projection": project([r for r in runs if r["workers"] > 1] or runs, total),
        }
        print(json.dumps({workload: {k: results[workload][k] for k in ("speedup_vs_1", "projection")}}, indent=1))
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "prepare_scaling",
            "command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
            "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
            "tokenizer": "builtin:test (1024 pieces)",
            "scale": args.scale,
            "results": results,
        }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
