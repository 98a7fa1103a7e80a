"""Peak memory and throughput of ``prepare`` on a synthetic stand-in of the card's 20-source SFT mixture.

The stand-in (``tests.source_fixtures.synthetic_mixture``) has every source of ``conf/data/sft_mixture.yaml`` with
rows in the source's own schema (Parquet through its adapter, or messages JSONL for internal sets), about 1.3x
the card's count per dataset and language times ``--scales``; 1.0 is the card's 712,213 conversations. Each
prepare runs in a fresh process on an empty ``prepared_root`` (no cache hit) and is measured from outside:

- peak RSS of the prepare process itself (``ru_maxrss``), of its largest worker process, and of the whole
  process tree (main + workers, sampled every 0.2 s from /proc);
- wall time, conversations/s and tokens/s (tokens of the prepared training rows).

``--baseline DIR`` also runs the same prepares (``--baseline-scales``: only these) with the package from another
checkout (e.g. the commit before streaming prepare: ``git worktree add /tmp/before a59dbd9``), side by side.

Targets (issue 17): peak RSS under 2 GiB at 10% and 100%, and the two within 20% of each other.

    python benchmarks/bench_prepare_mixture.py --scales 0.1 1.0 --workers 2 \\
        --json benchmarks/results/prepare_mixture_cpu2.json

The stand-in files are generated once under ``--root`` (default ``~/.cache/alia-nemo/bench-standin``) and reused;
each run's prepared output is deleted after it is measured (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
TARGET_GIB = 2.0
TARGET_SPREAD = 0.20

# What the child process runs: one prepare, its own measurements as JSON on the last line of stdout.
CHILD = """
import importlib.util, json, resource, sys, time
sys.path.insert(0, {package!r})  # the package measured (this checkout, or --baseline's)
# The stand-in's generator always comes from this checkout (an older one may not have it).
spec = importlib.util.spec_from_file_location("standin", {fixtures!r})
standin = importlib.util.module_from_spec(spec)
spec.loader.exec_module(standin)
from alia_nemo.model.tokenizer import build_test_tokenizer
import alia_nemo.data.mixture as mixture

if __name__ == "__main__":
    mix = standin.synthetic_mixture({root!r}, {scale!r}, prepared_root={prepared!r})
    tok = build_test_tokenizer()
    kwargs = {{"workers": {workers!r}}} if "workers" in mixture.prepare_mixture.__code__.co_varnames else {{}}
    start = time.time()
    out = mixture.prepare_mixture(mix, tok, 32_768, seed=0, progress=False, **kwargs)
    seconds = time.time() - start
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = sum(r.get("tokens", {{}}).get("total", 0) for r in manifest["datasets"].values())
    totals = manifest["totals"]
    print(json.dumps({{"seconds": seconds, "train_rows": totals["selected"] + totals["repeated"],
                      "val_rows": totals["val"], "tokens": tokens, "dir": str(out),
                      "self_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "children_maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}}))
"""


def _tree_rss(pid: int) -> int:
    """Bytes resident in ``pid`` and all its descendants, from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def generate(root: Path, scale: float) -> dict[str, Any]:
    """Write (or find) the stand-in files of ``scale``; returns their size and how long it took."""
    sys.path.insert(0, str(REPO))
    from tests.source_fixtures import synthetic_mixture

    start = time.time()
    mix = synthetic_mixture(root, scale)
    files = [Path(f) for d in mix.datasets.values() for f in d.origin.files or []]
    return {
        "requested": sum(sum(d.counts.values()) for d in mix.datasets.values()),
        "bytes": sum(f.stat().st_size for f in files),
        "seconds": round(time.time() - start, 1),
    }


def run_prepare(package: Path, root: Path, scale: float, workers: int, keep: bool) -> dict[str, Any]:
    """One prepare in a fresh process (the package imported from ``package``); its measurements."""
    prepared = root / f"prepared-{scale:g}-w{workers}-{os.getpid()}-{time.time_ns()}"
    code = CHILD.format(
        package=str(package),
        fixtures=str(REPO / "tests" / "source_fixtures.py"),
        root=str(root),
        scale=scale,
        prepared=str(prepared),
        workers=workers,
    )
    env = {**os.environ, "PYTHONPATH": str(package), "HF_HUB_OFFLINE": "1"}
    if workers == 1:  # one core: no tokenizer thread pool either, so "per worker" means one core
        env["TOKENIZERS_PARALLELISM"] = "false"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True, cwd=str(package))  # fmt: skip
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare at scale {scale} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    if not keep:
        shutil.rmtree(prepared, ignore_errors=True)  # this run's own output, made above
    return {
        "scale": scale,
        "workers": workers,
        "seconds": round(result["seconds"], 1),
        "train_rows": result["train_rows"],
        "val_rows": result["val_rows"],
        "tokens": result["tokens"],
        "conversations_per_s": round((result["train_rows"] + result["val_rows"]) / result["seconds"], 1),
        "tokens_per_s": round(result["tokens"] / result["seconds"]),
        "peak_rss_main_gib": round(result["self_maxrss_kib"] * 1024 / GIB, 3),
        "peak_rss_largest_worker_gib": round(result["children_maxrss_kib"] * 1024 / GIB, 3),
        "peak_rss_tree_gib": round(peak / GIB, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--workers", type=int, default=2, help="data.workers for each prepare (1: in-process)")
    ap.add_argument("--root", type=Path, default=Path("~/.cache/alia-nemo/bench-standin").expanduser())
    ap.add_argument("--baseline", type=Path, help="another checkout to run the same prepares with, side by side")
    ap.add_argument("--baseline-scales", type=float, nargs="+", help="scales for --baseline (default: --scales)")
    ap.add_argument("--generate-only", action="store_true", help="write the stand-in files and stop")
    ap.add_argument("--keep", action="store_true", help="keep each run's prepared directory")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    standin = {f"{s:g}": generate(args.root, s) for s in args.scales}
    print(json.dumps({"stand_in": standin}, indent=1), flush=True)
    if args.generate_only:
        return
    runs: dict[str, list[dict[str, Any]]] = {"this checkout": []}
    if args.baseline:
        runs[f"baseline {args.baseline}"] = []
    for scale in args.scales:
        for label in runs:
            if label != "this checkout" and args.baseline_scales and scale not in args.baseline_scales:
                continue
            package = REPO if label == "this checkout" else args.baseline
            r = run_prepare(package, args.root, scale, args.workers, args.keep)
            runs[label].append(r)
            print(f"{label:>30}  scale {scale:>5g}: {r['train_rows']:>8,} rows  {r['seconds']:>7.1f} s  "
                  f"{r['conversations_per_s']:>7.1f} conv/s  {r['tokens_per_s']:>10,} tok/s  peak RSS main "
                  f"{r['peak_rss_main_gib']:.2f} GiB, tree {r['peak_rss_tree_gib']:.2f} GiB", flush=True)  # fmt: skip
    ours = runs["this checkout"]
    peaks = [r["peak_rss_tree_gib"] for r in ours]
    verdict = {
        "target_gib": TARGET_GIB,
        "under_target": all(p < TARGET_GIB for p in peaks),
        "spread": round(max(peaks) / min(peaks) - 1, 3) if peaks else None,
        "within_spread_target": bool(peaks) and max(peaks) / min(peaks) - 1 <= TARGET_SPREAD,
    }
    print(json.dumps(verdict), flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "prepare_mixture",
            "command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
            "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)},
            "tokenizer": "builtin:test (1024 pieces)",
            "stand_in": standin,
            "runs": runs,
            "verdict": verdict,
            "max_rss_of_this_driver_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3),
        }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
