"""Source adapters: raw rows of each public SFT source -> ChatML conversations of the ALIA mixture.

Every adapter has the same signature::

    adapt_xxx(rows, *, source, languages, drops, options=None) -> Iterator[dict]

``rows`` are the rows exactly as ``datasets.load_dataset(...)`` yields them for that source (the source's
own field names and shapes); ``languages`` are the ISO 639-1 codes (of ca, en, es, eu, gl, pt) wanted from
it. Each yielded record is ``{"id", "source", "language", "messages"}`` and its messages pass
:func:`alia_nemo.model.chatml.validate_conversation`. Rows that can not be converted are counted in
``drops[(language or "unknown", reason)]`` with a short, stable reason, never skipped silently.
``wildchat_prompts`` is the exception: it extracts prompts (``{"id", "source", "language", "prompt"}``),
because ALIA's WildChat responses were regenerated internally and are not public.

Nothing is skipped uncounted by the adapters that turn one row into at most one conversation (all but
``flores`` and ``oasst2``, which pair or thread rows): every row read is yielded or counted, so rows in ==
conversations + drops. A row in a language outside the mixture's six is counted as
``("unknown", "unknown_language")``, one in a mixture language the dataset does not request as
``(language, "language_not_requested")``, one whose language is missing as ``("unknown", "missing language")``.

Message contents follow one policy, :func:`alia_nemo.model.chatml.content_text` (shared with ``data=jsonl``): a
string, or a list of ``{"type": "text", "text": ...}`` parts joined; any other content (a dict, a number,
an image part) drops the row as ``content_not_text``, never becomes its Python repr.

Ids are stable: derived from the source's own ids where it has them, otherwise from a hash of the content.
A source id seen twice gets a content-hash suffix; an exact duplicate conversation is dropped.

Schema notes (checked against dataset cards and public code that reads them; no data was downloaded):

- CoQCat follows the Hugging Face CoQA layout: ``story``, ``questions`` (list of str) and ``answers``
  (dict of lists ``input_text``/``answer_start``/``answer_end``); the raw-JSON shapes (lists of dicts)
  are accepted too. Whether rows also carry an ``id`` is unconfirmed: it is used when present.
- RAG_Multilingual columns are ``id, instruction, context, response, category, lang, extractive``
  (from public loaders); the type of ``id`` and ``extractive`` is unconfirmed (only ``str(id)`` is used).
- FLORES+ metadata columns (``url, domain, topic, has_image, has_hyperlink, last_updated``) are not read,
  so their exact types do not matter here.
- TowerBlocks ``lang`` is a single code ("en") or a translation pair ("en-de"); a pair's conversation
  language is its target side. MentorES/MentorCA are assumed to have Dolly's columns.
"""

from __future__ import annotations

import collections
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from alia_nemo.config.schema import LANGUAGES as MIXTURE_LANGUAGES
from alia_nemo.model.chatml import (
    CONTENT_NOT_TEXT,
    IM_END,
    IM_START,
    ConversationError,
    content_text,
    validate_conversation,
)

Adapter = Callable[..., Iterator[dict]]


ISO3_TO_ISO1 = {"cat": "ca", "eng": "en", "spa": "es", "eus": "eu", "glg": "gl", "por": "pt"}
NAME_TO_ISO1 = {
    "catalan": "ca",
    "english": "en",
    "spanish": "es",
    "basque": "eu",
    "galician": "gl",
    "portuguese": "pt",
}


def normalise_language(value: Any) -> str | None:
    """An ISO 639-1 code from what sources write: "pt-BR"/"es_ES" -> "pt"/"es", "spa" -> "es", "Basque" -> "eu".

    Two-letter codes outside the mixture pass through lower-cased ("de"), so callers can tell "not wanted"
    apart from "unreadable"; ``None`` means the value says nothing usable.
    """
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip().lower()
    if text in NAME_TO_ISO1:
        return NAME_TO_ISO1[text]
    base = text.replace("_", "-").split("-")[0]
    if base in ISO3_TO_ISO1:
        return ISO3_TO_ISO1[base]
    if len(base) == 2 and base.isalpha():
        return base
    return None


