"""The SFT mixture: the card's table as data, selection, shortfall policies, filters, cache, atomicity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alia_nemo.config.compose import load_config
from alia_nemo.config.schema import MixtureConfig
from alia_nemo.data.mixture import MixtureError, load_prepared, plan, prepare_mixture

# The model card's table, typed in again here so the config is checked against an independent copy.
CARD = {
    "aya-dataset": {"en": 2977, "es": 2568, "eu": 715, "pt": 7006},
    "coqcat-train": {"ca": 2429},
    "databricks-dolly-15k": {"en": 12044},
    "dolly-ca": {"ca": 2449},
    "eif-augmentation": {"ca": 6540, "en": 27860, "es": 7646, "eu": 2615, "gl": 2691},
    "fineweb-edu_qa": {"ca": 19389, "en": 17837, "es": 19992, "eu": 17787, "gl": 18605},
    "flores-dev": {"ca": 766, "en": 918, "es": 1745, "eu": 359, "gl": 419},
    "long-context-qa": {"ca": 33, "en": 96, "es": 33, "eu": 34, "gl": 34, "pt": 33},
    "mentor-ca": {"ca": 5047},
    "mentor-es": {"es": 5281},
    "multiturn-augmentation": {"ca": 5982, "en": 23901, "es": 2132, "eu": 2470},
    "no-robots": {"en": 7813},
    "oasst2_self-identity-rephrase": {"ca": 2, "en": 700, "es": 323, "eu": 6},
    "openr1-math": {"en": 69052},
    "openr1-math-translated": {"ca": 35142, "es": 68136, "eu": 33899, "gl": 33810, "pt": 34074},
    "rag-multilingual": {"ca": 13880, "en": 12922, "es": 9611},
    "self-identity": {"ca": 1259, "en": 1286, "es": 1314, "eu": 1318, "gl": 1272},
    "system-prompt-eif-translation": {"ca": 50, "en": 50, "es": 50, "eu": 50, "gl": 50},
    "tower-blocks": {"en": 1923, "es": 965, "pt": 5914},
    "wildchat-curated-deepseekv3": {"en": 141717, "es": 15192},
}
CARD_TOTALS = {
    "aya-dataset": 13266, "coqcat-train": 2429, "databricks-dolly-15k": 12044, "dolly-ca": 2449,
    "eif-augmentation": 47352, "fineweb-edu_qa": 93610, "flores-dev": 4207, "long-context-qa": 263,
    "mentor-ca": 5047, "mentor-es": 5281, "multiturn-augmentation": 34485, "no-robots": 7813,
    "oasst2_self-identity-rephrase": 1031, "openr1-math": 69052, "openr1-math-translated": 205061,
    "rag-multilingual": 36413, "self-identity": 6449, "system-prompt-eif-translation": 250, "tower-blocks": 8802,
    "wildchat-curated-deepseekv3": 156909,
}  # fmt: skip
CARD_LANGUAGES = {"ca": 92968, "en": 321096, "es": 134988, "eu": 59253, "gl": 56881, "pt": 47027}
CARD_LICENCES = {
    "aya-dataset": "Apache-2.0", "coqcat-train": "CC-BY-NC-ND-4.0", "databricks-dolly-15k": "CC-BY-SA-3.0",
    "dolly-ca": "CC-BY-SA-3.0", "flores-dev": "CC-BY-SA-4.0", "mentor-es": "CC-BY-4.0", "mentor-ca": "CC-BY-4.0",
    "no-robots": "CC-BY-NC-4.0", "rag-multilingual": "CC-BY-SA-4.0", "system-prompt-eif-translation": "CC-BY-4.0",
}  # fmt: skip


@pytest.fixture(scope="module")
def table() -> MixtureConfig:
    return load_config(["data=sft_mixture"]).data


def test_every_row_of_the_card(table):
    assert {n: dict(d.counts) for n, d in table.datasets.items()} == CARD


def test_dataset_language_and_grand_totals(table):
    assert {n: sum(d.counts.values()) for n, d in table.datasets.items()} == CARD_TOTALS
    langs = {lang: sum(d.counts.get(lang, 0) for d in table.datasets.values()) for lang in CARD_LANGUAGES}
    assert langs == CARD_LANGUAGES
    assert sum(langs.values()) == 712_213 and len(table.datasets) == 20


def test_licences_and_origins(table):
    for name, licence in CARD_LICENCES.items():
        assert table.datasets[name].licence == licence
    internal = {n for n, d in table.datasets.items() if d.origin.kind == "local"}
    assert internal == {
        "eif-augmentation", "fineweb-edu_qa", "long-context-qa", "multiturn-augmentation",
        "oasst2_self-identity-rephrase", "openr1-math-translated", "self-identity",
        "system-prompt-eif-translation", "wildchat-curated-deepseekv3",
    }  # fmt: skip
    from alia_nemo.data.adapters import ADAPTERS

    assert all(d.adapter in ADAPTERS for d in table.datasets.values())


def test_dry_run_plan_reads_nothing_and_flags_missing_internal_files(table):
    p = plan(table)
    assert p["total"] == 712_213 and p["languages"] == CARD_LANGUAGES
    assert p["datasets"]["eif-augmentation"]["missing_files"] == ["data/internal/eif-augmentation.jsonl"]
    assert p["datasets"]["aya-dataset"]["missing_files"] == []


def test_missing_internal_files_stop_the_build_listing_every_set(table, tok, tmp_path):
    mix = table.model_copy(update={"prepared_root": str(tmp_path)})
    with pytest.raises(MixtureError) as err:
        prepare_mixture(mix, tok, 4096, 0, progress=False)
    msg = str(err.value)
    assert (
        "9 dataset(s)" in msg and "wildchat-curated-deepseekv3: data/internal/wildchat-curated-deepseekv3.jsonl" in msg
    )
    assert "messages JSONL" in msg and "allow_missing_internal=true" in msg
    assert not list(tmp_path.iterdir())  # nothing written


# ----------------------------------------------------------------------------- small built mixtures


def _conv(i: int, lang: str, words: int = 6, prefix: str = "q") -> dict:
    return {
        "id": f"{prefix}{lang}{i}",
        "language": lang,
        "messages": [
            {"role": "user", "content": f"{prefix} {lang} pregunta {i}?"},
            {"role": "assistant", "content": " ".join(["resposta"] * words) + f" {i}."},
        ],
    }


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return str(path)


def _mixture(tmp_path: Path, datasets: dict, **kw) -> MixtureConfig:
    data = {
        "name": "mini",
        "format": "mixture",
        "internal_dir": str(tmp_path),
        "prepared_root": str(tmp_path / "prepared"),
        "val_fraction": 0.1,
        "datasets": datasets,
        **kw,
    }
    return MixtureConfig.model_validate(data)


def _ds(files: list[str], counts: dict, licence: str = "Apache-2.0") -> dict:
    return {"licence": licence, "adapter": "messages", "origin": {"kind": "local", "files": files}, "counts": counts}


@pytest.fixture()
def mini(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [_conv(i, "ca") for i in range(30)] + [_conv(i, "es") for i in range(30)])
    b = _jsonl(tmp_path / "b.jsonl", [_conv(i, "en", prefix="b") for i in range(20)])
    return tmp_path, {"set-a": _ds([a], {"ca": 10, "es": 5}), "set-b": _ds([b], {"en": 8}, licence="CC-BY-NC-4.0")}


def test_exact_counts_balanced_manifest_and_disjoint_validation(mini, tok):
    tmp_path, datasets = mini
    out = prepare_mixture(_mixture(tmp_path, datasets), tok, 256, seed=1, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    langs = manifest["datasets"]["set-a"]["languages"]
    assert (langs["ca"]["selected"], langs["ca"]["val"], langs["es"]["selected"], langs["es"]["val"]) == (10, 1, 5, 1)
    for r in manifest["datasets"].values():
        for s in r["languages"].values():
            # every converted conversation is selected, held out, dropped with a reason, or left unselected
            assert s["converted"] == s["selected"] + s["val"] + sum(s["dropped"].values()) + s["unselected"]
            assert s["requested"] == s["selected"] + s["repeated"] + s["shortfall"]
    assert manifest["totals"]["selected"] == 23 and manifest["totals"]["input_rows"] == 80
    train, val, _ = load_prepared(out)
    assert len(train) == 23 and len(val) == 3
    import pyarrow.parquet as pq

    ids = {split: [i for f in manifest["files"][split] for i in pq.read_table(out / f).column("id").to_pylist()]
           for split in ("train", "val")}  # fmt: skip
    assert not set(ids["train"]) & set(ids["val"])
    assert (out / "composition.png").read_bytes()[:4] == b"\x89PNG"
    assert manifest["tokenizer"]["vocab_size"] == 1024 and len(manifest["template_sha256"]) == 64
    import hashlib

    a_file = datasets["set-a"]["origin"]["files"][0]
    assert manifest["datasets"]["set-a"]["revisions"] == [
        {"file": str(Path(a_file).resolve()), "sha256": hashlib.sha256(Path(a_file).read_bytes()).hexdigest()}
    ]
    assert manifest["code_version"].startswith("0.1.0+")
    assert manifest["datasets"]["set-a"]["tokens"]["p50"] <= manifest["datasets"]["set-a"]["tokens"]["p95"]


def test_selection_is_seeded(mini, tok, tmp_path_factory):
    tmp_path, datasets = mini
    import pyarrow.parquet as pq

    def ids(seed: int, root: str) -> list[str]:
        mix = _mixture(tmp_path, datasets, prepared_root=str(tmp_path_factory.mktemp(root)))
        out = prepare_mixture(mix, tok, 256, seed=seed, progress=False)
        return sorted(pq.read_table(out / "train-00000-of-00001.parquet").column("id").to_pylist())

    assert ids(1, "r1") == ids(1, "r2")
    assert ids(1, "r3") != ids(2, "r4")


def test_shortfall_policies(tmp_path, tok):
    f = _jsonl(tmp_path / "s.jsonl", [_conv(i, "eu") for i in range(4)])
    ds = {"small": _ds([f], {"eu": 6})}
    with pytest.raises(MixtureError, match=r"(?s)small/eu: 4 of 6.*on_shortfall=repeat"):
        prepare_mixture(_mixture(tmp_path, ds, val_fraction=0), tok, 256, 0, progress=False)
    assert not [p for p in (tmp_path / "prepared").iterdir() if not p.name.startswith(".")]

    out = prepare_mixture(_mixture(tmp_path, ds, val_fraction=0, on_shortfall="repeat"), tok, 256, 0, progress=False)
    s = json.loads((out / "manifest.json").read_text())["datasets"]["small"]["languages"]["eu"]
    assert (s["selected"], s["repeated"], s["shortfall"]) == (4, 2, 0)
    assert len(load_prepared(out)[0]) == 6

    out = prepare_mixture(_mixture(tmp_path, ds, val_fraction=0, on_shortfall="take_all"), tok, 256, 0, progress=False)
    s = json.loads((out / "manifest.json").read_text())["datasets"]["small"]["languages"]["eu"]
    assert (s["selected"], s["repeated"], s["shortfall"]) == (4, 0, 2)


def test_every_drop_reason_is_counted(tmp_path, tok):
    rows = [_conv(i, "gl") for i in range(6)]
    rows += [
        _conv(0, "gl"),  # same content as row 0 (id differs below)
        _conv(99, "gl", words=400),  # too long for 128 tokens
        {"id": "order", "language": "gl", "messages": [{"role": "assistant", "content": "a"}]},
        {"id": "empty", "language": "gl",
         "messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}]},
        "{broken json",
    ]  # fmt: skip
    rows[6] = dict(rows[6], id="dup")
    f = _jsonl(tmp_path / "d.jsonl", rows)
    # Ask for more than exists so every row is examined (take_all records the shortfall).
    mix = _mixture(tmp_path, {"d": _ds([f], {"gl": 7})}, val_fraction=0, on_shortfall="take_all")
    r = json.loads((prepare_mixture(mix, tok, 128, 0, progress=False) / "manifest.json").read_text())["datasets"]["d"]
    assert r["languages"]["gl"]["dropped"] == {"duplicate (same normalised content)": 1, "longer than 128 tokens": 1}
    # Rows the adapter can not turn into a conversation are counted there, one reason each.
    assert r["adapter_drops"] == {"gl: empty message": 1, "gl: invalid turn order": 1, "unknown: invalid JSON": 1}
    assert r["input_rows"] == 11
    assert (r["languages"]["gl"]["selected"], r["languages"]["gl"]["shortfall"]) == (6, 1)


def test_licence_exclusion_builds_a_commercial_variant(mini, tok):
    tmp_path, datasets = mini
    mix = _mixture(tmp_path, datasets, exclude_licenses=["CC-BY-NC-4.0"])
    assert plan(mix)["total"] == 15
    m = json.loads((prepare_mixture(mix, tok, 256, 0, progress=False) / "manifest.json").read_text())
    assert m["exclude_licenses"] == ["CC-BY-NC-4.0"] and m["datasets"]["set-b"] == {
        "excluded_by_licence": "CC-BY-NC-4.0",
        "requested": {"en": 8},
    }
    assert m["totals"]["selected"] == 15


def test_allowed_missing_internal_set_is_recorded(mini, tok):
    tmp_path, datasets = mini
    datasets = {**datasets, "internal": _ds([str(tmp_path / "absent.jsonl")], {"pt": 3})}
    mix = _mixture(tmp_path, datasets, allow_missing_internal=True, on_shortfall="take_all")
    m = json.loads((prepare_mixture(mix, tok, 256, 0, progress=False) / "manifest.json").read_text())
    assert m["datasets"]["internal"]["missing_files"] == [str(tmp_path / "absent.jsonl")]
    assert m["datasets"]["internal"]["languages"]["pt"]["shortfall"] == 3


def test_cache_hit_and_misses(mini, tok):
    tmp_path, datasets = mini
    mix = _mixture(tmp_path, datasets)
    first = prepare_mixture(mix, tok, 256, 0, progress=False)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert prepare_mixture(mix, tok, 256, 0, progress=False) == first  # hit: same directory, untouched
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    assert prepare_mixture(mix, tok, 200, 0, progress=False) != first  # filter changed
    assert prepare_mixture(mix, tok, 256, 1, progress=False) != first  # seed changed
    time.sleep(0.01)
    extra = Path(datasets["set-b"]["origin"]["files"][0])
    extra.write_text(extra.read_text() + json.dumps(_conv(77, "en", prefix="b")) + "\n")  # source changed
    assert prepare_mixture(mix, tok, 256, 0, progress=False) != first


PREPARE_SCRIPT = """
import json, sys
from alia_nemo.config.schema import MixtureConfig
from alia_nemo.data.mixture import prepare_mixture
from alia_nemo.model.tokenizer import build_test_tokenizer
mix = MixtureConfig.model_validate(json.loads(sys.argv[1]))
print(prepare_mixture(mix, build_test_tokenizer(), 512, 0, progress=False))
"""


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path):
    rows = [_conv(i, "en", words=30) for i in range(40000)]
    f = _jsonl(tmp_path / "big.jsonl", rows)
    mix = _mixture(tmp_path, {"big": _ds([f], {"en": 30000})}, val_fraction=0.01)
    arg = json.dumps(mix.model_dump(mode="json"))
    root = Path(mix.prepared_root)
    proc = subprocess.Popen([sys.executable, "-c", PREPARE_SCRIPT, arg], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not (root.is_dir() and list(root.glob(".tmp-*"))):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # nothing looks complete: only the killed build's temporary directory and its (now stale) lock are there
    assert [p.name for p in root.iterdir() if not p.name.startswith((".tmp-", ".lock-"))] == []

    done = subprocess.run([sys.executable, "-c", PREPARE_SCRIPT, arg], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    final = Path(done.stdout.strip().splitlines()[-1])
    assert [p.name for p in root.iterdir()] == [final.name]  # the stale temporary directory is gone
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["totals"]["selected"] == 30000 and len(load_prepared(final)[0]) == 30000


def test_hub_origin_reads_through_datasets_and_records_the_fingerprint(tmp_path, tok):
    # A local folder stands in for a hub id: load_dataset takes both, so the hub code path runs offline.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.source_fixtures import raw_rows

    folder = tmp_path / "hub-copy" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(raw_rows("dolly", 40, languages=["ca"])), folder / "train-00000.parquet")
    entry = {"licence": "CC-BY-SA-3.0", "adapter": "dolly", "options": {"language": "ca"},
             "origin": {"kind": "hf", "path": str(folder.parent), "split": "train"}, "counts": {"ca": 20}}  # fmt: skip
    out = prepare_mixture(_mixture(tmp_path, {"dolly-ca": entry}), tok, 4096, 0, progress=False)
    r = json.loads((out / "manifest.json").read_text())["datasets"]["dolly-ca"]
    assert r["languages"]["ca"]["selected"] == 20 and r["input_rows"] == 40
    assert r["revisions"][0]["hub"] == str(folder.parent) and r["revisions"][0]["fingerprint"]


def test_unreachable_hub_dataset_names_the_fix(tmp_path, tok):
    entry = {"licence": "x", "adapter": "no_robots", "origin": {"kind": "hf", "path": "nobody/not-a-dataset"},
             "counts": {"en": 1}}  # fmt: skip
    with pytest.raises(MixtureError, match=r"dataset 'nr': could not load nobody/not-a-dataset.*origin\.files"):
        prepare_mixture(_mixture(tmp_path, {"nr": entry}), tok, 4096, 0, progress=False)
