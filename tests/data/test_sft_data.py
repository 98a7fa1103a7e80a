"""Reading, checking, splitting and tokenising SFT conversations; every dropped row is counted."""

from __future__ import annotations

import json

import pytest

from alia_nemo.config.schema import DataConfig
from alia_nemo.data.loading import DataError, prepare_sft, read_conversations, split_train_val
from alia_nemo.sample_data import sample_path


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _conv(i, answer="Bé.", user="Com estàs?"):
    return {
        "id": f"c{i}",
        "language": "ca",
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
    }


def test_bundled_sample_is_as_documented():
    rows = [json.loads(line) for line in sample_path().read_text().splitlines()]
    assert len(rows) == 300
    by_lang = {}
    for r in rows:
        by_lang[r["language"]] = by_lang.get(r["language"], 0) + 1
    assert by_lang == {lang: 50 for lang in ("ca", "en", "es", "eu", "gl", "pt")}
    convs, dropped = read_conversations([str(sample_path())])
    assert len(convs) == 300 and not dropped
    assert sum(c.messages[0]["role"] == "system" for c in convs) >= 30
    assert sum(len(c.messages) > 3 for c in convs) >= 30


def test_invalid_row_stops_with_file_line_and_fix(tmp_path):
    f = _write(tmp_path / "d.jsonl", [_conv(1), {"id": "bad", "messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: conversation 'bad': no assistant turn.*data\.on_invalid=drop"):
        read_conversations([f])


def test_invalid_rows_dropped_and_counted_by_reason(tmp_path):
    f = _write(
        tmp_path / "d.jsonl",
        [
            _conv(1),
            "{not json",
            {"id": "r", "messages": [{"role": "robot", "content": "x"}]},
            {"no_messages": 1},
            _conv(2),
            {"id": "u", "messages": [{"role": "user", "content": "q"}]},
        ],
    )
    convs, dropped = read_conversations([f], on_invalid="drop")
    assert [c.id for c in convs] == ["c1", "c2"]
    assert dropped == {
        "invalid JSON": 1,
        "message 0 has unknown role 'robot'": 1,
        "row must be a JSON object with a 'messages' list": 1,
        "no assistant turn to train": 1,
    }


def test_duplicate_ids_across_files_are_an_error(tmp_path):
    a = _write(tmp_path / "a.jsonl", [_conv(1)])
    b = _write(tmp_path / "b.jsonl", [_conv(1)])
    with pytest.raises(DataError, match="duplicate id"):
        read_conversations([a, b])


def test_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match=r"'.*nope\.jsonl' does not exist; fix data\.files"):
        read_conversations([str(tmp_path / "nope.jsonl")])


def test_split_is_seeded_disjoint_and_complete():
    convs, _ = read_conversations([str(sample_path())])
    train, val = split_train_val(convs, 0.1, seed=7)
    assert len(val) == 30 and len(train) == 270
    assert not {c.id for c in train} & {c.id for c in val}
    assert [c.id for c in split_train_val(convs, 0.1, seed=7)[1]] == [c.id for c in val]
    assert [c.id for c in split_train_val(convs, 0.1, seed=8)[1]] != [c.id for c in val]
    assert split_train_val(convs, 0.0, seed=7)[1] == []


def test_overlong_conversations_dropped_and_counted(tmp_path, tok):
    f = _write(tmp_path / "d.jsonl", [_conv(1), _conv(2, answer="molt " * 200), _conv(3)])
    data = DataConfig(name="t", files=[f], val_fraction=0.0)
    prepared = prepare_sft(data, tok, seq_length=64, seed=0)
    assert prepared.report["conversations_read"] == 3
    assert prepared.report["train"] == 2
    assert prepared.report["dropped"] == {"longer than stage.seq_length=64 tokens": 1}
    assert all(len(r["input_ids"]) <= 64 for r in prepared.train)


def test_prepared_rows_carry_labels_only_on_answers(tmp_path, tok):
    f = _write(tmp_path / "d.jsonl", [_conv(1, answer="Molt bé, gràcies.")])
    prepared = prepare_sft(DataConfig(name="t", files=[f]), tok, seq_length=256, seed=0)
    row = prepared.train[0]
    trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert tok.decode(trained) == "Molt bé, gràcies.<|im_end|>"
    assert prepared.report["train_trained_tokens"] == len(trained)
    assert prepared.report["train_tokens"] == len(row["input_ids"])


def test_nothing_left_is_an_error(tmp_path, tok):
    f = _write(tmp_path / "d.jsonl", [_conv(1, answer="molt " * 100)])
    with pytest.raises(DataError, match="no training conversation left"):
        prepare_sft(DataConfig(name="t", files=[f]), tok, seq_length=16, seed=0)