def _text(value: Any) -> str:
    """A field as stripped text; missing (None) fields read as empty."""
    return "" if value is None else str(value).strip()


def _content(value: Any) -> str | None:
    """A text field under the content policy (:func:`alia_nemo.model.chatml.content_text`), stripped.

    None when it is not text.
    """
    text = content_text(value)
    return None if text is None else text.strip()


def _hash(*parts: Any, length: int = 16) -> str:
    """A short stable hex digest of JSON-serialisable parts (independent of PYTHONHASHSEED)."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def _problem(messages: Sequence[Mapping[str, str]]) -> str | None:
    """The drop reason for a built conversation, or None when it is trainable."""
    if any(message["content"] is None for message in messages):
        return CONTENT_NOT_TEXT
    for message in messages:
        if not message["content"]:
            return "empty message"
        if IM_START in message["content"] or IM_END in message["content"]:
            return "ChatML control token in text"
    try:
        validate_conversation(messages)
    except ConversationError:
        # Empty turns and control tokens were caught above, so what is left is the turn structure.
        return "invalid turn order"
    return None


class _Sink:
    """Builds output records for one adapter call: checks conversations, keeps ids unique, counts drops."""

    def __init__(self, source: str, drops: collections.Counter):
        self.source = source
        self.drops = drops
        # Every id handed out -> content hashes seen under it, to tell a re-used id from a duplicate row.
        self._seen: dict[str, set[str]] = {}

    def drop(self, language: str | None, reason: str) -> None:
        self.drops[(language or "unknown", reason)] += 1

    def wanted(self, language: str | None, languages: Sequence[str], raw: Any = None) -> bool:
        """True for a row in a requested language; any other row is counted here, so none goes uncounted.

        ``raw`` is the row's language field as written: when ``language`` is None it tells a missing
        language (empty) from one outside the mixture ("de", "French", "deu").
        """
        if language in languages:
            return True
        if language is not None and language in MIXTURE_LANGUAGES:
            self.drop(language, "language_not_requested")
        elif language is not None or (raw.strip() if isinstance(raw, str) else raw not in (None, [], {})):
            self.drop(None, "unknown_language")
        else:
            self.drop(None, "missing language")
        return False

    def unique_id(self, conv_id: str, language: str, payload: Any) -> str | None:
        """``conv_id`` if new; for a re-used id with other content a content-hash suffix; None (dropped) for a
        duplicate of content already given under that id."""
        digest = _hash(payload, length=8)
        variants = self._seen.get(conv_id)
        if variants is None:
            self._seen[conv_id] = {digest}
            return conv_id
        if digest in variants:
            self.drop(language, "duplicate conversation")
            return None
        variants.add(digest)
        alternative = f"{conv_id}-{digest}"
        self._seen.setdefault(alternative, {digest})
        return alternative

    def conversation(
        self, conv_id: str | None, language: str, messages: list[dict[str, str]], *, prefix: str
    ) -> dict | None:
        """The record for ``messages`` (ids from ``conv_id`` or, when None, a content hash), or None if dropped."""
        reason = _problem(messages)
        if reason is not None:
            self.drop(language, reason)
            return None
        base = f"{prefix}-{_hash(language, messages)}" if conv_id is None else f"{prefix}-{conv_id}"
        unique = self.unique_id(base, language, messages)
        if unique is None:
            return None
        return {"id": unique, "source": self.source, "language": language, "messages": messages}


def _text_or_empty(value: Any) -> str:
    """A field as stripped text when it is a string, else empty (for telling missing from unreadable)."""
    return value.strip() if isinstance(value, str) else ""


def _turn(role: str, content: Any) -> dict[str, str]:
    # A content that is not text stays None here; _problem drops the conversation as content_not_text.
    return {"role": role, "content": _content(content)}  # type: ignore[dict-item]


def _pair(user: str, assistant: str) -> list[dict[str, str]]:
    return [_turn("user", user), _turn("assistant", assistant)]


# --------------------------------------------------------------------------------------------- aya


def adapt_aya_dataset(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    languages: Sequence[str],
    drops: collections.Counter,
    options: Mapping[str, Any] | None = None,
) -> Iterator[dict]:
    """CohereForAI/aya_dataset: one user (``inputs``) / assistant (``targets``) pair per row.

    The language comes from ``language_code`` (ISO 639-3); the rows have no id, so ids hash the content.
    """
    sink = _Sink(source, drops)
    for row in rows:
        code = _text_or_empty(row.get("language_code"))
        language = ISO3_TO_ISO1.get(code.lower())
        if not sink.wanted(language, languages, code):
            continue
        user, assistant = _content(row.get("inputs")), _content(row.get("targets"))
        if user is None or assistant is None:
            sink.drop(language, CONTENT_NOT_TEXT)
            continue
        if not user:
            sink.drop(language, "empty prompt")
            continue
        if not assistant:
            sink.drop(language, "empty response")
            continue
        record = sink.conversation(None, language, _pair(user, assistant), prefix="aya")
        if record is not None:
            yield record


# ------------------------------------------------------------------------------------------ coqcat

COQCAT_TEMPLATE = "Llegeix el text següent i respon les preguntes.\n\n{story}\n\n{question}"


def _coqa_texts(value: Any) -> list[str] | None:
    """Question or answer texts from the shapes CoQA-style rows use, or None when unreadable.

    Hugging Face: a list of str, or a dict of lists with ``input_text``; raw JSON: a list of dicts with
    ``input_text``.
    """
    if isinstance(value, Mapping):
        texts = value.get("input_text")
        if not isinstance(texts, Sequence) or isinstance(texts, (str, bytes)):
            return None
        out = [_content(t) if isinstance(t, str) or t is None else None for t in texts]
        return None if None in out else out  # type: ignore[return-value]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        out = []
        for item in value:
            if isinstance(item, Mapping):
                item = item.get("input_text")
            if not (isinstance(item, str) or item is None):
                return None
            out.append(_text(item))
        return out
    return None


def adapt_coqcat(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    languages: Sequence[str],
    drops: collections.Counter,
    options: Mapping[str, Any] | None = None,
) -> Iterator[dict]:
    """projecte-aina/CoQCat: one multi-turn conversation per story (Catalan).

    The first user turn is :data:`COQCAT_TEMPLATE` (story + first question); later user turns are the
    following questions; assistant turns are the answers' ``input_text``.
    """
    sink = _Sink(source, drops)
    for row in rows:
        if not sink.wanted("ca", languages):  # every row is Catalan: counted when Catalan is not requested
            continue
        story = _content(row.get("story"))
        questions, answers = _coqa_texts(row.get("questions")), _coqa_texts(row.get("answers"))
        if story is None:
            sink.drop("ca", CONTENT_NOT_TEXT)
            continue
        if not story:
            sink.drop("ca", "empty story")
            continue
        if not questions or answers is None:
            sink.drop("ca", "no questions")
            continue
        if len(questions) != len(answers):
            sink.drop("ca", "questions and answers differ in number")
            continue
        if not all(questions) or not all(answers):
            sink.drop("ca", "empty question or answer")
            continue
        messages = [_turn("user", COQCAT_TEMPLATE.format(story=story, question=questions[0]))]
        messages.append(_turn("assistant", answers[0]))
        for question, answer in zip(questions[1:], answers[1:]):
            messages += _pair(question, answer)
        row_id = row.get("id")
        record = sink.conversation(None if row_id is None else _text(row_id), "ca", messages, prefix="coqcat")
        if record is not None:
            yield record


# ------------------------------------------------------------------------------------------- dolly


def adapt_dolly(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    languages: Sequence[str],
    drops: collections.Counter,
    options: Mapping[str, Any] | None = None,
) -> Iterator[dict]:
    """Dolly-style rows (databricks-dolly-15k, dolly3k_ca, MentorES, MentorCA): instruction (+ context) -> response.

    The rows carry no language, so ``options["language"]`` is required (checked when called, not when
    iterated). The user turn is the instruction, followed by the context after a blank line when present.
    """
    language = normalise_language((options or {}).get("language"))
    if language is None:
        raise ValueError(
            f"source {source!r}: the dolly adapter needs options['language'] (its rows have no language "
            "field); set it to the ISO 639-1 code of the source, e.g. options={'language': 'ca'}"
        )
    return _dolly_rows(rows, source=source, language=language, languages=languages, drops=drops)


def _dolly_rows(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    language: str,
    languages: Sequence[str],
    drops: collections.Counter,
) -> Iterator[dict]:
    sink = _Sink(source, drops)
    for row in rows:
        if not sink.wanted(language, languages):  # every row has the option's language: count them all
            continue
        instruction, context, response = (_content(row.get(k)) for k in ("instruction", "context", "response"))
        if instruction is None or context is None or response is None:
            sink.drop(language, CONTENT_NOT_TEXT)
            continue
        if not instruction:
            sink.drop(language, "empty instruction")
            continue
        if not response:
            sink.drop(language, "empty response")
            continue
        user = f"{instruction}\n\n{context}" if context else instruction
        row_id = row.get("id")
        record = sink.conversation(
            None if row_id is None else _text(row_id), language, _pair(user, response), prefix="dolly"
        )
        if record is not None:
            yield record


# ------------------------------------------------------------------------------------------ flores

# A translation request written in the target language; {source} is the "from <language>" phrase in the
# target language (with its article contraction), {text} the source sentence.
FLORES_TEMPLATES = {
    "ca": "Tradueix el text següent {source} al català:\n\n{text}",
    "en": "Translate the following text from {source} into English:\n\n{text}",
    "es": "Traduce el siguiente texto del {source} al español:\n\n{text}",
    "eu": "Itzuli hurrengo testua {source} euskarara:\n\n{text}",
    "gl": "Traduce o seguinte texto do {source} ao galego:\n\n{text}",
    "pt": "Traduza o seguinte texto do {source} para o português:\n\n{text}",
}
FLORES_SOURCE_PHRASES = {
    "ca": {"en": "de l'anglès", "es": "del castellà", "eu": "del basc", "gl": "del gallec", "pt": "del portuguès"},
    "en": {"ca": "Catalan", "es": "Spanish", "eu": "Basque", "gl": "Galician", "pt": "Portuguese"},
    "es": {"ca": "catalán", "en": "inglés", "eu": "euskera", "gl": "gallego", "pt": "portugués"},
    "eu": {"ca": "katalanetik", "en": "ingelesetik", "es": "gaztelaniatik", "gl": "galizieratik", "pt": "portugesetik"},
    "gl": {"ca": "catalán", "en": "inglés", "es": "castelán", "eu": "éuscaro", "pt": "portugués"},
    "pt": {"ca": "catalão", "en": "inglês", "es": "espanhol", "eu": "basco", "gl": "galego"},
}


def flores_source_languages(sentence_id: Any, target: str, candidates: Iterable[str]) -> list[str]:
    """Every source language for translating sentence ``sentence_id`` into ``target``, in a stable order.

    The other candidates, sorted, rotated so that a hash of ``(sentence_id, target)`` picks the first; the
    rest follow in that rotation. Depends only on the id, the target and the set of candidates, never on
    row order.
    """
    ordered = sorted(set(candidates) - {target})
    if not ordered:
        raise ValueError(f"no source language for sentence {sentence_id} into {target}")
    digest = hashlib.sha256(f"{sentence_id}:{target}".encode()).hexdigest()
    first = int(digest, 16) % len(ordered)
    return ordered[first:] + ordered[:first]


def flores_source_language(sentence_id: Any, target: str, candidates: Iterable[str]) -> str:
    """The first source language of :func:`flores_source_languages`: a stable hash pick among the others."""
    return flores_source_languages(sentence_id, target, candidates)[0]


def adapt_flores(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    languages: Sequence[str],
    drops: collections.Counter,
    options: Mapping[str, Any] | None = None,
) -> Iterator[dict]:
    """openlanguagedata/flores_plus (dev): rows of several language configs -> translation requests.

    Pairing needs every language's sentence for an id, so the rows are collected first (about 1,000
    sentences per language: small). For each sentence id and each requested target language present, there
    is one conversation per other language present among the six (the source; up to five): the user turn is
    the target language's template with the source sentence, the assistant turn the target sentence. These
    are distinct conversations (their user turns differ in source language phrase and text), so the dev set's
    997 sentences give up to 4,985 per target, enough for the card's 1,745 Spanish ones plus the validation
    share. Only Latin-script configs of the six mixture languages are read; other configs are not wanted.

    Order (deterministic, independent of row order): in passes. Pass 0 has every (sentence, target) once,
    with the source :func:`flores_source_language` picks (exactly what the earlier one-source-per-sentence
    version yielded, in the same order); pass ``k`` has the ``k``-th source of :func:`flores_source_languages`
    for the pairs that have one. A consumer that takes the first N therefore uses every sentence once before
    any twice. Each record carries its pass as ``tier``: the mixture (:mod:`alia_nemo.data.mixture`) shuffles
    each language's conversations with its seed and then takes lower tiers first, so its choice stays exact
    and seeded, covers every sentence before it repeats one (the card's 766 Catalan conversations are 766
    sentences), and draws each sentence's extra sources at random.
    """
    sink = _Sink(source, drops)
    sentences: dict[Any, dict[str, str]] = collections.defaultdict(dict)
    for row in rows:
        language = ISO3_TO_ISO1.get(_text(row.get("iso_639_3")).lower())
        if language is None or _text(row.get("iso_15924")) not in ("", "Latn"):
            continue
        text = _content(row.get("text"))
        if text is None:
            sink.drop(language, CONTENT_NOT_TEXT)
            continue
        if not text:
            sink.drop(language, "empty text")
            continue
        sentence_id = row.get("id")
        if sentence_id is None:
            sink.drop(language, "missing sentence id")
            continue
        if isinstance(sentence_id, bool) or not isinstance(sentence_id, (str, int)):
            sink.drop(language, "malformed sentence id")  # ids key a dict and are sorted: str or int only
            continue
        if language in sentences[sentence_id]:
            sink.drop(language, "duplicate sentence")
            continue
        sentences[sentence_id][language] = text

    # (sentence id, target) -> its sources in order; the drops are counted once per pair, not per pass.
    pairs: list[tuple[Any, str, list[str]]] = []
    for sentence_id in sorted(sentences, key=lambda s: (str(type(s)), s)):
        available = sentences[sentence_id]
        for target in languages:
            if target not in available or target not in FLORES_TEMPLATES:
                continue
            if len(available) < 2:
                sink.drop(target, "no source sentence")
                continue
            pairs.append((sentence_id, target, flores_source_languages(sentence_id, target, available)))

    for rank in range(max((len(sources) for _, _, sources in pairs), default=0)):
        for sentence_id, target, sources in pairs:
            if rank >= len(sources):
                continue
            available, src = sentences[sentence_id], sources[rank]
            prompt = FLORES_TEMPLATES[target].format(source=FLORES_SOURCE_PHRASES[target][src], text=available[src])
            record = sink.conversation(
                f"{sentence_id}-{src}-{target}", target, _pair(prompt, available[target]), prefix="flores"
            )
            if record is not None:
                yield {**record, "tier": rank}  # the mixture takes every sentence once before any twice


# --------------------------------------------------------------------------------------- no_robots


def _chat_messages(turns: Any, role_key: str, content_key: str, role_map: Mapping[str, str]) -> list | str:
    """Messages from a list of turn dicts, or a drop reason (str) when a turn can not be mapped."""
    if not isinstance(turns, Sequence) or isinstance(turns, str) or not turns:
        return "no messages"
    messages = []
    for turn in turns:
        if not isinstance(turn, Mapping):
            return "malformed message"
        role = role_map.get(_text(turn.get(role_key)))
        if role is None:
            return "unknown role"
        messages.append(_turn(role, turn.get(content_key)))
    if any(m["role"] == "system" for m in messages[1:]):
        return "system turn not first"
    return messages


_CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


def adapt_no_robots(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    languages: Sequence[str],
    drops: collections.Counter,
    options: Mapping[str, Any] | None = None,
) -> Iterator[dict]:
    """HuggingFaceH4/no_robots (English): ``messages`` as they are; a system turn is kept only when first."""
    yield from _english_messages(rows, languages, _Sink(source, drops), id_key="prompt_id", prefix="no_robots")


def _english_messages(
    rows: Iterable[Mapping[str, Any]], languages: Sequence[str], sink: _Sink, *, id_key: str, prefix: str
) -> Iterator[dict]:
    """English sources whose rows already hold ``messages`` with role/content (no_robots, OpenR1-Math)."""
    for row in rows:
        if not sink.wanted("en", languages):  # every row is English: counted when English is not requested
            continue
        messages = _chat_messages(row.get("messages"), "role", "content", _CHAT_ROLES)
        if isinstance(messages, str):
            sink.drop("en", messages)
            continue
        row_id = row.get(id_key)
        record = sink.conversation(None if row_id is None else _text(row_id), "en", messages, prefix=prefix)
        if record is not None:
            yield record


# ------------------------------------------------------------------------------------------ oasst2

_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _oasst_order(message: Mapping[str, Any]) -> tuple:
    """Sort key for siblings: best rank first (None after ranked ones), then oldest, then id."""
    rank = message.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or rank != rank:
        rank = None  # unranked: a rank of another type (or NaN) can not be compared
    return (
        rank is None,
        rank if rank is not None else 0,
        _text(message.get("created_date")),
        _text(message.get("message_id")),
    )


def _oasst_removal(message: Mapping[str, Any]) -> str | None:
    if message.get("deleted"):
        return "deleted"
    if message.get("review_result") is False:
        return "failed review"
    return None


def adapt_oasst2(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    languages: Sequence[str],
    drops: collections.Counter,
    options: Mapping[str, Any] | None = None,
) -> Iterator[dict]:
    """OpenAssistant/oasst2 flat message rows -> one thread per message tree.

    Threads need whole trees and rows are not guaranteed grouped, so all rows are collected first (about
    135k small messages). Deleted messages and those that failed review are removed with their subtrees;
    each removed message is counted once, under the reason of the removal that took it ("deleted" or
    "failed review"). From each root prompter message in a requested language the thread follows the
    best-ranked surviving reply at every step (lowest ``rank``; unranked after ranked; ties by
    ``created_date``) down to a leaf; a trailing prompter message is trimmed. The conversation language is
    the root's ``lang`` (normalised, "pt-BR" -> "pt"). Messages whose parent is missing are counted as
    "orphan message".
    """
    sink = _Sink(source, drops)
    by_id: dict[str, Mapping[str, Any]] = {}
    children: dict[str, list[Mapping[str, Any]]] = collections.defaultdict(list)
    roots: list[Mapping[str, Any]] = []
    for row in rows:
        message_id = _text(row.get("message_id"))
        if not message_id:
            sink.drop(normalise_language(row.get("lang")), "missing message id")
            continue
        by_id[message_id] = row
        parent = row.get("parent_id")
        if parent is None or _text(parent) == "":
            roots.append(row)
        else:
            children[_text(parent)].append(row)

    reached: set[str] = set()
    for root in sorted(roots, key=lambda r: (_text(r.get("created_date")), _text(r.get("message_id")))):
        language = normalise_language(root.get("lang"))
        wanted = language in languages
        # Walk the whole tree: marks what is reachable (for orphans) and removes failed subtrees.
        removed: dict[str, str] = {}
        stack = [(root, None)]
        while stack:
            message, inherited = stack.pop()
            message_id = _text(message.get("message_id"))
            reached.add(message_id)
            reason = inherited or _oasst_removal(message)
            if reason is not None:
                removed[message_id] = reason
                if wanted:
                    sink.drop(language, reason)
            stack.extend((child, reason) for child in children.get(message_id, ()))
        if not wanted or _text(root.get("message_id")) in removed:
            continue
        if _text(root.get("role")) != "prompter":
            sink.drop(language, "root is not a prompter message")
            continue

        thread = [root]
        while True:
            alive = [
                c
                for c in children.get(_text(thread[-1].get("message_id")), ())
                if _text(c.get("message_id")) not in removed
            ]
            if not alive:
                break
            thread.append(min(alive, key=_oasst_order))
        while thread and _text(thread[-1].get("role")) == "prompter":
            thread.pop()
        if not thread:
            sink.drop(language, "no assistant reply")
            continue
        if any(_text(m.get("role")) not in _OASST_ROLES for m in thread):
            sink.drop(language, "unknown role")
            continue
        messages = [_turn(_OASST_ROLES[_text(m.get("role"))], m.get("text")) for m in thread]
        tree_id = _text(root.get("message_tree_id")) or _text(root.get("message_id"))
        record = sink.conversation(tree_id, language, messages, prefix="oasst2")
        if record is not None:
            yield record

    for message_id, message in by_id.items():
        if message_id not in reached:
            language = normalise_language(message.get("lang"))
            if language in languages:
                sink.drop(language, "orphan message")


# ------------------------------------------------------------------------------------- openr1_math


def adapt_openr1_math(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    languages: Sequence[str],
    drops: collections.Counter,
    options: Mapping[str, Any] | None = None,
) -> Iterator[dict]:
    """open-r1/OpenR1-Math-220k (default config, English): the row's ``messages`` (problem -> reasoning + answer)."""
    yield from _english_messages(rows, languages, _Sink(source, drops), id_key="uuid", prefix="openr1_math")


