"""`eval judge` (the card's LLM-as-a-judge) against a real OpenAI-compatible HTTP server on loopback that plays
both the model under test and the Prometheus judge, with answers and verdicts chosen by the request's content:
sampling, the card's styles and criteria, score parsing, the robustness arithmetic, resume after a kill, the CLI."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from alia_nemo.cli import main
from alia_nemo.errors import ConfigError
from alia_nemo.eval import judge, niah
from tests.helpers import ChatServer

ROOT = Path(__file__).resolve().parents[2]
# The card's English Math styles and criteria, as the card prints them.
CARD_STYLES = [
    (
        'I need help with this math problem: "',
        '" Give me the answer step by step and also the final result separately.',
    ),
    ('Can you please help me answer this? "', '" Explain the answer and give me the final result as well. Thanks.'),
    ('Help me with this problem: "', '" I need the answer explained and the final result separately.'),
]
CARD_REASONING = """
[Does the model's answer demonstrate reasoning capability?]
Score 1: The answer demonstrates poor reasoning, with illogical arguments or conclusions that do not follow from the provided information.
Score 2: The answer shows weak reasoning, with some logical connections but also contains significant flaws or gaps in the argumentation.
Score 3: The answer demonstrates adequate reasoning, with generally logical arguments, but may have minor flaws or a lack of depth in the reasoning process.
Score 4: The answer shows strong reasoning, with well-structured arguments and conclusions that logically follow from the information provided.
Score 5: The answer demonstrates exceptional reasoning, with clear, coherent, and insightful arguments that are logically sound and well-supported by the information provided."""  # noqa: E501
CARD_CORRECTNESS = """
[Is the model's answer mathematically correct?]
Score 0: The answer contains mathematical errors that render the solution incorrect or unreliable.
Score 1: The answer is mathematically correct, with accurate calculations and appropriate use of mathematical concepts."""  # noqa: E501

QIDS = ["qa", "qb", "qc", "qd"]
# The judge's reply per (instance, style): reasoning (1-5) and correctness (0-1). qc style 0 has no [RESULT];
# qd styles 0 and 1 are out of the 1-5 range; qa style 0 carries two [RESULT]s (the last one counts).
REASONING = {
    "qa": ["Feedback: one might say [RESULT] 2, but no. [RESULT] 5", "[RESULT] 5", "[RESULT] 5"],
    "qb": ["[RESULT] 1", "[RESULT] 3", "[RESULT] 5"],
    "qc": ["Feedback: I can not decide.", "[RESULT] 2", "[RESULT] 4"],
    "qd": ["[RESULT] 9", "[RESULT] 0", "[RESULT] 3"],
}
CORRECTNESS = {q: [1, 1, 1] for q in QIDS} | {"qb": [0, 1, 1]}
# By hand: valid reasoning scores 5,5,5 1,3,5 2,4 3 -> mean 33/9; variances 0, 8/3, 1 (qd: one score, left out).
REASONING_MEAN, REASONING_VAR = 33 / 9, (0 + 8 / 3 + 1) / 3
CORRECTNESS_MEAN, CORRECTNESS_VAR = 11 / 12, (2 / 9) / 4  # only qb varies: [0, 1, 1] -> 2/9


class Server:
    """Model and judge on one loopback server. The model answers ``answer to <qid> style <k>`` (k from the card
    style the prompt is wrapped in); the judge's verdict comes from the tables above. ``flaky`` prompts get one
    HTTP 500 first; from judge request number ``hold_from`` on, judge requests hang until ``release`` is set (to
    kill a run mid-way)."""

    def __init__(self, flaky: tuple[str, ...] = (), hold_from: int | None = None):
        self.model_prompts: list[str] = []
        self.judge_prompts: list[str] = []
        self.held = threading.Event()
        self.release = threading.Event()
        lock, seen_flaky = threading.Lock(), set()
        srv = self

        def reply(body: dict) -> tuple[int, str]:
            content = body["messages"][-1]["content"]
            if "###Score Rubrics:" in content:
                with lock:
                    n = len(srv.judge_prompts)
                    srv.judge_prompts.append(content)
                if hold_from is not None and n >= hold_from and not srv.release.is_set():
                    srv.held.set()
                    srv.release.wait(30)
                    return 503, "held"
                qid, k = re.search(r"answer to (q\w) style (\d)", content).groups()
                if "mathematically correct" in content:
                    return 200, f"Feedback: checked. [RESULT] {CORRECTNESS[qid][int(k)]}"
                return 200, REASONING[qid][int(k)]
            with lock:
                if content in flaky and content not in seen_flaky:
                    seen_flaky.add(content)
                    srv.model_prompts.append(content)
                    return 500, "transient"
                srv.model_prompts.append(content)
            k = next(i for i, (pre, suf) in enumerate(CARD_STYLES) if content.startswith(pre) and content.endswith(suf))
            qid = re.search(r"QID-(q\w)", content).group(1)
            return 200, f"answer to {qid} style {k}"

        self._server = ChatServer(reply)
        self.url = self._server.url

    def close(self) -> None:
        self.release.set()
        self._server.close()


@pytest.fixture
def server():
    started: list[Server] = []

    def start(**kw) -> Server:
        started.append(Server(**kw))
        return started[-1]

    yield start
    for s in started:
        s.close()


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setattr(niah, "BACKOFF_S", 0.01)


def question(qid: str) -> str:
    return f"QID-{qid}: Janet's ducks lay 16 eggs per day. How many are left?"


@pytest.fixture
def task_file(tmp_path) -> Path:
    """The shipped math task, its English data from a local JSONL (4 instances) instead of the hub."""
    raw = yaml.safe_load((ROOT / "conf/eval/judge/math.yaml").read_text())
    raw["source"] = {"files": {"en": "mgsm_en.jsonl"}, "split": "test"}
    (tmp_path / "mgsm_en.jsonl").write_text("".join(json.dumps({"question": question(q)}) + "\n" for q in QIDS))
    path = tmp_path / "math_local.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def _args(srv: Server, task: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "judge", "--task", str(task), "--endpoint", srv.url, "--served-model", "alia-test",
            "--judge-endpoint", srv.url, "--out", str(out), "--timeout", "20", *extra]  # fmt: skip


# ------------------------------------------------------------------------------------------------ the task


def test_shipped_math_task_has_the_cards_styles_and_criteria_verbatim():
    task, path = judge.load_task("math")
    assert path == ROOT / "conf/eval/judge/math.yaml"
    assert (task.source.hub, task.source.split, task.fields.instruction) == ("juletxara/mgsm", "test", "question")
    assert task.source.configs == {"en": "en", "es": "es"}  # MGSM's languages among ours; the rest from files
    assert judge.styles_for(task, path, "en") == CARD_STYLES
    assert {lang: pairs for lang, pairs in task.styles.items() if pairs is None} == dict.fromkeys(
        ["ca", "es", "eu", "gl", "pt"]
    )
    (r, c) = task.criteria
    assert (r.name, r.min_score, r.max_score, r.rubric) == ("reasoning_capability", 1, 5, CARD_REASONING)
    assert (c.name, c.min_score, c.max_score, c.rubric) == ("mathematical_correctness_binary", 0, 1, CARD_CORRECTNESS)
    prompt = judge.judge_prompt(r, "PROMPT", "ANSWER")
    assert "an integer between 1 and 5" in prompt and "[RESULT] (an integer number between 1 and 5)" in prompt
    assert "###The instruction to evaluate:\nPROMPT\n\n###Response to evaluate:\nANSWER\n" in prompt
    assert prompt.endswith("###Score Rubrics:\n" + CARD_REASONING + "\n\n###Feedback:")


def test_missing_language_styles_is_a_clear_error_naming_file_language_and_fix(tmp_path, capsys):
    rc = main(["eval", "judge", "--languages", "en,ca", "--endpoint", "http://127.0.0.1:9/v1", "--served-model", "m",
               "--judge-endpoint", "http://127.0.0.1:9/v1", "--out", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert "conf/eval/judge/math.yaml" in err and "styles.ca is null" in err
    assert "three human-translated [prefix, suffix] pairs" in err and "styles.en" in err
    assert not (tmp_path / judge.RESULTS).exists()  # refused before any work


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw.update(extra_key=1), "extra_key: Extra inputs are not permitted"),
        (lambda raw: raw["styles"]["en"].pop(), "has 2 [prefix, suffix] pairs"),
        (lambda raw: raw["criteria"][1].update(max_score=3), "scale 0-3"),
        (lambda raw: raw["source"].update(hub=None), "source needs a hub dataset id"),
    ],
)
def test_task_files_are_validated_strictly(tmp_path, change, message):
    raw = yaml.safe_load((ROOT / "conf/eval/judge/math.yaml").read_text())
    change(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        judge.load_task(str(path))
    assert str(path) in str(info.value)


def test_hub_source_is_refused_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task, path = judge.load_task("math")
    with pytest.raises(ConfigError, match=r"hub dataset juletxara/mgsm .*source\.files\.en"):
        judge.load_rows(task, path, "en")


# --------------------------------------------------------------------------------------- sampling, parsing


def test_sampling_is_seeded_and_takes_all_when_too_few():
    rows = [{"question": f"Q{i}", "uid": f"id{i}"} for i in range(30)]
    fields = judge.Fields(instruction="question", id="uid")
    a = judge.sample(rows, fields, 10, seed=0, lang="en")
    assert a == judge.sample(rows, fields, 10, seed=0, lang="en")
    assert len(a) == 10 and len({i for i, _ in a}) == 10 and all(q == "Q" + i[2:] for i, q in a)
    assert [i for i, _ in a] != [i for i, _ in judge.sample(rows, fields, 10, seed=1, lang="en")]
    everything = judge.sample(rows, fields, 50, seed=0, lang="en")
    assert sorted(i for i, _ in everything) == sorted(r["uid"] for r in rows)
    by_index = judge.sample(rows, judge.Fields(instruction="question"), 3, seed=0, lang="en")
    assert all(q == f"Q{i}" for i, q in by_index)  # no id column: the row index
    with pytest.raises(ConfigError, match="repeats values"):
        judge.sample([{"question": "a", "uid": 1}, {"question": "b", "uid": 1}], fields, 2, 0, "en")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Feedback: good. [RESULT] 4", (4, None)),
        ("[RESULT] 2 ... on reflection [RESULT] 3", (3, None)),
        ("Feedback: [RESULT]3", (3, None)),
        ("Feedback: good, I'd say 4.", (None, "no [RESULT]")),
        ("[RESULT] 6", (None, "out of range")),
        ("[RESULT] 0", (None, "out of range")),
    ],
)
def test_result_parsing(text, expected):
    assert judge.parse_score(text, 1, 5) == expected


# ------------------------------------------------------------------------------------------------ end to end


def test_cli_end_to_end_styles_scores_variance_unparseable_and_a_retried_500(server, task_file, tmp_path, capsys):
    flaky = CARD_STYLES[1][0] + question("qa") + CARD_STYLES[1][1]
    srv = server(flaky=(flaky,))
    out = tmp_path / "out"
    assert main(_args(srv, task_file, out, "--instances", "6", "--concurrency", "3")) == 0
    # Every instance in each card style, exactly prefix + question + suffix; the 500 was retried once.
    expected = Counter(pre + question(q) + suf for q in QIDS for pre, suf in CARD_STYLES)
    assert Counter(srv.model_prompts) == expected + Counter([flaky])
    assert "retry 1 of 3" in capsys.readouterr().err
    assert len(srv.judge_prompts) == 24
    assert all("[Is the model's answer mathematically correct?]" in p or "demonstrate reasoning" in p
               for p in srv.judge_prompts)  # fmt: skip

    doc = json.loads((out / "judge.json").read_text())
    assert doc["instances"]["en"] == {"available": 4, "sampled": 4, "shortfall": 2}
    assert "population variance" in doc["definitions"]["robustness_variance"]
    r = doc["results"]["en"]["reasoning_capability"]
    assert r["mean"] == pytest.approx(REASONING_MEAN) and r["n_scored"] == 9 and r["n_judged"] == 12
    assert r["unparseable"] == {"no [RESULT]": 1, "out of range": 2}
    assert r["robustness_variance"] == pytest.approx(REASONING_VAR)
    assert (r["robustness_instances"], r["robustness_excluded"]) == (3, 1)
    assert r["mean_by_style"] == pytest.approx([(5 + 1) / 2, (5 + 3 + 2) / 3, (5 + 5 + 4 + 3) / 4])
    c = doc["results"]["en"]["mathematical_correctness_binary"]
    assert c["mean"] == pytest.approx(CORRECTNESS_MEAN) and c["n_scored"] == 12
    assert c["unparseable"] == {"no [RESULT]": 0, "out of range": 0}
    assert c["robustness_variance"] == pytest.approx(CORRECTNESS_VAR) and c["robustness_excluded"] == 0
    # The hand computation above, done the documented way from the per-answer records.
    stored = [json.loads(x) for x in (out / judge.RESULTS).read_text().splitlines()[1:]]
    judged = [x for x in stored if "judgements" in x]
    assert len(judged) == 12 and len(stored) == 24  # an answer record and a judged record per (instance, style)
    per = {q: [x["judgements"]["reasoning_capability"]["score"] for x in judged if x["id"] == str(QIDS.index(q))]
           for q in QIDS}  # fmt: skip
    variances = [statistics.pvariance([s for s in v if s is not None]) for v in per.values() if sum(map(bool, v)) > 1]
    assert statistics.fmean(variances) == pytest.approx(REASONING_VAR)
    assert (out / "judge.png").stat().st_size > 5000
    from PIL import Image

    assert Image.open(out / "judge.png").size[0] >= 800  # two panels, one per criterion


def test_rerun_with_other_settings_is_refused(server, task_file, tmp_path, capsys):
    srv = server()
    out = tmp_path / "out"
    assert main(_args(srv, task_file, out)) == 0
    assert main(_args(srv, task_file, out, "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert "holds results of another setup" in err and "seed: 0 -> 1" in err


def test_resume_after_a_kill_never_asks_the_model_twice_and_matches_an_uninterrupted_run(server, task_file, tmp_path):
    reference = tmp_path / "reference"
    assert main(_args(server(), task_file, reference)) == 0

    srv = server(hold_from=5)  # judge requests 0-4 answered: 2 units judged, the 3rd answered and half judged
    out = tmp_path / "out"
    argv = _args(srv, task_file, out, "--concurrency", "1")
    code = f"import sys; from alia_nemo.cli import main; sys.exit(main({argv!r}))"
    with (tmp_path / "child.log").open("w") as log:
        child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert srv.held.wait(45), (tmp_path / "child.log").read_text()
        time.sleep(0.2)
    finally:
        child.kill()
        child.wait(10)
    stored = [json.loads(x) for x in (out / judge.RESULTS).read_text().splitlines()[1:]]
    assert sum("judgements" in x for x in stored) == 2 and sum("judgements" not in x for x in stored) == 3
    assert not (out / "judge.json").exists()
    srv.release.set()
    first = len(srv.model_prompts)
    assert first == 3

    assert main(_args(srv, task_file, out, "--concurrency", "4")) == 0
    assert len(srv.model_prompts) == 12 and max(Counter(srv.model_prompts).values()) == 1
    done, ref = (json.loads((d / "judge.json").read_text()) for d in (out, reference))
    assert done["results"] == ref["results"] and done["instances"] == ref["instances"]
    assert done["results"]["en"]["reasoning_capability"]["mean"] == pytest.approx(REASONING_MEAN)


def test_a_local_exported_model_answers_and_every_answer_is_judged(tmp_path, tok, task_file, capsys):
    """``--model DIR``: the tiny exported model answers every (instance, style) in-process; a judge server that
    grades by the answer's length shows each graded answer is the model's own text for that styled prompt."""
    from alia_nemo.model.export import export
    from tests.helpers import save_peaked_tiny_model

    run = tmp_path / "run"
    save_peaked_tiny_model(run / "final")
    tok.save_pretrained(str(run / "final"))
    model_dir = export(run, tmp_path / "hf")
    seen: list[tuple[str, str]] = []

    def grade(body: dict) -> tuple[int, str]:
        content = body["messages"][-1]["content"]
        styled = content.split("###The instruction to evaluate:\n", 1)[1].split("\n\n###Response to evaluate:", 1)
        seen.append((styled[0], styled[1].split("\n\n###Score Rubrics:", 1)[0].strip("\n")))
        return 200, f"Feedback: ok. [RESULT] {1 if 'mathematically correct' in content else 3}"

    server = ChatServer(grade)
    try:
        argv = ["eval", "judge", "--task", str(task_file), "--model", str(model_dir), "--judge-endpoint",
                server.url, "--out", str(tmp_path / "out"),
                "--instances", "2", "--max-new-tokens", "4", "--languages", "en"]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
    finally:
        server.close()
    report = json.loads((tmp_path / "out" / "judge.json").read_text())["results"]["en"]
    assert report["reasoning_capability"]["mean"] == 3 and report["reasoning_capability"]["n_scored"] == 6
    assert report["mathematical_correctness_binary"]["mean"] == 1 and report["reasoning_capability"]["unparseable"] == {
        "no [RESULT]": 0,
        "out of range": 0,
    }
    # 2 instances x 3 styles x 2 criteria judged; each styled prompt is one of the card's, its answer generated text
    assert len(seen) == 12 and len({p for p, _ in seen}) == 6
    assert all(any(p.startswith(pre) and p.endswith(suf) for pre, suf in CARD_STYLES) for p, _ in seen)
    assert all(a.strip() for _, a in seen)
