"""Preference adapters: raw rows of each preference source -> pairs of the DPO stage.

Every adapter has the signature of the SFT adapters (:mod:`alia_nemo.data.adapters`)::

    adapt_xxx(rows, *, source, languages, drops, options=None) -> Iterator[dict]

and yields pair records ``{"id", "source", "language", "prompt", "chosen", "rejected"}``: ``prompt`` a list of
``{"role", "content"}`` messages (meant to end with the user turn both answers reply to), ``chosen`` and
``rejected`` the two answers' texts (contents read by :func:`alia_nemo.model.chatml.content_text`). A row that
can not be turned into a pair is counted in ``drops[(language or "unknown", reason)]`` under a short, stable
reason, never skipped silently: rows in == pairs + drops for every adapter. The language rules are the SFT
adapters' (``unknown_language``, ``language_not_requested``, ``missing language``).

The adapters only take rows apart. Whether a pair can be trained (the prompt ends with a user turn, both answers
are non-empty and differ, no ChatML control token) is decided once, for every source alike, by
:func:`alia_nemo.model.chatml.check_preference` when the pairs are prepared (:mod:`alia_nemo.data.preference`),
which also drops duplicate pairs across sources. Ids are the source's where it has them (a re-used id gets a
content-hash suffix), else a content hash.

Schemas (checked against the dataset cards and public code that reads them; nothing was downloaded):

- ``preference_jsonl``: our pair format, ``{"id"?, "language", "prompt": str | [messages], "chosen": str |
  [one assistant message], "rejected": same}``, or NeMo-RL's PreferenceDataset row ``{"context": [messages],
  "completions": [{"rank": int, "completion": [messages]}, ...]}`` (lower rank preferred; we take exactly two
  completions, each one assistant message; equal ranks are a tie).
- ``helpsteer3``: ``nvidia/HelpSteer3``, config ``preference`` (CC-BY-4.0): ``domain`` (general, stem, code,
  multilingual), ``language`` (a language name such as "english", or for the code domain a programming
  language), ``context`` (list of ``{role, content}``), ``response1``, ``response2``, ``overall_preference``
  (-3..3: negative prefers response1, positive response2, 0 a tie), ``individual_preference`` (not read).
- ``ultrafeedback_binarized``: ``HuggingFaceH4/ultrafeedback_binarized``, splits ``train_prefs`` /
  ``test_prefs`` (MIT, English): ``prompt``, ``prompt_id``, ``chosen`` and ``rejected`` (full message lists
  ending with the assistant answer), ``messages``, ``score_chosen``, ``score_rejected`` (floats).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from alia_nemo.data.adapters import _hash, _Sink, normalise_language
from alia_nemo.model.chatml import CONTENT_NOT_TEXT, content_text

PreferenceAdapter = Callable[..., Iterator[dict]]

# Stable drop reasons of the adapters (the prepare step adds its own: check_preference's, length, duplicates).
TIE = "tie (no preferred answer)"
NOT_A_PAIR = "not a preference row"
PROMPT_NOT_MESSAGES = "prompt is not text or a message list"
ANSWER_NOT_ONE_MESSAGE = "answer is not text or one assistant message"
TWO_COMPLETIONS = "needs exactly two ranked completions"
PROMPTS_DIFFER = "chosen and rejected prompts differ"
MISSING_ANSWER = "missing chosen or rejected answer"


class _PairSink(_Sink):
    """:class:`alia_nemo.data.adapters._Sink`'s language rules and drop counting, for pairs.

    Unlike SFT conversations, an exact duplicate is not dropped here: duplicates are found once, across every
    source, when the pairs are prepared, so that a duplicate is counted the same way wherever it comes from.
    """

    def __init__(self, source: str, drops: collections.Counter):
        super().__init__(source, drops)
        self._ids: set[str] = set()

    def pair(
        self, pair_id: str | None, language: str, prompt: list[dict[str, Any]], chosen: str, rejected: str
    ) -> dict[str, Any]:
        """The record of a pair; ids from ``pair_id`` (a content hash when None), made unique in this source."""
        payload = [prompt, chosen, rejected]
        base = f"{self.source}-{_hash(language, payload) if pair_id is None else pair_id}"
        unique = base if base not in self._ids else f"{base}-{_hash(payload, length=8)}"
        n = 1
        while unique in self._ids:  # the same content under the same id again: numbered (prepare drops it)
            n += 1
            unique = f"{base}-{_hash(payload, length=8)}-{n}"
        self._ids.add(unique)
        return {"id": unique, "source": self.source, "language": language, "prompt": prompt,
                "chosen": chosen, "rejected": rejected}  # fmt: skip


def _messages(value: Any) -> list[dict[str, Any]] | None:
    """A message list as ``[{"role", "content"}]`` (other keys left out), or None when it is not one.

    Roles and contents are kept as written: :func:`alia_nemo.model.chatml.check_preference` judges them later.
    """
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        return None
    out = []
    for message in value:
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            return None
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _prompt(value: Any) -> list[dict[str, Any]] | None:
    """Our pair format's prompt: a string is one user turn; a list is the conversation so far."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return _messages(value)


