"""The corpus packer on workers: windows and manifests identical to the golden digests, whatever the worker count.

``tests/data/golden_packing.json`` holds digests of what the in-process packer wrote before tokenising moved onto
workers (generated from the corpus below, made in code). To regenerate it (only for an intended change of the
output): ``.venv/bin/python tests/data/test_packing_parallel.py --regenerate``.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from alia_nemo.config.schema import TextCorpusConfig
from alia_nemo.data.corpus import TOKENIZE_BLOCK, CorpusError, SourceStats, interleave
from alia_nemo.data.packing import iter_windows, prepare_corpus
from alia_nemo.data.workers import Workers

GOLDEN = Path(__file__).with_name("golden_packing.json")
# Manifest fields that differ between two builds of the same output (or between environments).
VOLATILE = ("key", "created", "seconds", "code_version", "tokenizer", "files")

# The corpus' vocabulary (its order matters: the golden digests were made from texts drawn from it). Sentences
# read better than a column of quoted words.
WORDS = (  # noqa: SIM905
    "el gat dorm al sol i la gata també corpus català llengua documents entrenament model aprenentatge "
    "el niño juega en el jardín con su perro España años über straße the quick brown fox jumps over lazy dog "
    "àéíòú ç ñ l·l 2026 3,14 — « » ¿ ? ! 🙂"
).split()

# name -> what prepare_corpus is given (train tokens, seq_length, seed) and the corpus' options.
CASES: dict[str, dict[str, Any]] = {
    # Every source meets its quota part-way through a block of texts; the small one only at its very end.
    "drop": dict(tokens=60_000, seq_length=512, seed=3, tail="drop", val_windows=3, on_shortfall="error", min_chars=40),
    # The small source runs out before its quota (take_all); no BOS; the last window is padded.
    "pad_short": dict(
        tokens=150_000,
        seq_length=400,
        seed=11,
        tail="pad",
        val_windows=2,
        on_shortfall="take_all",
        min_chars=1,
        add_bos=False,
    ),
    # The small source is read three times over (blocks spanning passes) to meet its quota.
    "repeat": dict(
        tokens=200_000, seq_length=512, seed=7, tail="pad", val_windows=1, on_shortfall="repeat", min_chars=25
    ),
}


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _lines(rng: random.Random, n: int) -> list[bytes]:
    """``n`` JSONL lines: documents of varied lengths with bad lines, empty and short texts among them."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.02:
            out.append(b"not json {")
        elif r < 0.03:
            out.append(b'{"text": "bad \xff byte"}')
        elif r < 0.04:
            out.append(b'["a list"]')
        elif r < 0.06:
            out.append(json.dumps({"body": _text(rng, 10)}).encode())
        elif r < 0.09:
            out.append(json.dumps({"text": rng.choice(["", "   ", "\n\t"])}).encode())
        elif r < 0.15:
            out.append(json.dumps({"text": _text(rng, rng.randint(1, 6))}, ensure_ascii=False).encode())
        else:
            words = min(3000, int(rng.lognormvariate(4.2, 1.0)) + 1)
            out.append(json.dumps({"text": _text(rng, words)}, ensure_ascii=False).encode())
    return out


