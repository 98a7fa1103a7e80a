"""Streaming, parallel ``prepare`` of the SFT mixture: the same output as before, whatever the workers.

``tests/data/golden_mixture.json`` holds digests of what ``prepare`` wrote before it streamed (commit a59dbd9, on
two small stand-ins of the card's mixture: one plain, one with over-long drops, repeats and a validation
shortfall); the streaming build must reproduce them row for row. Then the written Parquet files must be
byte-identical for 1, 2 and 4 local worker processes and for Ray actors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from alia_nemo.data.mixture import prepare_mixture
from alia_nemo.data.workers import SMALL_WORK, Workers, choose, cluster_address
from tests.source_fixtures import synthetic_mixture

GOLDEN = json.loads((Path(__file__).parent / "golden_mixture.json").read_text())
CASES = {"default": (32_768, 0, {}), "drops_repeat": (3_000, 7, {"on_shortfall": "repeat", "val_fraction": 0.05})}
VOLATILE = ("key", "created", "seconds", "code_version")


def digest(out: Path) -> dict:
    """Row digests per split (every column, in order) and the manifest without run-specific fields."""
    manifest = json.loads((out / "manifest.json").read_text())
    splits = {}
    for split, names in manifest["files"].items():
        h, n = hashlib.sha256(), 0
        for name in names:
            for row in pq.read_table(out / name).to_pylist():
                fields = ("id", "source", "language", "messages", "input_ids", "loss_mask")
                h.update(json.dumps([row[f] for f in fields]).encode())
                n += 1
        splits[split] = {"rows": n, "sha256": h.hexdigest()}
    for key in VOLATILE:
        manifest.pop(key)
    manifest["tokenizer"].pop("sha256")  # the tokenizers library's serialisation, not our output
    manifest["tokenizer"].pop("name_or_path")  # where this test's tokenizer was saved
    for report in manifest["datasets"].values():
        report.pop("origin", None)  # paths of this test's files
        for rev in report.get("revisions", []):
            rev.pop("file", None)
            rev.pop("sha256", None)  # the Parquet writer's bytes of the stand-in, not our output
    return {"splits": splits, "manifest": manifest}


def file_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.parquet"))}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streaming_prepare_writes_what_prepare_wrote_before(case, tok, tmp_path):
    max_tokens, seed, overrides = CASES[case]
    mix = synthetic_mixture(tmp_path, 0.002, **overrides)
    out = prepare_mixture(mix, tok, max_tokens, seed=seed, progress=False, workers=1)
    got = digest(out)
    assert got["splits"] == GOLDEN[case]["splits"]
    assert got["manifest"] == GOLDEN[case]["manifest"]
    assert not list(out.glob(".scratch*")) and not list(tmp_path.glob("prepared/.tmp-*"))  # scratch removed
    if case == "drops_repeat":  # the golden covers drops, repeats and shortfalls, not only the plain path
        totals = got["manifest"]["totals"]
        assert totals["dropped"] > 0 and totals["repeated"] > 0 and totals["val_shortfall"] > 0


def test_the_golden_comparison_can_fail(tok, tmp_path):
    mix = synthetic_mixture(tmp_path, 0.002)
    other_seed = digest(prepare_mixture(mix, tok, 32_768, seed=1, progress=False, workers=1))
    assert other_seed["splits"]["train"] != GOLDEN["default"]["splits"]["train"]
    assert other_seed["splits"]["train"]["rows"] == GOLDEN["default"]["splits"]["train"]["rows"]


@pytest.fixture(scope="module")
def small_mixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("standin")
    return root, synthetic_mixture(root, 0.001, on_shortfall="repeat")


def _prepare(small_mixture, tok, name: str, **kwargs) -> Path:
    root, mix = small_mixture
    mix = mix.model_copy(update={"prepared_root": str(root / name)})
    return prepare_mixture(mix, tok, 3_000, seed=3, progress=False, **kwargs)


def test_written_bytes_do_not_depend_on_the_number_of_worker_processes(small_mixture, tok):
    outs = {n: _prepare(small_mixture, tok, f"w{n}", workers=n) for n in (1, 2, 4)}
    hashes = {n: file_hashes(out) for n, out in outs.items()}
    assert hashes[1] and hashes[1] == hashes[2] == hashes[4]
    manifests = {n: digest(out)["manifest"] for n, out in outs.items()}
    assert manifests[1] == manifests[2] == manifests[4]


@pytest.fixture
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow  # a Ray runtime start: ~10 s
def test_ray_actors_write_the_same_bytes(small_mixture, tok, ray_local):
    inline = file_hashes(_prepare(small_mixture, tok, "inline", workers=1))
    with Workers(tok, 2, 10**6, "auto") as pool:
        assert pool.backend == "ray"
    on_ray = file_hashes(_prepare(small_mixture, tok, "ray", workers=2, address="auto"))
    assert on_ray == inline
    assert ray_local.is_initialized()  # the caller's Ray connection is left as it was


def test_choose_backend():
    assert choose(1, 10**9, None) == ("inline", 1)
    assert choose(0, SMALL_WORK - 1, None) == ("inline", 1)  # small: starting processes costs more
    assert choose(0, SMALL_WORK, "head:6379") == ("ray", 0)  # 0: every CPU of the cluster, counted on connect
    assert choose(3, 10, None) == ("processes", 3)
    backend, size = choose(0, SMALL_WORK, None)
    assert (backend, size) in {("processes", size), ("inline", 1)} and size >= 1


def test_imap_is_ordered_and_lazy(tok):
    drawn = []

    def items():
        for i in range(100):
            drawn.append(i)
            yield i

    with Workers(tok, 2, 10**6) as pool:
        got = []
        for item, result in pool.imap(_square, items(), ahead=3):
            got.append((item, result))
            if item == 9:
                break
    assert got == [(i, i * i) for i in range(10)]
    assert len(drawn) <= 10 + 3  # read ahead by at most `ahead`, never the whole input


def _square(tokenizer, item: int) -> int:
    return item * item


def test_cluster_address(monkeypatch, capsys):
    from types import SimpleNamespace

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(SimpleNamespace(engine=SimpleNamespace(ray_address=None))) is None
    assert cluster_address(SimpleNamespace(engine=SimpleNamespace(ray_address="head:6379"))) == "head:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # inside a Ray job: the cluster it runs in
    assert cluster_address(SimpleNamespace(engine=SimpleNamespace(ray_address=None))) == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # a job API address is not a cluster to join
    assert cluster_address(SimpleNamespace(engine=SimpleNamespace(ray_address=None))) is None
    assert "job API address" in capsys.readouterr().err


def test_seen_digests_find_the_first_dataset_exactly():
    from alia_nemo.data.digests import SeenDigests

    zero_tail = b"\x07" * 30 + b"\x00\x00"  # numpy's S32 drops trailing NULs when it hands out one item
    other = b"\x07" * 30 + b"\x00\x01"
    seen = SeenDigests()
    seen.start("a")
    assert seen.add(zero_tail) is None and seen.add(zero_tail) == "a"  # a duplicate within the dataset
    assert seen.add(b"\xff" * 32) is None
    seen.start("b")
    assert seen.kept_before([zero_tail, other, b"\xff" * 32, b"\x00" * 32]) == ["a", None, "a", None]
    assert seen.add(other) is None
    seen.finish()
    assert seen.kept_before([other, zero_tail]) == ["b", "a"] and len(seen) == 3