# -------------------------------------------------------------------------------- rag_multilingual


def adapt_rag_multilingual(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    languages: Sequence[str],
    drops: collections.Counter,
    options: Mapping[str, Any] | None = None,
) -> Iterator[dict]:
    """projecte-aina/RAG_Multilingual (ca/en/es): user = context, blank line, question; assistant = response.

    Rows without context are dropped: an answer with nothing to ground it teaches the wrong habit.
    """
    sink = _Sink(source, drops)
    for row in rows:
        language = normalise_language(row.get("lang"))
        if not sink.wanted(language, languages, row.get("lang")):
            continue
        instruction, context, response = (_content(row.get(k)) for k in ("instruction", "context", "response"))
        if instruction is None or context is None or response is None:
            sink.drop(language, CONTENT_NOT_TEXT)
            continue
        if not instruction:
            sink.drop(language, "empty instruction")
            continue
        if not context:
            sink.drop(language, "empty context")
            continue
        if not response:
            sink.drop(language, "empty response")
            continue
        row_id = row.get("id")
        record = sink.conversation(
            None if row_id is None else _text(row_id),
            language,
            _pair(f"{context}\n\n{instruction}", response),
            prefix="rag_multilingual",
        )
        if record is not None:
            yield record


# -------------------------------------------------------------------------------------- towerblocks

