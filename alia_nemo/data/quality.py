"""The SFT mixture's optional LLM quality filter: a judge scores candidate conversations, low scores are dropped.

The judge is the one ``alia-nemo eval judge`` uses: an OpenAI-compatible endpoint (Prometheus-2 by default)
called through :class:`alia_nemo.eval.niah.OpenAIBackend` (timeouts, retries with backoff), prompted with the
card's absolute-grading prompt (:data:`alia_nemo.eval.niah.JUDGE_PROMPT`) and read with
:func:`alia_nemo.eval.judge.parse_score`. A conversation is shown as an instruction (its system prompt and user
turns) and a response (its assistant turns), graded against the configured rubric.

Every outcome is accounted for:

* a score ``>= threshold`` keeps the row; a lower one drops it under ``below quality threshold (score < T)``;
* a judgement without a valid score (``quality: no [RESULT]``, ``quality: out of range``) drops the row under
  that reason (``on_unscored=drop``, the default) or keeps it, counted as kept unscored (``on_unscored=keep``);
* an endpoint that fails (after its retries) stops the build with an error naming it. It is never turned into
  drops: the prepared mixture is cached by its key, so a mixture shaped by an outage would be reused for good.

Scores are cached in ``<cache_dir>/scores.jsonl``, one line per judgement, appended (and fsynced) as each
arrives: a killed prepare keeps every score it paid for, and a rerun (any seed, any mixture using the same
judge model, rubric and scale) asks the judge only about conversations it has not scored yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alia_nemo.config.schema import QualityFilterConfig
from alia_nemo.data.reader import DataError
from alia_nemo.eval.judge import parse_score
from alia_nemo.eval.niah import JUDGE_PROMPT, EndpointError, OpenAIBackend

SCORES_FILE = "scores.jsonl"
DEFAULT_CACHE_DIR = "quality-scores"  # under prepared_root; never a mixture's directory (those end in -<key16>)
JUDGE_MAX_TOKENS = 1024  # what ``eval judge`` gives Prometheus for its feedback and "[RESULT] n"
# The settings that change a score or the selection: they enter the mixture's cache key. The endpoint, the
# concurrency, timeouts, retries and cache_dir only change how scores are obtained, not what they are.
KEY_FIELDS = ("model", "rubric", "min_score", "max_score", "threshold", "on_unscored")


@dataclass(frozen=True)
class Verdict:
    """The judge's score of one conversation, or why it gave none (``"no [RESULT]"`` / ``"out of range"``)."""

    score: int | None
    unscored: str | None = None


