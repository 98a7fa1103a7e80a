"""The SFT mixture's LLM quality filter against a real judge on 127.0.0.1: selection from passing rows, drops
counted by dataset, language and reason, the score cache (reruns, other seeds, a killed build), and failures."""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
from pathlib import Path

import pytest

from alia_nemo.config.schema import MixtureConfig, QualityFilterConfig
from alia_nemo.data import quality as quality_mod
from alia_nemo.data.mixture import MixtureError, prepare_mixture
from alia_nemo.data.quality import SCORES_FILE, render
from alia_nemo.eval import niah
from alia_nemo.eval.judge import DEFAULT_JUDGE
from tests.helpers import ChatServer

THRESHOLD = 4
BELOW = f"below quality threshold (score < {THRESHOLD})"
NO_RESULT, OUT_OF_RANGE = "quality: no [RESULT]", "quality: out of range"
# Marker word in the assistant's text -> the judge's reply. FAIR sits on the threshold (kept: >= threshold).
VERDICTS = {
    "POOR": "Feedback: unhelpful. [RESULT] 2",
    "FAIR": "Feedback: fine. [RESULT] 4",
    "GARBLED": "Feedback: I can not decide.",
    "HUGE": "Feedback: superb. [RESULT] 9",
}
GOOD = "Feedback: exemplary. [RESULT] 5"


class Judge:
    """A Prometheus stand-in: scores by the marker word in the response section and counts every request.
    From request number ``fail_from`` on it answers HTTP 503 (a judge going down mid-build)."""

    def __init__(self, fail_from: int | None = None):
        self.requests: list[str] = []
        self.fail_from = fail_from
        lock, srv = threading.Lock(), self

        def reply(body: dict) -> tuple[int, str]:
            content = body["messages"][-1]["content"]
            with lock:
                n = len(srv.requests)
                srv.requests.append(content)
            if srv.fail_from is not None and n >= srv.fail_from:
                return 503, "down"
            response = re.search(r"###Response to evaluate:\n(.*)\n\n###Score Rubrics:", content, re.S).group(1)
            return 200, next((v for k, v in VERDICTS.items() if k in response), GOOD)

        self._server = ChatServer(reply)
        self.url = self._server.url

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def judge():
    srv = Judge()
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setattr(niah, "BACKOFF_S", 0.01)


def _conv(i: int, lang: str, marker: str = "") -> dict:
    return {
        "id": f"{lang}{i}",
        "language": lang,
        "messages": [
            {"role": "user", "content": f"pregunta {lang} {i}?"},
            {"role": "assistant", "content": f"resposta {marker} {i}.".replace("  ", " ")},
        ],
    }


