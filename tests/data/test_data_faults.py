"""Bad input on every data path (mixture `prepare`, `train data=jsonl`, the CPT corpus): nothing lost, nothing
silently wrong. Each test reproduces one reported failure; through the CLI, the outcome is exit 0 with every row
accounted for, or exit 2 with one line naming the file (or dataset) and the fix, never a traceback (exit 1).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from alia_nemo.cli import main
from alia_nemo.config.schema import DataConfig, MixtureConfig, TextCorpusConfig
from alia_nemo.data.cache import clean_stale_tmp, sha256_file
from alia_nemo.data.corpus import CorpusError, SourceStats, documents
from alia_nemo.data.loading import DataError, prepare_sft, read_conversations
from alia_nemo.data.mixture import MixtureError, cache_key, load_prepared, prepare_mixture
from alia_nemo.data.packing import prepare_corpus
from alia_nemo.data.reader import read_local_rows
from alia_nemo.locks import DirLock

# ------------------------------------------------------------------------------------------- helpers


def conv(i: int, lang: str = "ca", user: Any = None, answer: Any = None, **extra: Any) -> dict:
    """A valid conversation row (or one with the given user / answer contents)."""
    return {
        "id": f"r{lang}{i}",
        "language": lang,
        "messages": [
            {"role": "user", "content": f"Pregunta {lang} {i}?" if user is None else user},
            {"role": "assistant", "content": f"Resposta {i}." if answer is None else answer},
        ],
        **extra,
    }


def write_lines(path: Path, lines: list[Any]) -> str:
    """A JSONL file: dicts and other JSON values dumped, str written as is, bytes written raw."""
    out = b""
    for line in lines:
        if isinstance(line, bytes):
            out += line
        elif isinstance(line, str):
            out += line.encode()
        else:
            out += json.dumps(line, ensure_ascii=False).encode()
        out += b"\n"
    path.write_bytes(out)
    return str(path)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``alia-nemo argv``; a nonzero exit must be exactly one error line."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert_clean_exit(argv[0], rc, err)
    return rc, out, err


def assert_clean_exit(command: str, rc: int, err: str) -> None:
    """Exit 0, or exit 2 with one `alia-nemo CMD: error: ...` line; never an internal error or a traceback."""
    assert "Traceback" not in err and "internal error" not in err, err[-3000:]
    assert rc in (0, 2), (rc, err[-3000:])
    if rc == 2:
        # \r too: a progress bar's redraws are not lines of their own on a terminal
        lines = [line for line in re.split(r"[\r\n]", err) if line.startswith(f"alia-nemo {command}: error: ")]
        assert len(lines) == 1, err[-3000:]


def mixture_argv(tmp: Path, files: list[str], *extra: str) -> list[str]:
    """`prepare` of a one-dataset local mixture (the bundled sample's entry pointed at ``files``)."""
    return [
        "prepare",
        "data=sample",
        f"data.datasets.sample.origin.files=[{','.join(files)}]",
        f"data.prepared_root={tmp / 'prepared'}",
        "data.on_shortfall=take_all",
        "data.val_fraction=0",
        "--json",
        *extra,
    ]


def corpus_argv(tmp: Path, files: list[str], *extra: str) -> list[str]:
    """`prepare` of a one-source CPT corpus in windows of 8 tokens."""
    return [
        "prepare",
        "data=long_context",
        "stage=cpt_32k_tiny",
        "stage.seq_length=8",
        f"data.sources.long_documents.files=[{','.join(files)}]",
        f"data.prepared_root={tmp / 'prepared'}",
        "data.on_shortfall=take_all",
        "data.val_windows=0",
        "data.max_tokens=64",
        "--json",
        *extra,
    ]


REPORTS: list[dict] = []


def _data_only_run_local(cfg) -> dict:
    """`train`'s engine up to its data: tokenizer and load_for_training exactly as run_local calls them."""
    from alia_nemo.data.sources import load_for_training
    from alia_nemo.model.tokenizer import load_tokenizer

    data, _ = load_for_training(cfg, load_tokenizer(cfg.model.tokenizer, allow_download=cfg.model.allow_download))
    REPORTS.append(data.report)
    return {"train": {"global_step": 0}, "final_model": "-", "loss_plot": "-"}


@contextmanager
def data_only_train() -> Iterator[list[dict]]:
    """`alia-nemo train` runs its real checks and data preparation, then stops before training."""
    REPORTS.clear()
    with mock.patch("alia_nemo.engines.local.run_local", _data_only_run_local):
        yield REPORTS


def jsonl_train_argv(tmp: Path, files: list[str], on_invalid: str = "drop") -> list[str]:
    return [
        "train",
        "data=jsonl",
        f"data.files=[{','.join(files)}]",
        "data.val_fraction=0",
        f"data.on_invalid={on_invalid}",
        f"run.output_dir={tmp / 'run'}",
    ]


def prepared_manifest(out: str) -> dict:
    return json.loads((Path(json.loads(out)["prepared"]) / "manifest.json").read_text())


def assert_mixture_balanced(manifest: dict) -> dict:
    """Every row read became a conversation or is counted with a reason; return the dataset's report."""
    r = manifest["datasets"]["sample"]
    assert r["input_rows"] == r["converted"] + sum(r["adapter_drops"].values()), r
    for s in r["languages"].values():
        assert s["converted"] == s["selected"] + s["val"] + sum(s["dropped"].values()) + s["unselected"], s
    return r


def assert_corpus_balanced(manifest: dict) -> dict:
    s = manifest["sources"]["long_documents"]
    assert s["records"] == s["documents"] + s["unused_read_ahead"] + sum(s["dropped"].values()), s
    return s


def _mixture(tmp: Path, files: list[str], counts: dict | None = None, **kw: Any) -> MixtureConfig:
    datasets = {"d": {"licence": "x", "adapter": "messages", "origin": {"kind": "local", "files": files},
                      "counts": counts or {"ca": 2}}}  # fmt: skip
    data = {"name": "mini", "format": "mixture", "internal_dir": str(tmp), "prepared_root": str(tmp / "prepared"),
            "val_fraction": 0.0, "on_shortfall": "take_all", "datasets": datasets, **kw}  # fmt: skip
    return MixtureConfig.model_validate(data)


def _corpus(tmp: Path, files: list[str], **kw: Any) -> TextCorpusConfig:
    return TextCorpusConfig(
        name="t",
        format="text_corpus",
        prepared_root=str(tmp / "prepared"),
        sources={"s": {"kind": "local", "files": files, "text_field": "text"}},
        on_shortfall="take_all",
        **kw,
    )


# ------------------------------------------------------------------- 1. one content policy, both paths

CONTENTS = [
    [{"type": "text", "text": "Primera part."}, {"type": "text", "text": "Segona part."}],  # kept, joined
    {"type": "text", "text": "un dict"},  # not text
    [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],  # not text
    [{"type": "text", "text": "text"}, {"type": "image_url", "image_url": {"url": "u"}}],  # a part that is not
    42,  # not text
]


def test_list_content_is_joined_and_other_content_dropped_alike_by_prepare_and_jsonl(tmp_path, tok, capsys):
    rows = [conv(i, user=c) for i, c in enumerate(CONTENTS)] + [conv(9)]
    f = write_lines(tmp_path / "c.jsonl", rows)
    # prepare (the mixture): the text parts are joined, never the Python repr of the structure
    rc, out, _ = run_cli(mixture_argv(tmp_path, [f]), capsys)
    assert rc == 0
    manifest = prepared_manifest(out)
    r = assert_mixture_balanced(manifest)
    assert r["adapter_drops"] == {"ca: content_not_text": 4}
    assert r["languages"]["ca"]["selected"] == 2
    import pyarrow.parquet as pq

    directory = Path(json.loads(out)["prepared"])
    texts = [m["content"] for row in pq.read_table(directory / manifest["files"]["train"][0]).column("messages")
             .to_pylist() for m in json.loads(row)]  # fmt: skip
    assert "Primera part.\nSegona part." in texts
    assert not any("{'type'" in t or "[{" in t for t in texts)
    # data=jsonl: the same rows kept, the same rows dropped, under the same reason
    convs, dropped = read_conversations([f], on_invalid="drop")
    assert [c.id for c in convs] == ["rca0", "rca9"] and dropped == {"content_not_text": 4}
    assert convs[0].messages[0]["content"] == "Primera part.\nSegona part."
    with pytest.raises(DataError, match=r"c\.jsonl:2: conversation 'rca1': message 0 has a dict content"):
        read_conversations([f])


# ------------------------------------------------------------------- 2. the cache keys content, not mtime


def _same_size_same_mtime_edit(path: Path, old: bytes, new: bytes) -> None:
    st = path.stat()
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_same_size_same_mtime_edit_rebuilds_the_mixture_cache(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    write_lines(f, [conv(1, answer="Resposta AAAA."), conv(2)])
    mix = _mixture(tmp_path, [str(f)])
    first = prepare_mixture(mix, tok, 256, 0, progress=False)
    _same_size_same_mtime_edit(f, b"AAAA", b"BBBB")
    second = prepare_mixture(mix, tok, 256, 0, progress=False)
    assert second != first  # the old code keyed size + mtime and returned the stale build
    revision = json.loads((second / "manifest.json").read_text())["datasets"]["d"]["revisions"][0]
    assert revision["sha256"] == sha256_file(str(f))
    assert any("BBBB" in json.dumps(m) for m in _messages(second))


def _messages(directory: Path) -> list:
    import pyarrow.parquet as pq

    manifest = json.loads((directory / "manifest.json").read_text())
    return [json.loads(m) for name in manifest["files"]["train"]
            for m in pq.read_table(directory / name).column("messages").to_pylist()]  # fmt: skip


def test_same_size_same_mtime_edit_rebuilds_the_corpus_cache(tmp_path, tok):
    f = tmp_path / "c.jsonl"
    write_lines(f, [{"text": f"Document {i}: el gat dorm al sol AAAA."} for i in range(20)])
    corpus = _corpus(tmp_path, [str(f)])
    first = prepare_corpus(corpus, tok, 16, 64, 0, progress=False)
    _same_size_same_mtime_edit(f, b"Document 3: el gat dorm al sol AAAA", b"Document 3: el gat dorm al sol BBBB")
    assert prepare_corpus(corpus, tok, 16, 64, 0, progress=False) != first


def test_file_hash_streams_and_matches_hashlib(tmp_path):
    import hashlib

    f = tmp_path / "big.bin"
    f.write_bytes(os.urandom(3 * (1 << 20) + 17))  # more than one 1 MiB read, not a multiple of it
    assert sha256_file(str(f)) == hashlib.sha256(f.read_bytes()).hexdigest()


# ------------------------------------------------------------------ 3. every language counted somewhere


def test_rows_outside_the_six_languages_are_counted_and_rows_balance(tmp_path, capsys):
    rows = [conv(1), conv(2, "de"), conv(3, "fr-FR"), conv(4, "klingon"), conv(5, "es"), conv(6, lang=""),
            {**conv(7), "language": ["ca"]}]  # fmt: skip
    f = write_lines(tmp_path / "l.jsonl", rows)
    rc, out, _ = run_cli(mixture_argv(tmp_path, [f], "~data.datasets.sample.counts.es"), capsys)
    assert rc == 0
    r = assert_mixture_balanced(prepared_manifest(out))
    assert r["input_rows"] == 7 and r["converted"] == 1
    assert r["adapter_drops"] == {
        "unknown: unknown_language": 4,  # de, fr-FR, klingon and a list: outside the mixture's six
        "es: language_not_requested": 1,  # a mixture language this dataset does not ask for
        "unknown: missing language": 1,
    }


# --------------------------------------------------------------- 4. bad bytes, BOMs, non-objects, empty


def test_undecodable_line_is_a_counted_drop_on_every_reader(tmp_path, tok, capsys):
    lines = [conv(1), b'{"id": "x", "language": "ca", "messages": "\xff\xfe bad"}', conv(2)]
    f = write_lines(tmp_path / "u.jsonl", lines)
    rc, out, _ = run_cli(mixture_argv(tmp_path, [f]), capsys)
    r = assert_mixture_balanced(prepared_manifest(out))
    assert rc == 0 and r["adapter_drops"] == {"unknown: invalid UTF-8": 1} and r["converted"] == 2

    with data_only_train() as reports:
        rc, _, _ = run_cli(jsonl_train_argv(tmp_path, [f]), capsys)
    assert rc == 0 and reports[0]["dropped"] == {"invalid UTF-8": 1} and reports[0]["train"] == 2
    rc, _, err = run_cli(jsonl_train_argv(tmp_path / "e", [f], on_invalid="error"), capsys)
    assert rc == 2 and "u.jsonl:2: invalid UTF-8. Fix the row, or set data.on_invalid=drop" in err

    c = write_lines(tmp_path / "c.jsonl", [{"text": "un document prou llarg"}, b"\xc3\x28 bad", {"text": "un altre"}])
    rc, out, _ = run_cli(corpus_argv(tmp_path, [c]), capsys)
    s = assert_corpus_balanced(prepared_manifest(out))
    assert rc == 0 and s["dropped"] == {"invalid UTF-8": 1} and s["records"] == 3


def test_utf8_bom_is_stripped_and_the_first_row_kept(tmp_path, tok, capsys):
    f = tmp_path / "b.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + (json.dumps(conv(1)) + "\n" + json.dumps(conv(2)) + "\n").encode())
    rc, out, _ = run_cli(mixture_argv(tmp_path, [str(f)]), capsys)
    r = assert_mixture_balanced(prepared_manifest(out))
    assert rc == 0 and r["adapter_drops"] == {} and r["languages"]["ca"]["selected"] == 2
    convs, dropped = read_conversations([str(f)])  # on_invalid=error: the BOM is not an error either
    assert [c.id for c in convs] == ["rca1", "rca2"] and not dropped
    c = tmp_path / "c.jsonl"
    c.write_bytes(b"\xef\xbb\xbf" + b'{"text": "primer document"}\n')
    assert list(documents("s", _corpus(tmp_path, [str(c)]).sources["s"], SourceStats(), False)) == ["primer document"]


NOT_OBJECTS = ["[1, 2]", '"x"', "3", "null", "true"]


def test_json_lines_that_are_not_objects_are_counted_drops(tmp_path, tok, capsys):
    f = write_lines(tmp_path / "n.jsonl", [conv(1), *NOT_OBJECTS, conv(2)])
    rc, out, _ = run_cli(mixture_argv(tmp_path, [f]), capsys)
    r = assert_mixture_balanced(prepared_manifest(out))
    assert rc == 0 and r["adapter_drops"] == {"unknown: not a JSON object": 5} and r["converted"] == 2
    convs, dropped = read_conversations([f], on_invalid="drop")
    assert len(convs) == 2 and dropped == {"not a JSON object": 5}
    with pytest.raises(DataError, match=r"n\.jsonl:2: not a JSON object\. Fix the row"):
        read_conversations([f])
    c = write_lines(tmp_path / "c.jsonl", [{"text": "un document"}, *NOT_OBJECTS])
    stats = SourceStats()
    assert list(documents("s", _corpus(tmp_path, [c]).sources["s"], stats, False)) == ["un document"]
    assert stats.dropped == {"not a JSON object": 5} and stats.records == 6


def test_empty_source_stops_prepare_and_train_naming_the_dataset_and_the_fix(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    rc, _, err = run_cli(mixture_argv(tmp_path, [str(empty)]), capsys)  # take_all: the old code wrote an empty set
    assert rc == 2 and "mixture 'sample' has no training conversation: 'sample' read 0 rows" in err
    assert "remove the dataset from the mixture" in err
    assert not list((tmp_path / "prepared").glob("sample-*"))

    with data_only_train() as reports:
        rc, _, err = run_cli(jsonl_train_argv(tmp_path, [str(empty)]), capsys)
    assert rc == 2 and not reports and "no training conversation left in" in err and "empty.jsonl" in err

    rc, _, err = run_cli(corpus_argv(tmp_path, [str(empty)]), capsys)
    assert rc == 2 and "packed no training window" in err and "long_documents" in err

    # `train` prepares the same way, so it stops at the same place, before any training starts
    run = [f"run.output_dir={tmp_path / 'run2'}"]
    with data_only_train() as reports:
        rc, _, err = run_cli(["train", *mixture_argv(tmp_path, [str(empty)])[1:-1], *run], capsys)
        assert rc == 2 and "mixture 'sample' has no training conversation: 'sample' read 0 rows" in err
        rc, _, err = run_cli(["train", *corpus_argv(tmp_path, [str(empty)])[1:-1], *run], capsys)
        assert rc == 2 and "packed no training window" in err
    assert not reports


def test_all_rows_dropped_names_the_reasons(tmp_path, capsys):
    f = write_lines(tmp_path / "bad.jsonl", ["{oops", "[1]", conv(1, "de")])
    rc, _, err = run_cli(mixture_argv(tmp_path, [f]), capsys)
    assert rc == 2 and "read 3 rows (most dropped: " in err and "invalid JSON x1" in err


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (gzip.compress(b'{"text": "x"}\n'), "gzip-compressed"),
        ('{"text": "x"}\n'.encode("utf-16"), "UTF-16"),
        (b"PAR1\x15\x04\x15", "Parquet"),
    ],
)
def test_a_file_that_is_not_utf8_text_is_a_file_error(tmp_path, capsys, content, kind):
    f = tmp_path / "wrong.jsonl"
    f.write_bytes(content)
    for argv in (mixture_argv(tmp_path, [str(f)]), corpus_argv(tmp_path, [str(f)])):
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2 and f"{f}: not UTF-8 JSON lines: it looks like a {kind} file" in err
    with data_only_train():
        rc, _, err = run_cli(jsonl_train_argv(tmp_path, [str(f)]), capsys)
    assert rc == 2 and f"it looks like a {kind} file" in err


def test_corrupt_parquet_and_arrow_name_the_file(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([conv(i) for i in range(50)]), good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated: the footer is gone
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    for f in (bad, junk):
        rc, _, err = run_cli(mixture_argv(tmp_path, [str(f)]), capsys)
        assert rc == 2 and f"{f}: not a readable Parquet file" in err
        rc, _, err = run_cli(corpus_argv(tmp_path, [str(f)]), capsys)
        assert rc == 2 and f"{f}: not a readable Parquet file" in err
    arrow = tmp_path / "bad.arrow"
    arrow.write_bytes(b"\xff\xff\xff\xffgarbage")
    rc, _, err = run_cli(corpus_argv(tmp_path, [str(arrow)]), capsys)
    assert rc == 2 and f"{arrow}: not a readable Arrow file" in err
    with pytest.raises(MixtureError, match=r"junk\.parquet"):
        list(read_local_rows([str(junk)], MixtureError))


def test_unpaired_surrogate_escape_is_a_counted_drop(tmp_path, tok):
    lone = json.dumps(conv(2)).replace("Pregunta", "\\ud800Pregunta")  # an escape with no pair
    f = write_lines(tmp_path / "s.jsonl", [conv(1), lone])
    rows = list(read_local_rows([f]))
    assert rows[0] == conv(1) and rows[1].reason == "invalid Unicode (unpaired surrogate escape)"
    out = prepare_mixture(_mixture(tmp_path, [f]), tok, 256, 0, progress=False)
    r = json.loads((out / "manifest.json").read_text())["datasets"]["d"]
    assert r["adapter_drops"] == {"unknown: invalid Unicode (unpaired surrogate escape)": 1}
    paired = write_lines(tmp_path / "p.jsonl", [json.dumps(conv(3)).replace("Pregunta", "\\ud83d\\ude00")])
    assert next(iter(read_local_rows([paired])))["messages"][0]["content"].startswith("\U0001f600")


def test_dolly_without_its_language_option_is_a_config_error(tmp_path, tok):
    f = write_lines(tmp_path / "d.jsonl", [{"instruction": "Fes-ho", "response": "Fet."}])
    mix = _mixture(tmp_path, [f])
    mix.datasets["d"].adapter = "dolly"
    with pytest.raises(MixtureError, match=r"dataset 'd': .*options\['language'\]"):
        prepare_mixture(mix, tok, 256, 0, progress=False)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="'wildchat_prompts' yields prompts, not conversations"):
        mix.datasets["d"].adapter = "wildchat_prompts"  # refused by the schema, before any data is read


# ---------------------------------------------------------------- 5. caches stay inside prepared_root


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs", "a/../../b", "sub/dir"])
def test_a_cache_name_that_leaves_prepared_root_is_refused(tmp_path, tok, name):
    f = write_lines(tmp_path / "d.jsonl", [conv(1), conv(2)])
    root = tmp_path / "deep" / "er" / "prepared"
    mix = _mixture(tmp_path, [f]).model_copy(update={"name": name, "prepared_root": str(root)})  # skips validation
    with pytest.raises(MixtureError, match=r"data\.name=.* would place the prepared data outside .*set data\.name"):
        prepare_mixture(mix, tok, 256, 0, progress=False)
    corpus = _corpus(tmp_path, [f]).model_copy(update={"name": name, "prepared_root": str(root)})
    with pytest.raises(CorpusError, match=r"data\.name=.* would place the prepared data outside"):
        prepare_corpus(corpus, tok, 16, 64, 0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # nothing written anywhere


# -------------------------------------------------------------------- 6. one build per key, any host

RACE_SCRIPT = """
import json, sys
from alia_nemo.config.schema import MixtureConfig
from alia_nemo.data.mixture import prepare_mixture
from alia_nemo.model.tokenizer import build_test_tokenizer
mix = MixtureConfig.model_validate(json.loads(sys.argv[1]))
print(prepare_mixture(mix, build_test_tokenizer(), 512, 0, progress=False))
"""


def test_two_processes_racing_on_one_key_build_it_once(tmp_path, tok):
    f = write_lines(tmp_path / "d.jsonl", [conv(i) for i in range(3000)])
    mix = _mixture(tmp_path, [f], counts={"ca": 2500})
    root = Path(mix.prepared_root)
    root.mkdir(parents=True)
    key = cache_key(mix, tok, 512, 0)
    arg = json.dumps(mix.model_dump(mode="json"))
    # The test holds the key's lock first, so both processes must wait; on release they race for it.
    held = DirLock(root / f".lock-{key[:16]}", "test").acquire()
    logs = [tmp_path / "p0.err", tmp_path / "p1.err"]
    procs = [subprocess.Popen([sys.executable, "-c", RACE_SCRIPT, arg], stdout=subprocess.PIPE, stderr=log.open("w"),
                              text=True) for log in logs]  # fmt: skip
    try:
        deadline = time.time() + 120
        while not all(f"waiting for PID {os.getpid()} on host" in log.read_text() for log in logs):
            assert all(p.poll() is None for p in procs) and time.time() < deadline, [x.read_text() for x in logs]
            time.sleep(0.1)
    finally:
        held.release()
    outs = [p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs]
    errs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert outs[0] == outs[1] == str(root / f"mini-{key[:16]}")
    builders = [i for i, e in enumerate(errs) if "[alia-nemo] building" in e]
    assert len(builders) == 1, errs  # built once; the other waited for it and reused it
    builder_pid = procs[builders[0]].pid
    assert f"waiting for PID {builder_pid} on host" in errs[1 - builders[0]]
    assert sorted(p.name for p in root.iterdir()) == [f"mini-{key[:16]}"]  # no lock, no temporary left
    assert len(load_prepared(Path(outs[0]))[0]) == 2500


def _foreign_build(root: Path, key: str, age_s: float) -> Path:
    """A lock and temporary directory of a build on another host whose last heartbeat was ``age_s`` ago."""
    root.mkdir(parents=True, exist_ok=True)
    token = "f0e1d2c3b4a5968778695a4b3c2d1e0f"
    lock = root / f".lock-{key[:16]}"
    lock.write_text(json.dumps({"host": "other-node-17", "pid": 4242, "pid_namespace": "pid:[1]", "token": token,
                                "what": "prepare", "start_ticks": 1}))  # fmt: skip
    stamp = time.time() - age_s
    os.utime(lock, (stamp, stamp))
    tmp = root / f".tmp-{key[:16]}-{token[:12]}"
    tmp.mkdir()
    (tmp / "train-00000-of-00001.parquet").write_bytes(b"partial")
    return tmp


def test_a_live_foreign_build_is_waited_for_and_its_temp_dir_kept(tmp_path, tok, capsys):
    f = write_lines(tmp_path / "d.jsonl", [conv(1), conv(2)])
    mix = _mixture(tmp_path, [f])
    root, key = Path(mix.prepared_root), cache_key(mix, tok, 256, 0)
    tmp = _foreign_build(root, key, age_s=1)  # its PID is not in this host's /proc: the old code deleted it
    assert clean_stale_tmp(root, key) == [] and tmp.is_dir()
    with pytest.raises(MixtureError, match=r"gave up after 1 s waiting for PID 4242 on host other-node-17"):
        prepare_mixture(mix, tok, 256, 0, progress=False, wait_s=1)
    assert tmp.is_dir()
    assert capsys.readouterr().err.count("waiting for PID 4242 on host other-node-17") == 1  # said once


def test_a_stale_foreign_build_is_taken_over_and_its_temp_dir_removed(tmp_path, tok):
    f = write_lines(tmp_path / "d.jsonl", [conv(1), conv(2)])
    mix = _mixture(tmp_path, [f])
    root, key = Path(mix.prepared_root), cache_key(mix, tok, 256, 0)
    tmp = _foreign_build(root, key, age_s=3600)  # no heartbeat for an hour: provably gone
    assert clean_stale_tmp(root, key) == [tmp] and not tmp.exists()
    tmp = _foreign_build(root, key, age_s=3600)
    out = prepare_mixture(mix, tok, 256, 0, progress=False, wait_s=1)
    assert sorted(p.name for p in root.iterdir()) == [out.name]


def test_the_corpus_cache_waits_for_a_live_foreign_build_and_takes_over_a_stale_one(tmp_path, tok):
    from alia_nemo.data.packing import cache_key as corpus_key

    f = write_lines(tmp_path / "c.jsonl", [{"text": f"Document {i}: el gat dorm al sol."} for i in range(20)])
    corpus = _corpus(tmp_path, [f])
    root, key = Path(corpus.prepared_root), corpus_key(corpus, tok, 16, 64, 0)
    tmp = _foreign_build(root, key, age_s=1)
    with pytest.raises(CorpusError, match=r"waiting for PID 4242 on host other-node-17"):
        prepare_corpus(corpus, tok, 16, 64, 0, progress=False, wait_s=0.5)
    assert tmp.is_dir()
    os.utime(root / f".lock-{key[:16]}", (time.time() - 3600, time.time() - 3600))
    out = prepare_corpus(corpus, tok, 16, 64, 0, progress=False, wait_s=0.5)
    assert sorted(p.name for p in root.iterdir()) == [out.name]


# ------------------------------------------------------------------------------------ 7. reporting


def test_validation_shortfall_is_reported_like_the_training_shortfall(tmp_path, tok, capsys):
    f = write_lines(tmp_path / "v.jsonl", [conv(i) for i in range(5)])
    mix = _mixture(tmp_path, [f], counts={"ca": 4}, val_fraction=0.5)  # 4 train + 2 validation asked, 5 exist
    out = prepare_mixture(mix, tok, 256, 0, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    s = m["datasets"]["d"]["languages"]["ca"]
    assert (s["selected"], s["shortfall"], s["val"], s["val_requested"], s["val_shortfall"]) == (4, 0, 1, 2, 1)
    assert (m["totals"]["val_requested"], m["totals"]["val_shortfall"]) == (2, 1)
    assert "validation shortfall (d/ca: 1 of 2)" in capsys.readouterr().err


def test_a_duplicate_across_datasets_names_the_dataset_it_duplicates(tmp_path, tok):
    a = write_lines(tmp_path / "a.jsonl", [conv(i) for i in range(3)])
    b = write_lines(tmp_path / "b.jsonl", [{**conv(1), "id": "other-id"}, conv(7, user="Una altra pregunta?")])
    mix = _mixture(tmp_path, [a])
    datasets = {"first": {**mix.datasets["d"].model_dump(), "counts": {"ca": 3}},
                "second": {**mix.datasets["d"].model_dump(), "origin": {"kind": "local", "files": [b]}}}  # fmt: skip
    mix = MixtureConfig.model_validate({**mix.model_dump(), "datasets": datasets})
    m = json.loads((prepare_mixture(mix, tok, 256, 0, progress=False) / "manifest.json").read_text())
    assert m["datasets"]["second"]["languages"]["ca"]["dropped"] == {"duplicate of dataset 'first'": 1}
    assert m["datasets"]["first"]["languages"]["ca"]["dropped"] == {}


def test_jsonl_report_balances(tmp_path, tok):
    f = write_lines(tmp_path / "j.jsonl", [conv(1), "{bad", conv(2, answer="molt " * 300), "[1]", conv(3)])
    prepared = prepare_sft(DataConfig(name="t", files=[f], on_invalid="drop"), tok, 64, 0)
    r = prepared.report
    assert r["conversations_read"] == r["train"] + r["val"] + sum(r["dropped"].values()) == 5