def _answer(value: Any) -> str | None:
    """An answer's text: a string, or a list holding exactly one assistant message; None when neither, or when
    that message's content is not text (:func:`_answer_problem` says which)."""
    if isinstance(value, str):
        return value
    messages = _messages(value)
    if messages is None or len(messages) != 1 or messages[0]["role"] != "assistant":
        return None
    return content_text(messages[0]["content"])


def _answer_problem(value: Any) -> str:
    """Why :func:`_answer` gave None: no answer, a content that is not text, or not one assistant message."""
    if value is None:
        return MISSING_ANSWER
    messages = _messages(value)
    if messages is not None and len(messages) == 1 and messages[0]["role"] == "assistant":
        return CONTENT_NOT_TEXT
    return ANSWER_NOT_ONE_MESSAGE


def _row_language(row: Mapping[str, Any], default: Any) -> tuple[str | None, Any]:
    raw = row.get("language") or default
    return normalise_language(raw), raw


def _completion_pair(row: Mapping[str, Any]) -> tuple[Any, Any] | str:
    """``(chosen, rejected)`` completions of a NeMo-RL PreferenceDataset row, or the drop reason."""
    completions = row.get("completions")
    if not isinstance(completions, Sequence) or isinstance(completions, (str, bytes)) or len(completions) != 2:
        return TWO_COMPLETIONS
    ranks = []
    for completion in completions:
        rank = completion.get("rank") if isinstance(completion, Mapping) else None
        if not isinstance(rank, int) or isinstance(rank, bool) or "completion" not in completion:
            return TWO_COMPLETIONS
        ranks.append(rank)
    if ranks[0] == ranks[1]:
        return TIE
    first, second = (completions[0], completions[1]) if ranks[0] < ranks[1] else (completions[1], completions[0])
    return first["completion"], second["completion"]


def adapt_preference_jsonl(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    languages: Sequence[str],
    drops: collections.Counter,
    options: Mapping[str, Any] | None = None,
) -> Iterator[dict]:
    """Local JSONL/Parquet pairs in our format or NeMo-RL's PreferenceDataset shape (see the module docstring).

    The language is the row's ``language``, else ``options["language"]``; rows with neither are dropped as
    "missing language". Ids are the row's ``id``, else a content hash.
    """
    default = (options or {}).get("language")
    sink = _PairSink(source, drops)
    for row in rows:
        language, raw = _row_language(row, default)
        if not sink.wanted(language, languages, raw):
            continue
        assert language is not None  # wanted() is only true for a requested language
        if "completions" in row or "context" in row:
            prompt = _messages(row.get("context"))
            answers = _completion_pair(row)
        elif "prompt" in row:
            prompt = _prompt(row.get("prompt"))
            answers = (row.get("chosen"), row.get("rejected"))
        else:
            sink.drop(language, NOT_A_PAIR)
            continue
        if prompt is None:
            sink.drop(language, PROMPT_NOT_MESSAGES)
            continue
        if isinstance(answers, str):
            sink.drop(language, answers)
            continue
        chosen, rejected = _answer(answers[0]), _answer(answers[1])
        if chosen is None or rejected is None:
            sink.drop(language, _answer_problem(answers[0] if chosen is None else answers[1]))
            continue
        row_id = row.get("id")
        yield sink.pair(None if row_id is None else str(row_id).strip(), language, prompt, chosen, rejected)