_TOWER_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def towerblocks_language(lang: Any) -> str | None:
    """A TowerBlocks ``lang`` as one language: "en" -> "en"; a pair "en-es" -> its target side "es"."""
    parts = [p for p in _text(lang).replace("_", "-").split("-") if p]
    if not parts:
        return None
    return normalise_language(parts[1] if len(parts) == 2 else parts[0])


def adapt_towerblocks(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    languages: Sequence[str],
    drops: collections.Counter,
    options: Mapping[str, Any] | None = None,
) -> Iterator[dict]:
    """Unbabel/TowerBlocks-v0.2: ``conversations`` [{from: human|gpt|system, value}] as they are.

    Options: ``exclude_datasets`` lists sub-dataset names (``dataset`` field) to leave out, e.g. for
    their licence; wanted rows from them are counted as "excluded sub-dataset (licence)".
    """
    excluded = {str(d) for d in (options or {}).get("exclude_datasets", ())}
    sink = _Sink(source, drops)
    for row in rows:
        language = towerblocks_language(row.get("lang"))
        if language is None:
            sink.drop(None, "unrecognised language")
            continue
        if not sink.wanted(language, languages, row.get("lang")):
            continue
        if _text(row.get("dataset")) in excluded:
            sink.drop(language, "excluded sub-dataset (licence)")
            continue
        messages = _chat_messages(row.get("conversations"), "from", "value", _TOWER_ROLES)
        if isinstance(messages, str):
            sink.drop(language, messages)
            continue
        record = sink.conversation(None, language, messages, prefix="towerblocks")
        if record is not None:
            yield record


