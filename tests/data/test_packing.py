"""Token packing: exact windows, nothing lost or repeated, boundaries, tail policies, laziness, caching."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alia_nemo.config.schema import TextCorpusConfig
from alia_nemo.data.corpus import CorpusError, quotas
from alia_nemo.data.packing import PackReport, load_packed, pack_windows, prepare_corpus


def _docs(lengths, start=10):
    out, t = [], start
    for n in lengths:
        out.append([*range(t, t + n - 1), 2])  # ends with EOS (id 2) like the real stream
        t += n
    return out


def _rebuild(windows):
    """Documents back from windows, using only doc_starts / continues / valid_length."""
    docs: list[list[int]] = []
    for w in windows:
        ids = w.input_ids[: w.valid_length].tolist()
        bounds = [*w.doc_starts, w.valid_length]
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            if i == 0 and w.continues:
                docs[-1] += ids[a:b]
            else:
                docs.append(ids[a:b])
    return docs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=40), st.integers(1, 33))
def test_windows_plus_tail_are_the_stream_and_boundaries_rebuild_documents(lengths, seq):
    docs = _docs(lengths)
    report = PackReport(seq, "drop")
    windows = list(pack_windows(docs, seq, report))
    stream = [t for d in docs for t in d]
    assert all(len(w.input_ids) == seq and w.valid_length == seq for w in windows)
    assert [t for w in windows for t in w.input_ids.tolist()] + report.tail == stream
    assert len(windows) == len(stream) // seq and len(report.tail) == len(stream) % seq == report.tail_tokens
    assert report.documents == len(docs) and report.stream_tokens == len(stream) and report.pad_tokens == 0
    padded = list(pack_windows(docs, seq, tail="pad", pad_id=3))
    rebuilt = _rebuild(padded)
    assert rebuilt == docs  # every document boundary is where it was, across window edges too
    assert all(w.doc_starts[0] == 0 and w.doc_starts == sorted(set(w.doc_starts)) for w in padded)


def test_known_layout_and_padding():
    docs = _docs([3, 5, 2])  # stream of 10 tokens
    report = PackReport(4, "pad")
    w = list(pack_windows([("a", docs[0]), ("b", docs[1]), ("c", docs[2])], 4, report, tail="pad", pad_id=3))
    assert [x.doc_starts for x in w] == [[0, 3], [0], [0]]
    # a a a b | b b b b | c c _ _ : b ends exactly at the second window's edge, so c opens the third.
    assert [x.continues for x in w] == [False, True, False]
    assert [x.sources for x in w] == [["a", "b"], ["b"], ["c"]]
    assert w[2].input_ids.tolist() == docs[2] + [3, 3] and w[2].valid_length == 2
    assert report.pad_tokens == 2 and report.tail_tokens == 2 and report.windows == 3
    assert report.summary()["real_token_fraction"] == pytest.approx(10 / 12)


def test_a_document_starting_mid_window_is_a_boundary():
    docs = _docs([2, 2, 4])
    w = list(pack_windows(docs, 4))
    assert [x.doc_starts for x in w] == [[0, 2], [0]] and [x.continues for x in w] == [False, False]


def test_packing_is_lazy_over_an_endless_stream():
    consumed = 0

    def endless():
        nonlocal consumed
        while True:
            consumed += 1
            yield np.arange(1000, dtype=np.int32)

    first = list(itertools.islice(pack_windows(endless(), 4096), 3))
    assert len(first) == 3 and consumed <= 13  # 3 windows need 12.3 documents, read one at a time


def test_quotas_follow_weights_exactly():
    corpus = _corpus_config({"a": {"weight": 3.0}, "b": {"weight": 1.0}}, "/tmp")
    assert quotas(corpus, 1000) == {"a": 750, "b": 250}
    q = quotas(_corpus_config({"a": {}, "b": {}, "c": {}}, "/tmp"), 100)
    assert sum(q.values()) == 100 and sorted(q.values()) == [33, 33, 34]


def _corpus_config(sources: dict, root, **kw) -> TextCorpusConfig:
    full = {
        name: {"kind": "local", "files": ["unused.jsonl"], "text_field": "text", **src} for name, src in sources.items()
    }
    return TextCorpusConfig(name="t", format="text_corpus", prepared_root=str(root), sources=full, **kw)


def _write_jsonl(path: Path, texts, field="text"):
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t}, ensure_ascii=False) + "\n")
    return str(path)


def test_prepare_corpus_counts_drops_caches_and_is_deterministic(tok, tmp_path):
    good = [f"Document {i}: el gat dorm al sol i la gata també." for i in range(60)]
    a = _write_jsonl(tmp_path / "a.jsonl", good)
    b = tmp_path / "b.jsonl"
    b.write_text('{"text": ""}\n{"other": "x"}\nnot json\n' + "".join(json.dumps({"text": t}) + "\n" for t in good))
    corpus = _corpus_config({"a": {"files": [a], "weight": 1.0}, "b": {"files": [str(b)], "weight": 1.0}},
                            tmp_path / "prep", val_windows=1, on_shortfall="take_all")  # fmt: skip
    d1 = prepare_corpus(corpus, tok, 64, 1024, seed=5, progress=False)
    manifest = json.loads((d1 / "manifest.json").read_text())
    assert manifest["sources"]["b"]["dropped"] == {"empty text": 1, "no text in field 'text'": 1, "invalid JSON": 1}
    assert manifest["val_windows"] == 1 and manifest["train_windows"] == manifest["train_windows_needed"] == 16
    train, val, _ = load_packed(d1)
    assert len(train) == 16 and len(val) == 1 and all(len(r["input_ids"]) == 64 for r in train)
    assert train[0]["labels"] == train[0]["input_ids"]  # every token trained
    mtime = (d1 / "manifest.json").stat().st_mtime_ns
    assert prepare_corpus(corpus, tok, 64, 1024, seed=5, progress=False) == d1  # cache hit: nothing rebuilt
    assert (d1 / "manifest.json").stat().st_mtime_ns == mtime
    other = tmp_path / "other"
    again = prepare_corpus(corpus.model_copy(update={"prepared_root": str(other)}), tok, 64, 1024, 5, progress=False)
    assert load_packed(again)[0] == train  # same inputs, fresh build: identical windows
    reseeded = prepare_corpus(corpus, tok, 64, 1024, seed=6, progress=False)
    assert reseeded != d1 and load_packed(reseeded)[0] != train  # the seed changes the interleaving
    assert not list((tmp_path / "prep").glob(".tmp-*"))


def test_shortfall_policies(tok, tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", ["un document curt."] * 5)
    corpus = _corpus_config({"a": {"files": [a]}}, tmp_path / "p")
    with pytest.raises(CorpusError, match=r"the stage needs 10.*on_shortfall=repeat"):
        prepare_corpus(corpus, tok, 32, 320, seed=0, progress=False)
    rep = prepare_corpus(corpus.model_copy(update={"on_shortfall": "repeat"}), tok, 32, 320, seed=0, progress=False)
    m = json.loads((rep / "manifest.json").read_text())
    assert m["train_windows"] == 10 and m["sources"]["a"]["passes"] >= 2
    took = prepare_corpus(corpus.model_copy(update={"on_shortfall": "take_all"}), tok, 32, 320, 0, progress=False)
    m = json.loads((took / "manifest.json").read_text())
    assert m["shortfall_windows"] == 10 - m["train_windows"] > 0


def test_repeat_stops_when_a_pass_gives_no_text_long_enough(tok, tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", ["curt", "massa curt"])
    corpus = _corpus_config({"a": {"files": [a]}}, tmp_path / "p", on_shortfall="repeat", min_chars=50)
    with pytest.raises(CorpusError, match=r"packed no training window.*'shorter than min_chars=50': 2"):
        prepare_corpus(corpus, tok, 32, 320, seed=0, progress=False)  # read once, not forever


def test_jsonl_parquet_arrow_and_hub_folder_read_the_same(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alia_nemo.config.schema import CorpusSourceConfig
    from alia_nemo.data.corpus import SourceStats, documents

    texts = [f"text {i} amb accents: àéíòú" for i in range(50)]
    _write_jsonl(tmp_path / "d.jsonl", texts, field="body")
    table = pa.table({"body": texts})
    pq.write_table(table, tmp_path / "d.parquet")
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    hub = tmp_path / "hub"
    hub.mkdir()
    pq.write_table(table, hub / "train-00000.parquet")
    for src in (
        {"kind": "local", "files": [str(tmp_path / "d.jsonl")]},
        {"kind": "local", "files": [str(tmp_path / "d.parquet")]},
        {"kind": "local", "files": [str(tmp_path / "*.arrow")]},
        {"kind": "hf", "path": str(hub)},  # datasets, streaming=True, from a local folder (no network)
    ):
        cfg = CorpusSourceConfig(text_field="body", **src)
        assert list(documents("s", cfg, SourceStats(), repeat=False)) == texts
    with pytest.raises(CorpusError, match="matches no file"):
        list(documents("s", CorpusSourceConfig(kind="local", files=[str(tmp_path / "*.none")]), SourceStats(), False))