def adapt_helpsteer3(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    languages: Sequence[str],
    drops: collections.Counter,
    options: Mapping[str, Any] | None = None,
) -> Iterator[dict]:
    """nvidia/HelpSteer3 (config ``preference``): ``context`` answered by ``response1`` and ``response2``.

    ``overall_preference`` < 0 prefers ``response1``, > 0 ``response2``; 0 is a tie (dropped). The language
    is the row's ``language`` (a name: "english", "spanish", ...). In the code domain that field names a
    programming language, so code rows take ``options["code_language"]`` (e.g. "en") and are dropped as
    "code domain without options.code_language" when it is not set. ``options["domains"]`` (default: all)
    keeps only the listed domains. The rows have no id: ids hash the content.
    """
    options = options or {}
    listed = options.get("domains") or []
    domains = {str(d).lower() for d in ([listed] if isinstance(listed, str) else listed)}
    sink = _PairSink(source, drops)
    for row in rows:
        domain = str(row.get("domain") or "").strip().lower()
        if domain == "code":
            raw = options.get("code_language")
            language = normalise_language(raw)
            if raw is None:
                sink.drop(None, "code domain without options.code_language")
                continue
        else:
            language, raw = _row_language(row, None)
        if not sink.wanted(language, languages, raw):
            continue
        assert language is not None
        if domains and domain not in domains:
            sink.drop(language, "domain not selected")
            continue
        prompt = _messages(row.get("context"))
        if prompt is None:
            sink.drop(language, PROMPT_NOT_MESSAGES)
            continue
        preference = row.get("overall_preference")
        if not isinstance(preference, int) or isinstance(preference, bool):
            sink.drop(language, "overall_preference is not an integer")
            continue
        if preference == 0:
            sink.drop(language, TIE)
            continue
        first, second = row.get("response1"), row.get("response2")
        chosen, rejected = (first, second) if preference < 0 else (second, first)
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            sink.drop(language, CONTENT_NOT_TEXT)
            continue
        yield sink.pair(None, language, prompt, chosen, rejected)


def adapt_ultrafeedback_binarized(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    languages: Sequence[str],
    drops: collections.Counter,
    options: Mapping[str, Any] | None = None,
) -> Iterator[dict]:
    """HuggingFaceH4/ultrafeedback_binarized (``train_prefs``/``test_prefs``): English pairs.

    ``chosen`` and ``rejected`` are whole conversations ending with the answer; the prompt is everything before
    it, and must be the same in both (else "chosen and rejected prompts differ"). Equal ``score_chosen`` and
    ``score_rejected`` are a tie (dropped). The language is ``options["language"]``, default English. Ids come
    from ``prompt_id``.
    """
    raw = (options or {}).get("language", "en")
    language = normalise_language(raw)
    sink = _PairSink(source, drops)
    for row in rows:
        if not sink.wanted(language, languages, raw):
            continue
        assert language is not None
        chosen_conv, rejected_conv = _messages(row.get("chosen")), _messages(row.get("rejected"))
        if not chosen_conv or not rejected_conv:
            sink.drop(language, "chosen or rejected is not a message list")
            continue
        if chosen_conv[-1]["role"] != "assistant" or rejected_conv[-1]["role"] != "assistant":
            sink.drop(language, "conversation does not end with the assistant answer")
            continue
        if chosen_conv[:-1] != rejected_conv[:-1]:
            sink.drop(language, PROMPTS_DIFFER)
            continue
        scores = row.get("score_chosen"), row.get("score_rejected")
        if all(isinstance(s, (int, float)) for s in scores) and scores[0] == scores[1]:
            sink.drop(language, TIE)
            continue
        chosen, rejected = content_text(chosen_conv[-1]["content"]), content_text(rejected_conv[-1]["content"])
        if chosen is None or rejected is None:
            sink.drop(language, CONTENT_NOT_TEXT)
            continue
        prompt_id = row.get("prompt_id")
        yield sink.pair(None if prompt_id is None else str(prompt_id), language, chosen_conv[:-1], chosen, rejected)


PREFERENCE_ADAPTERS: dict[str, PreferenceAdapter] = {
    "preference_jsonl": adapt_preference_jsonl,
    "helpsteer3": adapt_helpsteer3,
    "ultrafeedback_binarized": adapt_ultrafeedback_binarized,
}