def _rows(lang: str, n: int, markers: dict[str, int]) -> list[dict]:
    """``n`` conversations, the first ones carrying the given markers (``{"POOR": 3}``: rows 0-2), the rest good."""
    tags = [m for m, k in markers.items() for _ in range(k)]
    return [_conv(i, lang, tags[i] if i < len(tags) else "") for i in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def _ds(files: list[str], counts: dict) -> dict:
    return {"licence": "Apache-2.0", "adapter": "messages", "origin": {"kind": "local", "files": files},
            "counts": counts}  # fmt: skip


@pytest.fixture
def data(tmp_path):
    """set-a: ca 30 (6 POOR, 2 GARBLED, 2 HUGE, 3 FAIR), es 20 (5 POOR); set-b: en 20 (4 POOR)."""
    a = _jsonl(tmp_path / "a.jsonl", _rows("ca", 30, {"POOR": 6, "GARBLED": 2, "HUGE": 2, "FAIR": 3})
               + _rows("es", 20, {"POOR": 5}))  # fmt: skip
    b = _jsonl(tmp_path / "b.jsonl", _rows("en", 20, {"POOR": 4}))
    return tmp_path, a, b


def _mix(tmp_path: Path, datasets: dict, qf: dict | None, **kw) -> MixtureConfig:
    return MixtureConfig.model_validate({
        "name": "qmini", "format": "mixture", "internal_dir": str(tmp_path),
        "prepared_root": str(tmp_path / "prepared"), "val_fraction": 0.1, "datasets": datasets,
        "quality_filter": qf, **kw,
    })  # fmt: skip


def _qf(srv: Judge, **kw) -> dict:
    return {"endpoint": srv.url, "threshold": THRESHOLD, "timeout_s": 20, "retries": 0, **kw}


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _texts(out: Path) -> list[str]:
    import pyarrow.parquet as pq

    m = _manifest(out)
    return [msgs for split in ("train", "val") for f in m["files"][split]
            for msgs in pq.read_table(out / f).column("messages").to_pylist()]  # fmt: skip


def _full_scan(data, srv: Judge, **qf) -> MixtureConfig:
    """Counts above what passes (take_all, no validation): every candidate is judged, so counts are exact."""
    tmp_path, a, b = data
    datasets = {"set-a": _ds([a], {"ca": 30, "es": 20}), "set-b": _ds([b], {"en": 20})}
    return _mix(tmp_path, datasets, _qf(srv, **{"concurrency": 4, **qf}), val_fraction=0, on_shortfall="take_all")


# ---------------------------------------------------------------------------------------------- selection


def test_drops_counted_by_dataset_language_and_reason(data, judge, tok):
    out = prepare_mixture(_full_scan(data, judge), tok, 256, 0, progress=False)
    m = _manifest(out)
    ca = m["datasets"]["set-a"]["languages"]["ca"]
    es = m["datasets"]["set-a"]["languages"]["es"]
    en = m["datasets"]["set-b"]["languages"]["en"]
    assert ca["dropped"] == {BELOW: 6, NO_RESULT: 2, OUT_OF_RANGE: 2}
    assert es["dropped"] == {BELOW: 5} and en["dropped"] == {BELOW: 4}
    assert (ca["selected"], ca["shortfall"], es["selected"], en["selected"]) == (20, 10, 15, 16)
    assert ca["quality"] == {"judged": 30, "kept_unscored": {}} and en["quality"]["judged"] == 20
    q = m["quality_filter"]
    assert (q["judged"], q["requests"], q["cache_hits"], q["kept"]) == (70, 70, 0, 51)
    assert q["dropped"] == {BELOW: 15, NO_RESULT: 2, OUT_OF_RANGE: 2} and q["kept_unscored"] == {}
    assert (q["threshold"], q["model"], q["min_score"], q["max_score"]) == (THRESHOLD, DEFAULT_JUDGE, 1, 5)
    assert q["endpoint"] == judge.url and q["score_cache"] == str(data[0] / "prepared" / "quality-scores" / SCORES_FILE)
    assert m["totals"]["dropped"] == 19 and len(judge.requests) == 70
    texts = _texts(out)
    assert len(texts) == 51 and sum("FAIR" in t for t in texts) == 3  # on the threshold: kept
    assert not [t for t in texts if any(k in t for k in ("POOR", "GARBLED", "HUGE"))]
    # What the judge saw: the user turn as the instruction, the assistant turn as the response, the rubric.
    first = next(p for p in judge.requests if "pregunta ca 0?" in p)
    assert "###The instruction to evaluate:\npregunta ca 0?\n\n###Response to evaluate:\nresposta POOR 0." in first
    assert "Score 5:" in first and "between 1 and 5" in first


def test_exact_counts_are_selected_from_passing_rows_judging_only_what_is_needed(data, judge, tok):
    tmp_path, a, b = data
    datasets = {"set-a": _ds([a], {"ca": 10, "es": 5}), "set-b": _ds([b], {"en": 8})}
    out = prepare_mixture(_mix(tmp_path, datasets, _qf(judge, concurrency=2)), tok, 256, 3, progress=False)
    m = _manifest(out)
    for r in m["datasets"].values():
        for lang, s in r["languages"].items():
            assert (s["selected"], s["val"], s["shortfall"]) == ({"ca": 10, "es": 5, "en": 8}[lang], 1, 0)
            # every candidate is selected, held out, dropped with a reason, or never reached (and never judged)
            assert s["converted"] == s["selected"] + s["val"] + sum(s["dropped"].values()) + s["unselected"]
            assert s["quality"]["judged"] == s["selected"] + s["val"] + sum(s["dropped"].values())
            assert set(s["dropped"]) <= {BELOW, NO_RESULT, OUT_OF_RANGE}
    q = m["quality_filter"]
    assert q["kept"] == 26 == len(_texts(out)) and q["judged"] == 26 + sum(q["dropped"].values())
    # Only rows the selection reached were asked about (plus at most one batch of 2 ahead per language).
    assert q["requests"] == len(judge.requests) and q["judged"] <= q["requests"] <= q["judged"] + 3 * 2
    assert q["requests"] < 70
    assert not [t for t in _texts(out) if any(k in t for k in ("POOR", "GARBLED", "HUGE"))]


def test_on_unscored_keep_counts_kept_unscored_rows(data, judge, tok):
    out = prepare_mixture(_full_scan(data, judge, on_unscored="keep"), tok, 256, 0, progress=False)
    m = _manifest(out)
    ca = m["datasets"]["set-a"]["languages"]["ca"]
    assert ca["dropped"] == {BELOW: 6} and ca["selected"] == 24
    assert ca["quality"]["kept_unscored"] == {NO_RESULT: 2, OUT_OF_RANGE: 2}
    assert m["quality_filter"]["kept_unscored"] == {NO_RESULT: 2, OUT_OF_RANGE: 2}
    assert sum("GARBLED" in t or "HUGE" in t for t in _texts(out)) == 4


# ---------------------------------------------------------------------------------------------- the cache


def test_rerun_makes_no_request_and_rebuilds_the_same_directory(data, judge, tok):
    import pyarrow.parquet as pq

    mix = _full_scan(data, judge)
    out = prepare_mixture(mix, tok, 256, 0, progress=False)
    first = _manifest(out)
    shards = {f: pq.read_table(out / f).to_pylist() for f in first["files"]["train"]}
    judge.requests.clear()
    assert prepare_mixture(mix, tok, 256, 0, progress=False) == out and judge.requests == []  # a cache hit

    shutil.rmtree(out)  # the prepared mixture is gone, its scores are not: a full rebuild asks the judge nothing
    assert prepare_mixture(mix, tok, 256, 0, progress=False) == out and judge.requests == []
    again = _manifest(out)
    assert {f: pq.read_table(out / f).to_pylist() for f in again["files"]["train"]} == shards
    assert (again["quality_filter"]["requests"], again["quality_filter"]["cache_hits"]) == (0, 70)
    for doc in (first, again):
        for k in ("created", "seconds"):
            doc.pop(k)
        for k in ("requests", "cache_hits"):
            doc["quality_filter"].pop(k)
    assert again == first


def test_cached_scores_serve_a_build_with_another_seed(data, judge, tok):
    mix = _full_scan(data, judge)
    one = prepare_mixture(mix, tok, 256, 0, progress=False)
    assert len(judge.requests) == 70
    two = prepare_mixture(mix, tok, 256, 1, progress=False)
    assert two != one and len(judge.requests) == 70  # no new request
    assert _manifest(two)["quality_filter"]["cache_hits"] == 70
    assert _manifest(two)["datasets"]["set-a"]["languages"]["ca"]["dropped"] == {BELOW: 6, NO_RESULT: 2,
                                                                                 OUT_OF_RANGE: 2}  # fmt: skip


def test_scores_paid_for_survive_a_judge_that_goes_down(data, tok):
    down = Judge(fail_from=25)
    try:
        mix = _full_scan(data, down, concurrency=1)
        with pytest.raises(MixtureError) as err:
            prepare_mixture(mix, tok, 256, 0, progress=False)
        msg = str(err.value)
        assert f"the judge at {down.url} failed" in msg and "HTTP 503" in msg and "25 score(s)" in msg
        scores = Path(mix.prepared_root) / "quality-scores" / SCORES_FILE
        assert len(scores.read_text().splitlines()) == 25
        assert [p.name for p in Path(mix.prepared_root).iterdir() if not p.name.startswith(".")] == ["quality-scores"]
        down.requests.clear()
        down.fail_from = None  # back up: only the 45 conversations not scored yet are asked about
        out = prepare_mixture(mix, tok, 256, 0, progress=False)
        assert len(down.requests) == 45 and _manifest(out)["quality_filter"]["cache_hits"] == 25
    finally:
        down.close()


def test_cut_last_line_of_the_score_cache_is_judged_again(data, judge, tok):
    mix = _full_scan(data, judge)
    prepare_mixture(mix, tok, 256, 0, progress=False)
    scores = Path(mix.prepared_root) / "quality-scores" / SCORES_FILE
    scores.write_text(scores.read_text()[:-20])  # a kill mid-write
    judge.requests.clear()
    prepare_mixture(mix, tok, 256, 1, progress=False)
    assert len(judge.requests) == 1
    lines = scores.read_text().splitlines()
    assert len(lines) == 71 and sum(1 for line in lines if not line.endswith("}")) == 1  # the cut one, skipped


# --------------------------------------------------------------------------------------- off, keys, errors


def test_filter_off_makes_no_request_and_a_filtered_build_lives_elsewhere(data, judge, tok):
    tmp_path, a, b = data
    datasets = {"set-a": _ds([a], {"ca": 10, "es": 5}), "set-b": _ds([b], {"en": 8})}
    plain = prepare_mixture(_mix(tmp_path, datasets, None), tok, 256, 0, progress=False)
    assert judge.requests == []
    m = _manifest(plain)
    assert "quality_filter" not in m and "quality" not in m["datasets"]["set-a"]["languages"]["ca"]
    assert m["totals"]["dropped"] == 0 and m["totals"]["selected"] == 23
    assert not (tmp_path / "prepared" / "quality-scores").exists()
    filtered = prepare_mixture(_mix(tmp_path, datasets, _qf(judge)), tok, 256, 0, progress=False)
    assert filtered != plain and judge.requests and filtered.parent == plain.parent
    # Same judge model behind another URL, other concurrency: the same scores, so the same directory.
    moved = _qf(judge, concurrency=3) | {"endpoint": judge.url.replace("127.0.0.1", "localhost")}
    assert prepare_mixture(_mix(tmp_path, datasets, moved), tok, 256, 0, progress=False) == filtered
    other = _qf(judge, threshold=5)
    assert prepare_mixture(_mix(tmp_path, datasets, other), tok, 256, 0, progress=False) not in (plain, filtered)


def test_a_judge_that_is_down_is_a_clear_error_naming_it(data, tok):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    url = f"http://127.0.0.1:{port}/v1"
    tmp_path, _, b = data
    mix = _mix(tmp_path, {"set-b": _ds([b], {"en": 8})}, {"endpoint": url, "threshold": 4, "retries": 1})
    with pytest.raises(MixtureError) as err:
        prepare_mixture(mix, tok, 256, 0, progress=False)
    msg = str(err.value)
    assert f"quality filter (set-b/en): the judge at {url} failed" in msg
    assert "connection refused" in msg and "after 2 attempt(s)" in msg and "data.quality_filter=null" in msg
    assert [p.name for p in (tmp_path / "prepared").iterdir() if not p.name.startswith(".")] == ["quality-scores"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"threshold": 6}, "threshold 6 is outside the scale 1-5"),
        ({"min_score": 5, "max_score": 5}, "min_score 5 must be below max_score 5"),
        ({"rubric": "[Good?]\nScore 1: bad\nScore 5: good"}, r"no 'Score n:' line for \[2, 3, 4\]"),
        ({"endpoint": "judge:8000"}, "String should match pattern"),
        ({"treshold": 3}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        QualityFilterConfig.model_validate({"endpoint": "http://j:8000/v1", "threshold": 4, **override})


def test_defaults_and_rendering():
    qf = QualityFilterConfig.model_validate({"endpoint": "http://j:8000/v1", "threshold": 4})
    assert (qf.model, qf.min_score, qf.max_score, qf.on_unscored, qf.concurrency, qf.cache_dir) == (
        DEFAULT_JUDGE, 1, 5, "drop", 8, None)  # fmt: skip
    assert MixtureConfig.model_fields["quality_filter"].default is None
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4."}]  # fmt: skip
    assert render(msgs) == (
        "[System prompt]\nBe brief.\n\n[Turn 1 - user]\nHi?\n\n[Turn 2 - user]\n2+2?",
        "[Turn 1 - assistant]\nHello.\n\n[Turn 2 - assistant]\n4.",
    )
    # The score cache key follows the exact text, the rubric, the model and the scale (not the threshold).
    key = quality_mod.score_key(qf, msgs)
    assert key == quality_mod.score_key(qf.model_copy(update={"threshold": 5}), msgs)
    for change in ({"rubric": qf.rubric + " "}, {"model": "other"}, {"min_score": 0}):
        assert quality_mod.score_key(qf.model_copy(update=change), msgs) != key
    assert quality_mod.score_key(qf, [*msgs[:-1], {"role": "assistant", "content": "4!"}]) != key
