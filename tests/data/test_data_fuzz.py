"""Fuzzing every data path with random file contents: JSON values of any shape (rows almost like conversations
among them) and random bytes, through `alia-nemo prepare` (a one-dataset mixture), `alia-nemo train data=jsonl`
(stopped after its data preparation) and `alia-nemo prepare` of a CPT corpus.

The only outcomes allowed: exit 0 with every row accounted for (rows in == kept + dropped, from the manifest or
the data report), or exit 2 with one error line. Exit 1 ("internal error") is a bug.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alia_nemo.cli import main
from tests.data.test_data_faults import (
    assert_clean_exit,
    assert_corpus_balanced,
    assert_mixture_balanced,
    corpus_argv,
    data_only_train,
    jsonl_train_argv,
    mixture_argv,
)

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
words = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30)
parts = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", ""]), "text": words | json_values}),
    max_size=3,
)
contents = st.one_of(words, words, st.none(), parts, json_values)
roles = st.sampled_from(["user", "assistant", "system", "user", "assistant", "bot", "", None, 3])
messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": roles, "content": contents}), max_size=5),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": words}), max_size=4),
    json_values,
)
languages = st.one_of(st.sampled_from(["ca", "en", "es", "eu", "gl", "pt", "pt-BR", "Basque", "de", "", "xx-YY"]),
                      json_values)  # fmt: skip
# A conversation that is valid, so that some examples keep rows.
valid = st.builds(
    lambda i, lang, q, a: {"id": i, "language": lang, "messages": [{"role": "user", "content": q},
                                                                   {"role": "assistant", "content": a}]},
    st.text(max_size=6), st.sampled_from(["ca", "en", "es", "eu", "gl", "pt"]), words, words,
)  # fmt: skip
almost = st.fixed_dictionaries(
    {"messages": messages}, optional={"id": st.text(max_size=6) | json_values, "language": languages}
)
documents = st.one_of(st.fixed_dictionaries({"text": words}), st.fixed_dictionaries({"text": json_values}),
                      st.dictionaries(st.text(max_size=6), json_values, max_size=3))  # fmt: skip


def _line(row_strategy):
    return st.one_of(
        row_strategy.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.binary(max_size=30),
    )


def file_contents(row_strategy) -> st.SearchStrategy[bytes]:
    """Lines of rows, other JSON, text and bytes (a BOM in front sometimes), or a file of random bytes."""
    lines = st.lists(_line(row_strategy), max_size=12).map(lambda ls: b"\n".join(x.replace(b"\n", b" ") for x in ls))
    with_bom = st.tuples(st.sampled_from([b"", b"", b"\xef\xbb\xbf"]), lines, st.sampled_from([b"", b"\n"]))
    return st.one_of(with_bom.map(lambda t: t[0] + t[1] + t[2]), st.binary(max_size=200))


def rows_in(data: bytes) -> int:
    """Non-blank lines of a JSONL file as the readers count them (an undecodable line is a row, a bad one)."""
    count = 0
    for raw in data.split(b"\n"):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            count += 1
            continue
        if text.startswith("\ufeff"):
            text = text[1:]
        count += bool(text.strip())
    return count


def _run(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert_clean_exit(argv[0], rc, err)
    return rc, out


@SETTINGS
@given(
    data=file_contents(st.one_of(valid, almost)), policy=st.sampled_from(["take_all", "take_all", "repeat", "error"])
)
def test_fuzz_prepare_mixture(capsys, data, policy):
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "fuzz.jsonl"
        f.write_bytes(data)
        rc, out = _run(mixture_argv(Path(tmp), [str(f)], f"data.on_shortfall={policy}", "data.val_fraction=0.1"),
                       capsys)  # fmt: skip
        if rc == 0:
            manifest = json.loads((Path(json.loads(out)["prepared"]) / "manifest.json").read_text())
            r = assert_mixture_balanced(manifest)
            assert r["input_rows"] == rows_in(data)
            for s in r["languages"].values():
                assert s["requested"] == s["selected"] + s["repeated"] + s["shortfall"]
                assert s["val_requested"] == s["val"] + s["val_shortfall"]


@SETTINGS
@given(data=file_contents(st.one_of(valid, almost)), on_invalid=st.sampled_from(["drop", "drop", "error"]),
       val=st.sampled_from(["0", "0.3"]))  # fmt: skip
def test_fuzz_train_jsonl_data(capsys, data, on_invalid, val):
    with tempfile.TemporaryDirectory() as tmp, data_only_train() as reports:
        f = Path(tmp) / "fuzz.jsonl"
        f.write_bytes(data)
        rc, _ = _run([*jsonl_train_argv(Path(tmp), [str(f)], on_invalid), f"data.val_fraction={val}"], capsys)
        if rc == 0:
            r = reports[0]
            assert r["conversations_read"] == r["train"] + r["val"] + sum(r["dropped"].values()) == rows_in(data)
            assert r["train"] > 0


@SETTINGS
@given(data=file_contents(documents), policy=st.sampled_from(["take_all", "repeat", "error"]))
def test_fuzz_cpt_corpus(capsys, data, policy):
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "fuzz.jsonl"
        f.write_bytes(data)
        rc, out = _run(corpus_argv(Path(tmp), [str(f)], f"data.on_shortfall={policy}"), capsys)
        if rc == 0:
            manifest = json.loads((Path(json.loads(out)["prepared"]) / "manifest.json").read_text())
            s = assert_corpus_balanced(manifest)
            assert s["records"] <= rows_in(data) * max(1, s["passes"] + 1)
            assert manifest["train_windows"] > 0