def make_corpus(data: Path, root: Path, case: str) -> TextCorpusConfig:
    """Three local sources (weights 3, 2, 1; one split over a JSONL and a Parquet file) for ``case``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20261204)
    (data / "ca.jsonl").write_bytes(b"\n".join(_lines(rng, 420)) + b"\n")
    (data / "es-0.jsonl").write_bytes(b"\n".join(_lines(rng, 60)) + b"\n")
    es_texts = [_text(rng, min(2000, int(rng.lognormvariate(4.0, 1.2)) + 1)) for _ in range(150)]
    pq.write_table(pa.table({"text": es_texts}), data / "es-1.parquet")
    (data / "en.jsonl").write_bytes(b"\n".join(_lines(rng, 45)) + b"\n")
    c = CASES[case]
    sources = {
        "ca": {"kind": "local", "files": [str(data / "ca.jsonl")], "weight": 3.0, "language": "ca"},
        "es": {
            "kind": "local",
            "files": [str(data / "es-0.jsonl"), str(data / "es-1.parquet")],
            "weight": 2.0,
            "language": "es",
        },
        "en": {"kind": "local", "files": [str(data / "en.jsonl")], "weight": 1.0, "language": "en"},
    }
    options = {k: v for k, v in c.items() if k not in ("tokens", "seq_length", "seed")}
    return TextCorpusConfig(
        name=f"golden-{case}", format="text_corpus", prepared_root=str(root), sources=sources, **options
    )


def _window_digest(row: dict[str, Any]) -> str:
    fields = [row["input_ids"], row["doc_starts"], row["continues"], row["valid_length"], row["sources"]]
    return hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()


def digests(directory: Path) -> dict[str, Any]:
    """Per-window digests (train and val, in order) and the manifest without its volatile fields."""
    manifest = json.loads((directory / "manifest.json").read_text())
    return {
        "train": [_window_digest(r) for r in iter_windows(directory, "train")],
        "val": [_window_digest(r) for r in iter_windows(directory, "val")],
        "manifest": {k: v for k, v in manifest.items() if k not in VOLATILE},
    }


def pack(tok, tmp: Path, case: str, seed: int | None = None, progress: bool = False, **kw: Any) -> Path:
    """Pack ``case`` (with another ``seed`` if given) into a fresh prepared root under ``tmp``; ``kw`` (workers)
    goes to ``prepare_corpus``."""
    c = CASES[case]
    corpus = make_corpus(tmp / "data", tmp / "prepared", case)
    seed = c["seed"] if seed is None else seed
    return prepare_corpus(corpus, tok, c["seq_length"], c["tokens"], seed, progress=progress, **kw)


def _shards(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.glob("*.parquet"))}


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("case", CASES)
def test_in_process_packing_reproduces_the_golden_windows_and_manifest(tok, tmp_path, golden, case):
    got = digests(pack(tok, tmp_path, case, workers=1))
    assert got["manifest"] == golden[case]["manifest"]
    assert got["train"] == golden[case]["train"] and got["val"] == golden[case]["val"]
    for s in got["manifest"]["sources"].values():  # every record read is a document, read-ahead or a drop
        assert s["records"] == s["documents"] + s["unused_read_ahead"] + sum(s["dropped"].values()), s


def test_the_identity_check_can_fail(tok, tmp_path, golden):
    got = digests(pack(tok, tmp_path, "drop", workers=1, seed=CASES["drop"]["seed"] + 1))
    assert got["train"] != golden["drop"]["train"]  # another interleaving: other windows, other digests
    assert got["manifest"] != golden["drop"]["manifest"]  # (its seed; each source's counts are the same)


# Each pool of spawned workers costs seconds (every worker imports transformers): all three counts on the case
# with the most reading (three passes, blocks across passes and files), 1 and 2 on the one whose source runs out.
@pytest.mark.parametrize(("case", "counts"), [("repeat", (1, 2, 4)), ("pad_short", (1, 2))])
def test_windows_shards_and_manifest_do_not_depend_on_the_worker_count(tok, tmp_path, golden, case, counts, capsys):
    built = {w: pack(tok, tmp_path / str(w), case, workers=w, progress=w == 2) for w in counts}
    assert "tokenising on 2 local processes" in capsys.readouterr().err
    for w, directory in built.items():
        assert digests(directory) == golden[case], f"{w} workers"
        assert _shards(directory) == _shards(built[1]), f"{w} workers"  # the Parquet bytes too


def test_a_read_error_is_raised_only_where_the_texts_are_needed_however_far_workers_read_ahead(tok, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i}: {_text(random.Random(i), 12)}"}) + "\n"
                            for i in range(TOKENIZE_BLOCK + 6)))  # fmt: skip
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    source = {"kind": "local", "files": [str(good), str(tmp_path / "bad.parquet")]}
    corpus = TextCorpusConfig(name="t", format="text_corpus", prepared_root=str(tmp_path), sources={"s": source},
                              on_shortfall="take_all")  # fmt: skip

    def run(budget: int, pool: Workers | None) -> tuple[list, dict]:
        stats: dict[str, SourceStats] = {}
        docs = [ids.tolist() for _, ids in interleave(corpus, tok, budget, 0, stats, pool)]
        return docs, asdict(stats["s"])

    with Workers(tok, 2) as pool:
        assert pool.backend == "processes"
        # Workers read blocks ahead (2 x workers): past the good file's second block into the bad file, which
        # nothing needs; the first block has all the documents used.
        inline = run(300, None)
        assert run(300, pool) == inline and inline[1]["documents"] < TOKENIZE_BLOCK
        for p in (None, pool):  # needed: the same error in-process and on workers
            with pytest.raises(CorpusError, match=r"bad\.parquet"):
                run(10**6, p)


def regenerate() -> None:
    """Write the golden digests from what this checkout's packer produces."""
    import tempfile

    from alia_nemo.model.tokenizer import build_test_tokenizer

    tok = build_test_tokenizer()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            out[case] = digests(pack(tok, Path(tmp) / case, case))
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}: " + ", ".join(f"{c} {len(d['train'])}+{len(d['val'])} windows" for c, d in out.items()))


if __name__ == "__main__" and "--regenerate" in sys.argv:
    regenerate()