# --------------------------------------------------------------------------------- wildchat_prompts


def adapt_wildchat_prompts(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    languages: Sequence[str],
    drops: collections.Counter,
    options: Mapping[str, Any] | None = None,
) -> Iterator[dict]:
    """allenai/WildChat-1M -> PROMPT records ``{"id", "source", "language", "prompt"}``, not conversations.

    ALIA's WildChat responses were regenerated internally (not public), so only the first user turn is
    taken, for whoever supplies responses. The language is the conversation's ``language`` (a full English
    name); toxic and redacted conversations are dropped and counted.
    """
    sink = _Sink(source, drops)
    for row in rows:
        raw = _text_or_empty(row.get("language"))
        language = NAME_TO_ISO1.get(raw.lower())
        turns = row.get("conversation")
        turns = turns if isinstance(turns, Sequence) and not isinstance(turns, (str, bytes)) else []
        first = next((t for t in turns if isinstance(t, Mapping) and t.get("role") == "user"), None)
        if language is None and first is not None:
            first_raw = _text_or_empty(first.get("language"))
            language = NAME_TO_ISO1.get(first_raw.lower())
            raw = raw or first_raw
        if not sink.wanted(language, languages, raw):
            continue
        if row.get("toxic") or (first is not None and first.get("toxic")):
            sink.drop(language, "toxic")
            continue
        if row.get("redacted") or (first is not None and first.get("redacted")):
            sink.drop(language, "redacted")
            continue
        if first is None:
            sink.drop(language, "no user turn")
            continue
        prompt = _content(first.get("content"))
        if prompt is None:
            sink.drop(language, CONTENT_NOT_TEXT)
            continue
        if not prompt:
            sink.drop(language, "empty prompt")
            continue
        if IM_START in prompt or IM_END in prompt:
            sink.drop(language, "ChatML control token in text")
            continue
        conv_hash = _text(row.get("conversation_hash")) or _hash(language, prompt)
        unique = sink.unique_id(conv_hash, language, prompt)
        if unique is not None:
            yield {"id": unique, "source": source, "language": language, "prompt": prompt}


