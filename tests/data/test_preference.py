"""Preference pairs for DPO: token masks, the adapters on schema-exact rows, prepare (selection, drops, shortfall
policies, cache, manifest, Parquet layout), the bundled toy pairs and the CLI."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alia_nemo.config.compose import load_config
from alia_nemo.config.schema import PreferenceConfig
from alia_nemo.data import preference
from alia_nemo.data.cache import tokenizer_hash
from alia_nemo.data.preference import (
    PreferenceError,
    cache_key,
    load_prepared_preferences,
    plan,
    prepare_preferences,
)
from alia_nemo.data.preference_adapters import PREFERENCE_ADAPTERS
from alia_nemo.data.sources import source_for
from alia_nemo.model.chatml import tokenize_preferences
from alia_nemo.model.tokenizer import load_tokenizer
from alia_nemo.nemo_rl.processor import TEMPLATE_SHA256
from alia_nemo.sample_data import sample_path
from tests.data import preference_fixtures as fx

ROOT = Path(__file__).resolve().parents[2]
COLUMN_TYPES = {
    "id": pa.string(),
    "source": pa.string(),
    "language": pa.string(),
    "prompt": pa.string(),
    "chosen": pa.string(),
    "rejected": pa.string(),
    "chosen_input_ids": pa.list_(pa.int32()),
    "chosen_loss_mask": pa.list_(pa.int8()),
    "rejected_input_ids": pa.list_(pa.int32()),
    "rejected_loss_mask": pa.list_(pa.int8()),
}


@pytest.fixture(scope="module")
def tk():
    return load_tokenizer("builtin:test")


# ------------------------------------------------------------------------------------------ token masks

# <s> <|im_start|> us er \n H i ? <|im_end|> \n <|im_start|> as s is tant \n
HEADER = [1, 4, 356, 279, 16, 999, 935, 948, 5, 16, 4, 316, 936, 295, 889, 16]


def test_exact_ids_and_masks_of_a_pair(tk):
    [(chosen, rejected)] = tokenize_preferences(tk, [([{"role": "user", "content": "Hi?"}], "Yes.", "YES.")])
    assert chosen.input_ids == [*HEADER, 1015, 264, 944, 5]  # Y es . <|im_end|>
    assert chosen.loss_mask == [0] * 16 + [1, 1, 1, 1]
    assert rejected.input_ids == [*HEADER, 1015, 961, 998, 944, 5]  # Y E S . <|im_end|>
    assert rejected.loss_mask == [0] * 16 + [1, 1, 1, 1, 1]
    for seq in (chosen, rejected):
        assert seq.input_ids.count(tk.bos_token_id) == 1 and seq.input_ids[0] == tk.bos_token_id
        assert tk.decode([t for t, m in zip(seq.input_ids, seq.loss_mask) if m]) in ("Yes.<|im_end|>", "YES.<|im_end|>")


def test_an_earlier_assistant_turn_of_the_prompt_carries_no_loss(tk):
    prompt = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Bye?"}]  # fmt: skip
    [(chosen, rejected)] = tokenize_preferences(tk, [(prompt, "Bye.", "BYE.")])
    context = [*HEADER, 999, 620, 944, 5, 16, 4, 356, 279, 16, 988, 960, 934, 948, 5, 16, 4, 316, 936, 295, 889, 16]
    assert chosen.input_ids == [*context, 988, 960, 934, 944, 5]  # B y e . <|im_end|>
    assert rejected.input_ids == [*context, 988, 1015, 961, 944, 5]  # B Y E . <|im_end|>
    # "Hello." and its <|im_end|> (positions 16-19) are context: the same for both answers, never trained
    assert chosen.loss_mask == [0] * 37 + [1] * 5 and rejected.loss_mask == [0] * 37 + [1] * 5
    assert chosen.input_ids.count(tk.bos_token_id) == 1


# ------------------------------------------------------------------------------------------- adapters


@pytest.mark.parametrize(
    ("adapter", "source", "rows", "languages", "kept", "drops"),
    [
        ("preference_jsonl", "jsonl", fx.PREFERENCE_JSONL_ROWS, fx.JSONL_LANGUAGES, fx.PREFERENCE_JSONL_KEPT,
         fx.PREFERENCE_JSONL_DROPS),
        ("helpsteer3", "hs3", fx.HELPSTEER3_ROWS, fx.HELPSTEER3_LANGUAGES, fx.HELPSTEER3_KEPT, fx.HELPSTEER3_DROPS),
        ("ultrafeedback_binarized", "uf", fx.ULTRAFEEDBACK_ROWS, fx.ULTRAFEEDBACK_LANGUAGES, fx.ULTRAFEEDBACK_KEPT,
         fx.ULTRAFEEDBACK_DROPS),
    ],
)  # fmt: skip
def test_adapter_on_its_fixture_rows(adapter, source, rows, languages, kept, drops):
    counted: Counter = Counter()
    pairs = list(PREFERENCE_ADAPTERS[adapter](rows, source=source, languages=languages, drops=counted))
    assert pairs == kept
    assert dict(counted) == drops
    assert len(pairs) + sum(counted.values()) == len(rows)  # every row is a pair or a counted drop


def test_adapter_options_language_domains_and_code_language():
    counted: Counter = Counter()
    rows = [{"prompt": "Bon dia?", "chosen": "Bon dia.", "rejected": "BON DIA."}]
    [pair] = PREFERENCE_ADAPTERS["preference_jsonl"](rows, source="s", languages=["ca"], drops=counted,
                                                     options={"language": "ca"})  # fmt: skip
    assert (pair["language"], counted) == ("ca", Counter())
    hs = PREFERENCE_ADAPTERS["helpsteer3"]
    pairs = list(hs(fx.HELPSTEER3_ROWS, source="hs3", languages=["en"], drops=counted,
                    options={"code_language": "en", "domains": ["code", "stem"]}))  # fmt: skip
    assert [(p["prompt"][0]["content"], p["chosen"]) for p in pairs] == [("Reverse a list in Python.", "xs[::-1]")]
    assert counted[("en", "domain not selected")] == 2  # the two general English rows
    counted.clear()
    assert not list(PREFERENCE_ADAPTERS["ultrafeedback_binarized"](fx.ULTRAFEEDBACK_ROWS, source="uf",
                                                                    languages=["es"], drops=counted))  # fmt: skip
    assert counted == {("en", "language_not_requested"): len(fx.ULTRAFEEDBACK_ROWS)}


def test_every_adapter_is_known_to_the_schema():
    assert set(PREFERENCE_ADAPTERS) == {"preference_jsonl", "helpsteer3", "ultrafeedback_binarized"}
    entry = {"licence": "x", "adapter": "nope", "origin": {"kind": "local", "files": ["a"]}, "counts": {"ca": 1}}
    with pytest.raises(ValueError, match="not a preference adapter"):
        PreferenceConfig.model_validate(
            {"name": "n", "format": "preference", "internal_dir": "i", "prepared_root": "r", "datasets": {"d": entry}}
        )


# -------------------------------------------------------------------------------------------- prepare


def _pair(i: int, lang: str, words: int = 3, tag: str = "q") -> dict:
    answer = f"answer {i} " + " ".join(["ok"] * words)
    return {"id": f"{tag}{lang}{i}", "language": lang, "prompt": f"{tag} {lang} question {i}?", "chosen": answer,
            "rejected": answer.upper()}  # fmt: skip


def _write(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return str(path)


def _config(tmp_path: Path, datasets: dict, **kw) -> PreferenceConfig:
    data = {"name": "prefs", "format": "preference", "internal_dir": str(tmp_path),
            "prepared_root": str(tmp_path / "prepared"), "datasets": datasets, **kw}  # fmt: skip
    return PreferenceConfig.model_validate(data)


def _dataset(file: str, counts: dict, licence: str = "CC0-1.0") -> dict:
    return {"licence": licence, "adapter": "preference_jsonl", "origin": {"kind": "local", "files": [file]},
            "counts": counts}  # fmt: skip


@pytest.fixture
def small_set(tmp_path) -> PreferenceConfig:
    """Two local datasets: ``a`` with 8 usable pairs in ca and en and every kind of bad row; ``b`` with 3 usable ca
    pairs and one that ``a`` has already."""
    ca, en = [_pair(i, "ca") for i in range(8)], [_pair(i, "en") for i in range(8)]
    bad = [
        {**_pair(90, "ca"), "chosen": ""},  # empty chosen answer
        {**_pair(91, "ca"), "rejected": _pair(91, "ca")["chosen"]},  # identical answers
        {**_pair(92, "ca"), "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]},
        {**ca[0], "id": "copy-of-ca0"},  # duplicate pair (same prompt and answers, another id)
        {**en[1], "id": "copy-of-en1"},
        "{not json",  # invalid JSON
        {**_pair(93, "ca"), "language": "de"},  # a language outside the six
        _pair(94, "pt"),  # not requested
    ]
    a = _write(tmp_path / "a.jsonl", ca + en + bad)
    b = _write(tmp_path / "b.jsonl", [_pair(i, "ca", tag="b") for i in range(3)] + [{**ca[0], "id": "b-dup"}])
    return _config(tmp_path, {"a": _dataset(a, {"ca": 6, "en": 6}), "b": _dataset(b, {"ca": 2})}, val_fraction=0.2)


def _language(requested, selected, val, val_requested, candidates, dropped, unselected=0, repeated=0, shortfall=0):
    return {"requested": requested, "selected": selected, "repeated": repeated, "shortfall": shortfall, "val": val,
            "val_requested": val_requested, "val_shortfall": val_requested - val, "candidates": candidates,
            "dropped": dropped, "unselected": unselected}  # fmt: skip


def test_prepare_selects_exact_counts_and_counts_every_drop(small_set, tk, tmp_path):
    out = prepare_preferences(small_set, tk, max_tokens=256, seed=0, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["datasets"] == {
        "a": {
            "ca": _language(6, 6, 2, 2, 12, {"empty chosen answer": 1, "identical answers": 1,
                                             "prompt does not end with a user turn": 1, "duplicate pair": 1}),
            "en": _language(6, 6, 2, 2, 9, {"duplicate pair": 1}),
        },
        "b": {"ca": _language(2, 2, 1, 1, 4, {"duplicate of dataset 'a'": 1})},
    }  # fmt: skip
    assert m["sources"]["a"]["other_drops"] == {
        "pt: language_not_requested": 1, "unknown: invalid JSON": 1, "unknown: unknown_language": 1
    }  # fmt: skip
    assert (m["sources"]["a"]["input_rows"], m["sources"]["b"]["input_rows"]) == (24, 4)
    assert m["totals"] == {"requested": 14, "selected": 14, "repeated": 0, "shortfall": 0, "val": 5,
                           "val_requested": 5, "val_shortfall": 0, "input_rows": 28, "candidates": 25,
                           "dropped": 9, "unselected": 0}  # fmt: skip
    train, val, manifest = load_prepared_preferences(out)
    assert manifest == m and (len(train), len(val)) == (14, 5)
    assert all(set(r) == {"id", "chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask"}
               for r in train + val)  # fmt: skip
    ids = [r["id"] for r in train + val]
    assert len(set(ids)) == 19 and "a-copy-of-ca0" not in ids and "b-b-dup" not in ids
    assert Counter(i.rstrip("0123456789") for i in ids) == {"a-qca": 8, "a-qen": 8, "b-bca": 3}


def test_parquet_columns_and_stored_tokens_equal_tokenize_preferences(small_set, tk):
    out = prepare_preferences(small_set, tk, max_tokens=256, seed=0, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == {"train": ["train-00000.parquet"], "val": ["val-00000.parquet"]}
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-00000.parquet", "val-00000.parquet"]
    for split in ("train", "val"):
        table = pq.read_table(out / f"{split}-00000.parquet")
        assert {f.name: f.type for f in table.schema} == COLUMN_TYPES
        assert table.column_names == list(COLUMN_TYPES)
        rows = table.to_pylist()
        toks = tokenize_preferences(tk, [(json.loads(r["prompt"]), r["chosen"], r["rejected"]) for r in rows])
        for r, (chosen, rejected) in zip(rows, toks):
            assert (r["chosen_input_ids"], r["chosen_loss_mask"]) == (chosen.input_ids, chosen.loss_mask)
            assert (r["rejected_input_ids"], r["rejected_loss_mask"]) == (rejected.input_ids, rejected.loss_mask)
            assert r["rejected"] == r["chosen"].upper() and r["source"] in ("a", "b")
    train, _, _ = load_prepared_preferences(out)
    first = pq.read_table(out / "train-00000.parquet").to_pylist()
    assert [r["id"] for r in train] == [r["id"] for r in first]
    assert train[0]["chosen_input_ids"] == first[0]["chosen_input_ids"]


def test_manifest_fields(small_set, tk):
    out = prepare_preferences(small_set, tk, max_tokens=256, seed=3, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert (m["name"], m["format"], m["seed"], m["max_tokens"], m["val_fraction"]) == ("prefs", "preference", 3, 256,
                                                                                        0.2)  # fmt: skip
    assert m["key"] == cache_key(small_set, tk, 256, 3) and out.name == f"prefs-{m['key'][:16]}"
    assert m["tokenizer"]["sha256"] == tokenizer_hash(tk) and m["tokenizer"]["vocab_size"] == 1024
    assert m["template_sha256"] == TEMPLATE_SHA256
    train, _, _ = load_prepared_preferences(out)
    for side in ("chosen", "rejected"):
        lengths = sorted(len(r[f"{side}_input_ids"]) for r in train)
        assert m["tokens"][side] == {"count": 14, "total": sum(lengths), "mean": round(sum(lengths) / 14, 1),
                                     "p50": lengths[7], "p95": lengths[13], "max": lengths[13]}  # fmt: skip
    file = small_set.datasets["a"].origin.files[0]
    assert m["sources"]["a"]["revisions"] == [
        {"file": str(Path(file).resolve()), "sha256": hashlib.sha256(Path(file).read_bytes()).hexdigest()}
    ]


def test_second_prepare_is_a_cache_hit_and_a_new_seed_a_new_key(small_set, tk, monkeypatch):
    first = prepare_preferences(small_set, tk, max_tokens=256, seed=0, progress=False)
    created = json.loads((first / "manifest.json").read_text())["created"]

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although the inputs are unchanged")

    monkeypatch.setattr(preference, "_build", no_build)
    assert prepare_preferences(small_set, tk, max_tokens=256, seed=0, progress=False) == first
    assert json.loads((first / "manifest.json").read_text())["created"] == created
    assert cache_key(small_set, tk, 256, 1) != cache_key(small_set, tk, 256, 0)
    assert cache_key(small_set, tk, 128, 0) != cache_key(small_set, tk, 256, 0)
    with pytest.raises(AssertionError, match="rebuilt"):  # a new seed is a new build
        prepare_preferences(small_set, tk, max_tokens=256, seed=1, progress=False)
    monkeypatch.undo()
    other = prepare_preferences(small_set, tk, max_tokens=256, seed=1, progress=False)
    assert other != first and other.parent == first.parent
    ids = {d: [r["id"] for r in load_prepared_preferences(d)[0]] for d in (first, other)}
    assert ids[first] != ids[other]  # another seed, another selection and order
    # The training order interleaves datasets and languages (three groups here) rather than keeping them in blocks.
    groups = [i.rstrip("0123456789") for i in ids[first]]
    assert sum(a != b for a, b in itertools.pairwise(groups)) > 2


def test_shortfall_error_names_dataset_language_need_have_and_the_fix(tmp_path, tk):
    file = _write(tmp_path / "s.jsonl", [_pair(i, "ca") for i in range(5)] + [{**_pair(9, "ca"), "chosen": " "}])
    cfg = _config(tmp_path, {"s": _dataset(file, {"ca": 8})}, val_fraction=0.0)
    with pytest.raises(PreferenceError) as err:
        prepare_preferences(cfg, tk, 256, 0, progress=False)
    msg = str(err.value)
    assert "dataset 's' language ca: need 8 training pairs (+0 validation), have 5 usable" in msg
    assert "empty chosen answer x1" in msg
    assert "data.on_shortfall=repeat" in msg and "data.on_shortfall=take_all" in msg
    assert not [p for p in (tmp_path / "prepared").iterdir() if not p.name.startswith(".lock")]  # nothing kept


def test_shortfall_repeat_reuses_pairs(tmp_path, tk):
    file = _write(tmp_path / "s.jsonl", [_pair(i, "ca") for i in range(5)])
    cfg = _config(tmp_path, {"s": _dataset(file, {"ca": 8})}, val_fraction=0.0, on_shortfall="repeat")
    out = prepare_preferences(cfg, tk, 256, 0, progress=False)
    train, val, m = load_prepared_preferences(out)
    assert m["datasets"]["s"]["ca"] == _language(8, 5, 0, 0, 5, {}, repeated=3)
    ids = sorted(r["id"] for r in train)
    assert len(train) == 8 and not val and len([i for i in ids if "#r1" in i]) == 3
    assert source_for(load_config(["stage=dpo_tiny", "data=dpo_sample"]).data).count(None, m, None).train == 8


def test_take_all_keeps_what_fits_and_drops_long_pairs(tmp_path, tk):
    # one pair too long on both sides, one whose rejected answer alone is too long: either is dropped
    rows = [_pair(i, "en") for i in range(3)] + [_pair(10, "en", words=80), {**_pair(11, "en"), "rejected": "NO " * 80}]
    file = _write(tmp_path / "s.jsonl", rows)
    cfg = _config(tmp_path, {"s": _dataset(file, {"en": 10})}, on_shortfall="take_all")
    out = prepare_preferences(cfg, tk, 64, 0, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["datasets"]["s"]["en"] == _language(10, 3, 0, 1, 5, {"longer than 64 tokens": 2}, shortfall=7)
    assert m["totals"]["selected"] == 3 and m["tokens"]["rejected"]["max"] <= 64


def test_missing_internal_files_stop_or_are_recorded(tmp_path, tk):
    good = _write(tmp_path / "g.jsonl", [_pair(i, "en") for i in range(4)])
    datasets = {"g": _dataset(good, {"en": 3}), "internal": _dataset(str(tmp_path / "nope.jsonl"), {"ca": 5})}
    with pytest.raises(PreferenceError, match=r"internal: .*nope.jsonl.*allow_missing_internal=true"):
        prepare_preferences(_config(tmp_path, datasets), tk, 256, 0, progress=False)
    assert plan(_config(tmp_path, datasets))["datasets"]["internal"]["missing_files"] == [str(tmp_path / "nope.jsonl")]
    out = prepare_preferences(_config(tmp_path, datasets, allow_missing_internal=True), tk, 256, 0, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["datasets"]["internal"]["ca"]["shortfall"] == 5 and m["sources"]["internal"]["missing_files"]
    assert (m["totals"]["selected"], m["totals"]["val"]) == (3, 1)


def test_excluded_licences_are_left_out(tmp_path, tk):
    a = _write(tmp_path / "a.jsonl", [_pair(i, "en") for i in range(4)])
    b = _write(tmp_path / "b.jsonl", [_pair(i, "en", tag="b") for i in range(4)])
    datasets = {"a": _dataset(a, {"en": 3}), "b": _dataset(b, {"en": 3}, licence="NC")}
    cfg = _config(tmp_path, datasets, exclude_licenses=["NC"])
    p = plan(cfg)
    assert (p["total"], p["val_total"], p["datasets"]["b"]["excluded_by_licence"]) == (3, 1, True)
    m = json.loads((prepare_preferences(cfg, tk, 256, 0, progress=False) / "manifest.json").read_text())
    assert list(m["datasets"]) == ["a"] and m["sources"]["b"] == {"excluded_by_licence": "NC", "requested": {"en": 3}}


# ------------------------------------------------------------------------------------ toy pairs and CLI


def test_the_toy_pairs_follow_their_rule():
    rows = [json.loads(line) for line in sample_path("dpo_sample.jsonl").read_text(encoding="utf-8").splitlines()]
    assert Counter(r["language"] for r in rows) == dict.fromkeys(("ca", "en", "es", "eu", "gl", "pt"), 50)
    assert [r["id"] for r in rows] == [f"{lang}-{i:04d}" for lang in ("ca", "en", "es", "eu", "gl", "pt")
                                       for i in range(1, 51)]  # fmt: skip
    assert len({r["prompt"] for r in rows}) == 300
    for r in rows:
        assert r["rejected"] == r["chosen"].upper() != r["chosen"]  # the rule: the same sentence, in UPPERCASE
        assert r["chosen"][0].isupper() or r["chosen"][0].isdigit()
        assert r["chosen"].endswith(".") and r["prompt"].endswith("?") and len(r["chosen"]) < 60


def test_the_composed_dpo_config_validates():
    cfg = load_config(["stage=dpo_tiny", "data=dpo_sample"])
    assert (cfg.stage.kind, cfg.data.format, cfg.data.name) == ("dpo", "preference", "dpo_sample")
    assert dict(cfg.data.datasets["dpo-sample"].counts) == dict.fromkeys(("ca", "en", "es", "eu", "gl", "pt"), 47)
    source = source_for(cfg.data)
    assert (source.format, source.unit, source.stage_kind, source.cached) == ("preference", "pairs", "dpo", True)
    from alia_nemo.config.resolve import resolve

    r = resolve(cfg)
    assert (r.train_rows, r.val_rows, r.max_tokens, r.unit) == (282, 18, 256, "pairs")
    mix = load_config(["stage=dpo", "data=preference_mixture"]).data
    assert {n: d.adapter for n, d in mix.datasets.items()} == {
        "helpsteer3": "helpsteer3",
        "ultrafeedback-binarized": "ultrafeedback_binarized",
    }


def test_cli_prepares_the_toy_pairs(tmp_path):
    env = {**os.environ, "ALIA_NEMO_PREPARED": str(tmp_path / "prepared")}
    cli = Path(sys.executable).with_name("alia-nemo")
    cmd = [str(cli), "prepare", "stage=dpo_tiny", "data=dpo_sample", "--json"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert (result["train_rows"], result["val_rows"]) == (282, 18)
    assert result["totals"]["dropped"] == 0 and result["totals"]["input_rows"] == 300
    directory = Path(result["prepared"])
    assert directory.parent == tmp_path / "prepared" and directory.name.startswith("dpo_sample-")
    train, val, _ = load_prepared_preferences(directory)
    assert (len(train), len(val)) == (282, 18)