def render(messages: list[dict[str, str]]) -> tuple[str, str]:
    """The (instruction, response) the judge grades: user turns (after any system prompt) and assistant turns.

    A single exchange is shown as its two texts. Several turns are numbered on both sides, so the judge can pair
    each answer with the request it answers.
    """
    system = [m["content"] for m in messages if m["role"] == "system"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if len(users) == 1 and len(answers) == 1:
        instruction, response = users[0], answers[0]
    else:
        instruction = "\n\n".join(f"[Turn {i} - user]\n{text}" for i, text in enumerate(users, 1))
        response = "\n\n".join(f"[Turn {i} - assistant]\n{text}" for i, text in enumerate(answers, 1))
    if system:
        instruction = "[System prompt]\n" + "\n\n".join(system) + "\n\n" + instruction
    return instruction, response


def judge_prompt(qf: QualityFilterConfig, messages: list[dict[str, str]]) -> str:
    """The card's absolute-grading prompt for one conversation under the configured rubric and scale."""
    instruction, response = render(messages)
    return JUDGE_PROMPT.format(a=qf.min_score, b=qf.max_score, input=instruction, prediction=response,
                               criteria=qf.rubric)  # fmt: skip


def score_key(qf: QualityFilterConfig, messages: list[dict[str, str]]) -> str:
    """The cache key of a judgement: the exact conversation, rubric, judge model, scale and prompt.

    The conversation is hashed exactly (not normalised like the dedup hash): the judge saw exactly this text. The
    rendered prompt's hash makes a change of the prompt template or of the rendering a new key as well.
    """
    conversation = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    parts = {
        "conversation": hashlib.sha256(conversation.encode()).hexdigest(),
        "rubric": hashlib.sha256(qf.rubric.encode()).hexdigest(),
        "model": qf.model,
        "scale": [qf.min_score, qf.max_score],
        "prompt": hashlib.sha256(judge_prompt(qf, messages).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def key_settings(qf: QualityFilterConfig | None) -> dict[str, Any] | None:
    """What of the filter enters the mixture's cache key (None when the filter is off)."""
    return None if qf is None else qf.model_dump(mode="json", include=set(KEY_FIELDS))


class ScoreCache:
    """``scores.jsonl``: one ``{"key", "score", "unscored", "model", "judgement"}`` object a line, append-only.

    Lines that do not read back (the tail of a killed write, a line garbled by two writers on a shared
    filesystem) are skipped: those conversations are simply judged again.
    """

    def __init__(self, directory: Path):
        self.path = Path(directory) / SCORES_FILE
        self.scores: dict[str, Verdict] = {}
        self.skipped = 0
        self._lock = threading.Lock()
        self._newline = False  # the file ends in a cut line: start the next record on a line of its own
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            raw = self.path.read_bytes()
            self._newline = bool(raw) and not raw.endswith(b"\n")
            for line in raw.split(b"\n"):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    self.scores[rec["key"]] = Verdict(rec["score"], rec["unscored"])
                except (ValueError, KeyError, TypeError):
                    self.skipped += 1

    def __contains__(self, key: str) -> bool:
        return key in self.scores

    def __getitem__(self, key: str) -> Verdict:
        return self.scores[key]

    def add(self, key: str, verdict: Verdict, model: str, judgement: str) -> None:
        """Append one judgement, on disk at once (thread-safe: the judge's workers call it as replies arrive)."""
        rec = {"key": key, "score": verdict.score, "unscored": verdict.unscored, "model": model,
               "judgement": judgement}  # fmt: skip
        line = ("\n" if self._newline else "") + json.dumps(rec, ensure_ascii=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
            self._newline = False
            self.scores[key] = verdict


class QualityFilter:
    """Scores conversations (cache first, then the judge, ``concurrency`` requests at a time) and decides on them.

    ``totals`` counts what the manifest reports: ``judged`` (rows kept or dropped on a judgement),
    ``cache_hits`` and ``requests`` (judgements looked up / asked for; rows scored ahead of need in the last
    batch of a language are paid for and cached, but not judged), ``kept``, ``kept_unscored`` and ``dropped``
    per reason.
    """

    def __init__(
        self,
        qf: QualityFilterConfig,
        prepared_root: Path,
        error: type[Exception] = DataError,
        log: Callable[[str], Any] | None = None,
    ):
        self.qf = qf
        self.error = error
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        folder = Path(qf.cache_dir).expanduser() if qf.cache_dir else Path(prepared_root) / DEFAULT_CACHE_DIR
        self.cache = ScoreCache(folder)
        if self.cache.skipped:
            self.log(f"[alia-nemo] quality filter: {self.cache.skipped} unreadable line(s) in {self.cache.path} "
                     "skipped; those conversations are judged again")  # fmt: skip
        self.backend = OpenAIBackend(qf.endpoint, qf.model, max_tokens=JUDGE_MAX_TOKENS, timeout=qf.timeout_s,
                                     retries=qf.retries, log=self.log)  # fmt: skip
        self.totals: Counter = Counter()
        self.dropped: Counter = Counter()
        self.kept_unscored: Counter = Counter()
        self._count_lock = threading.Lock()

    @property
    def batch(self) -> int:
        """The fewest conversations worth sending at once: enough to keep every worker busy."""
        return self.qf.concurrency

    def _judge(self, key: str, messages: list[dict[str, str]]) -> Verdict:
        judgement = self.backend.chat([{"role": "user", "content": judge_prompt(self.qf, messages)}], 0.0)
        score, reason = parse_score(judgement, self.qf.min_score, self.qf.max_score)
        verdict = Verdict(score, reason)
        self.cache.add(key, verdict, self.qf.model, judgement)
        with self._count_lock:
            self.totals["requests"] += 1
        return verdict

    def score(self, conversations: list[list[dict[str, str]]], where: str = "") -> list[Verdict]:
        """The verdict on each conversation, in order: from the cache, else from the judge (then cached).

        An endpoint failure cancels the requests not yet sent, waits for those in flight (their scores are
        cached) and raises ``error`` naming the endpoint, ``where`` (dataset/language) and the score cache.
        """
        keys = [score_key(self.qf, m) for m in conversations]
        todo = {k: m for k, m in zip(keys, conversations) if k not in self.cache}  # one request per distinct text
        self.totals["cache_hits"] += len(keys) - sum(k in todo for k in keys)
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.qf.concurrency, len(todo))) as pool:
                futures = [pool.submit(self._judge, k, m) for k, m in todo.items()]
                try:
                    for f in as_completed(futures):
                        f.result()
                except EndpointError as exc:
                    for other in futures:
                        other.cancel()  # not sent yet: skipped; requests in flight finish and are cached
                    raise self.error(
                        f"quality filter{' (' + where + ')' if where else ''}: the judge at {self.qf.endpoint} "
                        f"failed: {exc}. The {len(self.cache.scores)} score(s) obtained so far are kept in "
                        f"{self.cache.path}; rerun prepare once the judge is up (data.quality_filter.endpoint) to "
                        "continue from there, or set data.quality_filter=null to build without the filter"
                    ) from None
                except BaseException:
                    for other in futures:
                        other.cancel()
                    raise
        return [self.cache[k] for k in keys]

    def decide(self, verdict: Verdict) -> str | None:
        """None to keep the row, else the reason it is dropped (counted in ``totals`` here too)."""
        self.totals["judged"] += 1
        if verdict.score is None:
            reason = f"quality: {verdict.unscored}"
            if self.qf.on_unscored == "keep":
                self.kept_unscored[reason] += 1
                return None
        elif verdict.score < self.qf.threshold:
            reason = f"below quality threshold (score < {self.qf.threshold})"
        else:
            self.totals["kept"] += 1
            return None
        self.dropped[reason] += 1
        return reason

    def report(self) -> dict[str, Any]:
        """The manifest's ``quality_filter`` entry: the settings and what the filter did."""
        return {
            **self.qf.model_dump(mode="json", exclude={"cache_dir", "rubric"}),
            "rubric": self.qf.rubric,
            "rubric_sha256": hashlib.sha256(self.qf.rubric.encode()).hexdigest(),
            "score_cache": str(self.cache.path),
            "judged": self.totals["judged"],
            "cache_hits": self.totals["cache_hits"],
            "requests": self.totals["requests"],
            "kept": self.totals["kept"],
            "kept_unscored": dict(self.kept_unscored),
            "dropped": dict(self.dropped),
        }