# ----------------------------------------------------------------------------------------- messages


def adapt_messages(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    languages: Sequence[str],
    drops: collections.Counter,
    options: Mapping[str, Any] | None = None,
) -> Iterator[dict]:
    """Local messages files (the internal sets): rows ``{"messages", "id"?, "language"?}``.

    The language is the row's, else ``options["language"]``; rows with neither are dropped as
    "missing language". Ids are the row's, else a content hash.
    """
    default = (options or {}).get("language")
    sink = _Sink(source, drops)
    for row in rows:
        raw = row.get("language") or default
        if not sink.wanted(normalise_language(raw), languages, raw):
            continue
        language = normalise_language(raw)
        messages = _chat_messages(row.get("messages"), "role", "content", _CHAT_ROLES)
        if isinstance(messages, str):
            sink.drop(language, messages)
            continue
        row_id = row.get("id")
        record = sink.conversation(None if row_id is None else _text(row_id), language, messages, prefix=source)
        if record is not None:
            yield record


# Adapters whose records are prompts, not conversations: a mixture can not train on them.
PROMPT_ADAPTERS = frozenset({"wildchat_prompts"})
# Adapters that turn each row into at most one record, so that rows in == records + drops (the others pair
# sentences or thread messages).
ONE_TO_ONE_ADAPTERS = frozenset(
    {"aya_dataset", "coqcat", "dolly", "no_robots", "openr1_math", "rag_multilingual", "towerblocks",
     "wildchat_prompts", "messages"}
)  # fmt: skip

ADAPTERS: dict[str, Adapter] = {
    "aya_dataset": adapt_aya_dataset,
    "coqcat": adapt_coqcat,
    "dolly": adapt_dolly,
    "flores": adapt_flores,
    "no_robots": adapt_no_robots,
    "oasst2": adapt_oasst2,
    "openr1_math": adapt_openr1_math,
    "rag_multilingual": adapt_rag_multilingual,
    "towerblocks": adapt_towerblocks,
    "wildchat_prompts": adapt_wildchat_prompts,
    "messages": adapt_messages,
}
