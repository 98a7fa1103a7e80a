"""Synthetic raw rows in the exact schema of every public SFT source (no data downloaded, nothing copied).

:func:`raw_rows` makes ``n`` deterministic rows for an adapter of :mod:`alia_nemo.data.adapters`, with every
field the real source has and realistic types and lengths (placeholder words from small per-language
vocabularies); the tests use it and so does the large synthetic run. The ``*_ROWS`` constants below are
small hand-written rows whose converted output the unit tests assert exactly.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alia_nemo.config.schema import LANGUAGES as ALL_LANGUAGES

ISO3 = {"ca": "cat", "en": "eng", "es": "spa", "eu": "eus", "gl": "glg", "pt": "por"}
NAMES = {"ca": "Catalan", "en": "English", "es": "Spanish", "eu": "Basque", "gl": "Galician", "pt": "Portuguese"}
GLOTTOCODES = {
    "ca": "stan1289",
    "en": "stan1293",
    "es": "stan1288",
    "eu": "basq1248",
    "gl": "gali1258",
    "pt": "port1283",
}


def _vocab(text: str) -> list[str]:
    return text.split()


# Small vocabularies so placeholder text at least looks like the language it claims to be.
VOCABULARY = {
    "ca": _vocab(
        "el la els les un una de del i o que per amb sense casa ciutat riu muntanya llibre escola temps any "
        "dia nit aigua terra gent història música ciència feina país mar cel bosc camí pont plaça carrer poble "
        "explica descriu quan on com perquè molt poc gran petit nou antic"
    ),
    "en": _vocab(
        "the a an of and or to in on with without house city river mountain book school time year day night "
        "water land people history music science work country sea sky forest road bridge square street town "
        "explain describe when where how why very little big small new old"
    ),
    "es": _vocab(
        "el la los las un una de del y o que por con sin casa ciudad río montaña libro escuela tiempo año "
        "día noche agua tierra gente historia música ciencia trabajo país mar cielo bosque camino puente plaza "
        "calle pueblo explica describe cuando donde cómo porque muy poco grande pequeño nuevo antiguo"
    ),
    "eu": _vocab(
        "eta edo baina etxe hiri ibai mendi liburu eskola denbora urte egun gau ur lur jende historia musika "
        "zientzia lan herrialde itsaso zeru baso bide zubi plaza kale herri azaldu deskribatu noiz non nola "
        "zergatik oso gutxi handi txiki berri zahar da dira zen ziren dugu"
    ),
    "gl": _vocab(
        "o a os as un unha de do e ou que por con sen casa cidade río montaña libro escola tempo ano día "
        "noite auga terra xente historia música ciencia traballo país mar ceo bosque camiño ponte praza rúa "
        "vila explica describe cando onde como porque moi pouco grande pequeno novo antigo"
    ),
    "pt": _vocab(
        "o a os as um uma de do e ou que por com sem casa cidade rio montanha livro escola tempo ano dia "
        "noite água terra gente história música ciência trabalho país mar céu floresta caminho ponte praça "
        "rua vila explica descreve quando onde como porque muito pouco grande pequeno novo antigo"
    ),
}
QUESTION_MARK = {"es": "¿"}


def _words(rng: random.Random, language: str, lo: int, hi: int, *, question: bool = False) -> str:
    """Placeholder text of lo..hi words in ``language``: sentences, sometimes paragraphs."""
    vocab = VOCABULARY[language]
    count = rng.randint(lo, hi)
    words, sentences, paragraphs = [], [], []
    for i in range(count):
        words.append(rng.choice(vocab))
        if len(words) >= rng.randint(6, 18) or i == count - 1:
            sentence = " ".join(words)
            sentences.append(sentence[0].upper() + sentence[1:] + ".")
            words = []
            if len(sentences) >= rng.randint(3, 6):
                paragraphs.append(" ".join(sentences))
                sentences = []
    if sentences:
        paragraphs.append(" ".join(sentences))
    text = "\n\n".join(paragraphs)
    if question:
        text = QUESTION_MARK.get(language, "") + text[:-1] + "?"
    return text


def _user_text(rng: random.Random, language: str) -> str:
    return _words(rng, language, 10, 120, question=rng.random() < 0.5)


def _assistant_text(rng: random.Random, language: str) -> str:
    # Mostly 20-400 words; one answer in ten is long, as real SFT data has a long tail.
    if rng.random() < 0.1:
        return _words(rng, language, 400, 1500)
    return _words(rng, language, 20, 400)


def _hex(rng: random.Random, length: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(length))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _date(rng: random.Random, start: dt.datetime | None = None) -> dt.datetime:
    base = start or dt.datetime(2023, 1, 1, tzinfo=dt.timezone.utc)
    return base + dt.timedelta(seconds=rng.randint(1, 90 * 24 * 3600))


# --------------------------------------------------------------------------------- per-source rows


def aya_row(inputs: str, targets: str, language: str, *, user_id: str = "0" * 64) -> dict:
    """A CohereForAI/aya_dataset row."""
    return {
        "inputs": inputs,
        "targets": targets,
        "language": NAMES.get(language, language),
        "language_code": ISO3.get(language, language),
        "annotation_type": "original-annotations",
        "user_id": user_id,
    }


def _aya(rng: random.Random, n: int, languages: Sequence[str]) -> list[dict]:
    rows = []
    for _ in range(n):
        language = rng.choice(languages)
        row = aya_row(_user_text(rng, language), _assistant_text(rng, language), language, user_id=_hex(rng, 64))
        row["annotation_type"] = rng.choice(["original-annotations", "re-annotations"])
        rows.append(row)
    return rows


def coqcat_row(story: str, qa: Sequence[tuple[str, str]], *, source: str = "wikipedia") -> dict:
    """A projecte-aina/CoQCat row in the Hugging Face CoQA layout (answers: dict of lists)."""
    starts = [max(0, story.find(a)) for _, a in qa]
    return {
        "source": source,
        "story": story,
        "questions": [q for q, _ in qa],
        "answers": {
            "input_text": [a for _, a in qa],
            "answer_start": starts,
            "answer_end": [s + len(a) for s, (_, a) in zip(starts, qa)],
        },
    }


def _coqcat(rng: random.Random, n: int, languages: Sequence[str]) -> list[dict]:
    rows = []
    for _ in range(n):
        story = _words(rng, "ca", 120, 600)
        qa = [(_words(rng, "ca", 4, 14, question=True), _words(rng, "ca", 1, 20)) for _ in range(rng.randint(3, 12))]
        rows.append(coqcat_row(story, qa, source=rng.choice(["wikipedia", "vilaweb", "ara"])))
    return rows


DOLLY_CATEGORIES = (
    "open_qa",
    "general_qa",
    "classification",
    "closed_qa",
    "brainstorming",
    "information_extraction",
    "summarization",
    "creative_writing",
)
_DOLLY_WITH_CONTEXT = {"closed_qa", "information_extraction", "summarization"}


def _dolly(rng: random.Random, n: int, languages: Sequence[str]) -> list[dict]:
    # Dolly-style rows carry no language field; the text is in the first requested language.
    language = languages[0]
    rows = []
    for _ in range(n):
        category = rng.choice(DOLLY_CATEGORIES)
        context = _words(rng, language, 40, 300) if category in _DOLLY_WITH_CONTEXT else ""
        rows.append(
            {
                "instruction": _user_text(rng, language),
                "context": context,
                "response": _assistant_text(rng, language),
                "category": category,
            }
        )
    return rows


def flores_row(sentence_id: int, language: str, text: str, *, domain: str = "wikinews") -> dict:
    """An openlanguagedata/flores_plus row of the ``<iso3>_Latn`` config."""
    return {
        "id": sentence_id,
        "iso_639_3": ISO3[language],
        "iso_15924": "Latn",
        "glottocode": GLOTTOCODES[language],
        "text": text,
        "url": f"https://en.{domain}.org/wiki/Article_{sentence_id}",
        "domain": domain,
        "topic": "science",
        "has_image": False,
        "has_hyperlink": False,
        "last_updated": "1.0",
    }


def _flores(rng: random.Random, n: int, languages: Sequence[str]) -> list[dict]:
    # Config by config, as concatenating the per-language configs gives them.
    meta = [
        (rng.choice(["wikinews", "wikijunior", "wikivoyage"]), rng.choice(["science", "travel", "politics", "health"]))
        for _ in range(n)
    ]
    image = [(rng.random() < 0.2, rng.random() < 0.1) for _ in range(n)]
    rows = []
    for language in languages:
        for sentence_id in range(n):
            row = flores_row(sentence_id, language, _words(rng, language, 10, 45), domain=meta[sentence_id][0])
            row["topic"] = meta[sentence_id][1]
            row["has_image"], row["has_hyperlink"] = image[sentence_id]
            rows.append(row)
    return rows


NO_ROBOTS_CATEGORIES = (
    "Generation",
    "Open QA",
    "Brainstorm",
    "Chat",
    "Rewrite",
    "Summarize",
    "Coding",
    "Classify",
    "Closed QA",
    "Extract",
)


def no_robots_row(prompt_id: str, messages: list[dict], *, category: str = "Open QA") -> dict:
    """A HuggingFaceH4/no_robots row; ``prompt`` is the first user message."""
    prompt = next(m["content"] for m in messages if m["role"] == "user")
    return {"prompt": prompt, "prompt_id": prompt_id, "messages": messages, "category": category}


def _no_robots(rng: random.Random, n: int, languages: Sequence[str]) -> list[dict]:
    rows = []
    for _ in range(n):
        category = rng.choice(NO_ROBOTS_CATEGORIES)
        messages = []
        if category == "Chat" and rng.random() < 0.7:
            messages.append({"role": "system", "content": _words(rng, "en", 8, 40)})
        for _ in range(rng.randint(2, 4) if category == "Chat" else 1):
            messages.append({"role": "user", "content": _user_text(rng, "en")})
            messages.append({"role": "assistant", "content": _assistant_text(rng, "en")})
        rows.append(no_robots_row(_hex(rng, 64), messages, category=category))
    return rows


def oasst_message(
    message_id: str,
    parent_id: str | None,
    role: str,
    text: str,
    *,
    tree_id: str,
    lang: str = "en",
    rank: int | None = None,
    created: str = "2023-03-01T10:00:00.000000+00:00",
    deleted: bool = False,
    review_result: bool | None = True,
    user_id: str = "00000000-0000-4000-8000-000000000000",
) -> dict:
    """An OpenAssistant/oasst2 message row (all columns of the dataset)."""
    return {
        "message_id": message_id,
        "parent_id": parent_id,
        "user_id": user_id,
        "created_date": created,
        "text": text,
        "role": role,
        "lang": lang,
        "review_count": 3 if review_result is not None else 0,
        "review_result": review_result,
        "deleted": deleted,
        "rank": rank,
        "synthetic": False,
        "model_name": None,
        "detoxify": {
            "toxicity": 0.0004,
            "severe_toxicity": 0.00002,
            "obscene": 0.0001,
            "identity_attack": 0.00008,
            "insult": 0.0002,
            "threat": 0.00003,
            "sexual_explicit": 0.00002,
        },
        "message_tree_id": tree_id,
        "tree_state": "ready_for_export",
        "emojis": {"name": ["+1"], "count": [2]} if role == "assistant" else {"name": [], "count": []},
        "labels": {"name": ["spam", "lang_mismatch"], "value": [0.0, 0.0], "count": [3, 3]},
    }


OASST_LANGS = {"ca": "ca", "en": "en", "es": "es", "eu": "eu", "gl": "gl", "pt": "pt-BR"}


def _oasst2(rng: random.Random, n: int, languages: Sequence[str]) -> list[dict]:
    """``n`` whole trees: ranked sibling replies, deleted and failed-review messages, several levels."""
    rows = []
    for _ in range(n):
        language = rng.choice(languages)
        lang = OASST_LANGS[language]
        tree_id = _uuid(rng)
        root_time = _date(rng)
        rows.append(
            oasst_message(
                tree_id,
                None,
                "prompter",
                _user_text(rng, language),
                tree_id=tree_id,
                lang=lang,
                created=root_time.isoformat(),
                user_id=_uuid(rng),
            )
        )
        level, depth = [tree_id], rng.randint(2, 6)
        for d in range(depth):
            role = "assistant" if d % 2 == 0 else "prompter"
            next_level = []
            for parent in level:
                k = rng.randint(1, 3)
                ranked = rng.random() < 0.8 and k > 1
                ranks = rng.sample(range(k), k) if ranked else [None] * k
                for rank in ranks:
                    message_id = _uuid(rng)
                    roll = rng.random()
                    text = _assistant_text(rng, language) if role == "assistant" else _user_text(rng, language)
                    rows.append(
                        oasst_message(
                            message_id,
                            parent,
                            role,
                            text,
                            tree_id=tree_id,
                            lang=lang,
                            rank=rank,
                            created=_date(rng, root_time).isoformat(),
                            deleted=roll < 0.05,
                            review_result=False if 0.05 <= roll < 0.1 else (None if roll > 0.97 else True),
                            user_id=_uuid(rng),
                        )
                    )
                    next_level.append(message_id)
            # Keep trees small: only some branches grow further.
            level = rng.sample(next_level, min(len(next_level), 2))
    return rows


def openr1_row(uuid_: str, problem: str, reasoning: str, answer: str) -> dict:
    """An open-r1/OpenR1-Math-220k (default config) row with two generations."""
    solution = f"{reasoning}\n\nThe answer is $\\boxed{{{answer}}}$."
    generation = f"<think>\n{reasoning}\n</think>\n\nTherefore the answer is $\\boxed{{{answer}}}$."
    return {
        "problem": problem,
        "solution": solution,
        "answer": answer,
        "problem_type": "Algebra",
        "question_type": "math-word-problem",
        "source": "olympiads",
        "uuid": uuid_,
        "is_reasoning_complete": [True, True],
        "generations": [generation, generation + " Done."],
        "correctness_math_verify": [True, False],
        "correctness_llama": None,
        "finish_reasons": None,
        "correctness_count": 1,
        "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": generation}],
    }


def _openr1(rng: random.Random, n: int, languages: Sequence[str]) -> list[dict]:
    rows = []
    for _ in range(n):
        row = openr1_row(_uuid(rng), _user_text(rng, "en"), _assistant_text(rng, "en"), str(rng.randint(-50, 500)))
        row["problem_type"] = rng.choice(["Algebra", "Geometry", "Number Theory", "Combinatorics", "Calculus"])
        row["source"] = rng.choice(["olympiads", "cn_contest", "aops_forum", "amc_aime"])
        rows.append(row)
    return rows


def rag_row(row_id: str, lang: str, instruction: str, context: str, response: str) -> dict:
    """A projecte-aina/RAG_Multilingual row."""
    return {
        "id": row_id,
        "instruction": instruction,
        "context": context,
        "response": response,
        "category": "extractive",
        "lang": lang,
        "extractive": context.split(".")[0],
    }


def _rag(rng: random.Random, n: int, languages: Sequence[str]) -> list[dict]:
    usable = [lang for lang in languages if lang in ("ca", "en", "es")] or ["ca"]
    rows = []
    for i in range(n):
        language = rng.choice(usable)
        rows.append(
            rag_row(
                str(i),
                language,
                _words(rng, language, 6, 25, question=True),
                _words(rng, language, 60, 300),
                _assistant_text(rng, language),
            )
        )
    return rows


TOWER_DATASETS = ("wmt14", "ntrex", "flores", "QT21", "ApeQuest", "OPUS", "MT-GenEval", "UltraChat", "Glaive")


def tower_row(
    conversations: list[dict], lang: str, *, dataset: str = "wmt14", task: str = "machine_translation"
) -> dict:
    """An Unbabel/TowerBlocks-v0.2 row."""
    return {"conversations": conversations, "lang": lang, "split": "train", "dataset": dataset, "task": task}


def _towerblocks(rng: random.Random, n: int, languages: Sequence[str]) -> list[dict]:
    rows = []
    for _ in range(n):
        if rng.random() < 0.6 and len(languages) > 1:
            src, tgt = rng.sample(list(languages), 2)
            prompt = f"Translate the following text from {NAMES[src]} into {NAMES[tgt]}.\n{NAMES[src]}: "
            conversations = [
                {"from": "human", "value": prompt + _words(rng, src, 10, 80) + f"\n{NAMES[tgt]}:"},
                {"from": "gpt", "value": _words(rng, tgt, 10, 100)},
            ]
            rows.append(tower_row(conversations, f"{src}-{tgt}", dataset=rng.choice(TOWER_DATASETS[:7])))
        else:
            language = rng.choice(languages)
            conversations = []
            if rng.random() < 0.2:
                conversations.append({"from": "system", "value": _words(rng, "en", 8, 30)})
            for _ in range(rng.randint(1, 3)):
                conversations.append({"from": "human", "value": _user_text(rng, language)})
                conversations.append({"from": "gpt", "value": _assistant_text(rng, language)})
            rows.append(tower_row(conversations, language, dataset=rng.choice(TOWER_DATASETS[7:]), task="general"))
    return rows


def wildchat_turn(role: str, content: str, language: str, *, toxic: bool = False, redacted: bool = False) -> dict:
    """One turn of a WildChat-1M ``conversation``."""
    return {
        "content": content,
        "country": "Spain" if role == "user" else None,
        "hashed_ip": "a" * 64 if role == "user" else None,
        "header": {"accept-language": "es-ES,es;q=0.9", "user-agent": "Mozilla/5.0"} if role == "user" else None,
        "language": NAMES.get(language, language),
        "redacted": redacted,
        "role": role,
        "state": "Catalonia" if role == "user" else None,
        "timestamp": dt.datetime(2023, 6, 1, 12, 0, tzinfo=dt.timezone.utc),
        "toxic": toxic,
        "turn_identifier": 1000,
    }


def _moderation(rng: random.Random, flagged: bool) -> tuple[dict, dict]:
    categories = ["harassment", "hate", "self-harm", "sexual", "violence"]
    openai = {
        "categories": {c: flagged and c == "harassment" for c in categories},
        "category_scores": {c: round(rng.random() * (0.9 if flagged else 0.01), 6) for c in categories},
        "flagged": flagged,
    }
    detox = {
        k: round(rng.random() * (0.9 if flagged else 0.01), 6)
        for k in ("identity_attack", "insult", "obscene", "severe_toxicity", "sexual_explicit", "threat", "toxicity")
    }
    return openai, detox


def wildchat_row(
    conversation_hash: str, turns: list[dict], language: str, *, toxic: bool = False, redacted: bool = False
) -> dict:
    """An allenai/WildChat-1M row (``turn`` counts user turns)."""
    rng = random.Random(conversation_hash)
    moderation = [_moderation(rng, toxic) for _ in turns]
    return {
        "conversation_hash": conversation_hash,
        "model": "gpt-3.5-turbo-0613",
        "timestamp": dt.datetime(2023, 6, 1, 12, 0, tzinfo=dt.timezone.utc),
        "conversation": turns,
        "turn": sum(t["role"] == "user" for t in turns),
        "language": NAMES.get(language, language),
        "openai_moderation": [m[0] for m in moderation],
        "detoxify_moderation": [m[1] for m in moderation],
        "toxic": toxic,
        "redacted": redacted,
        "state": "Catalonia",
        "country": "Spain",
        "hashed_ip": "a" * 64,
        "header": {"accept-language": "es-ES,es;q=0.9", "user-agent": "Mozilla/5.0"},
    }


def _wildchat(rng: random.Random, n: int, languages: Sequence[str]) -> list[dict]:
    rows = []
    for _ in range(n):
        language = rng.choice(languages)
        roll = rng.random()
        toxic, redacted = roll < 0.05, 0.05 <= roll < 0.08
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns.append(wildchat_turn("user", _user_text(rng, language), language, toxic=toxic, redacted=redacted))
            turns.append(wildchat_turn("assistant", _assistant_text(rng, language), language))
        row = wildchat_row(_hex(rng, 32), turns, language, toxic=toxic, redacted=redacted)
        row["model"] = rng.choice(["gpt-3.5-turbo-0613", "gpt-4-0314", "gpt-4-1106-preview"])
        row["timestamp"] = _date(rng)
        rows.append(row)
    return rows


def _messages(rng: random.Random, n: int, languages: Sequence[str]) -> list[dict]:
    rows = []
    for i in range(n):
        language = rng.choice(languages)
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": _words(rng, language, 8, 40)})
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": _user_text(rng, language)})
            messages.append({"role": "assistant", "content": _assistant_text(rng, language)})
        rows.append({"id": f"local-{i:06d}", "language": language, "messages": messages})
    return rows


_GENERATORS: dict[str, Callable[[random.Random, int, Sequence[str]], list[dict]]] = {
    "aya_dataset": _aya,
    "coqcat": _coqcat,
    "dolly": _dolly,
    "flores": _flores,
    "no_robots": _no_robots,
    "oasst2": _oasst2,
    "openr1_math": _openr1,
    "rag_multilingual": _rag,
    "towerblocks": _towerblocks,
    "wildchat_prompts": _wildchat,
    "messages": _messages,
}


def raw_rows(adapter: str, n: int, seed: int = 0, languages: Sequence[str] = ALL_LANGUAGES) -> list[dict]:
    """``n`` synthetic raw rows for ``adapter`` in its source's exact schema, the same for the same seed.

    oasst2: ``n`` whole trees (many rows each); flores: ``n`` sentence ids for each language given;
    dolly: rows without a language field, text in ``languages[0]``; coqcat, no_robots and openr1_math are
    single-language sources (Catalan, English, English) whatever ``languages`` says.
    """
    if adapter not in _GENERATORS:
        raise KeyError(f"no fixture generator for adapter {adapter!r}; known: {sorted(_GENERATORS)}")
    rng = random.Random(f"{adapter}:{seed}")
    return _GENERATORS[adapter](rng, n, tuple(languages))


# ------------------------------------------------------------------------ hand-written rows (exact)

AYA_ROWS: list[dict[str, Any]] = [
    aya_row("  Quina és la capital de Catalunya?  ", "La capital de Catalunya és Barcelona.\n", "ca"),
    aya_row("What is two plus two?", "Two plus two is four.", "en"),
    aya_row("Wie heißt du?", "Ich heiße Aya.", "de"),  # not wanted: no ISO 639-1 mapping in the mixture
    aya_row("Zein da Euskadiko hiriburua?", "   ", "eu"),  # empty response
    aya_row("", "Resposta sense pregunta.", "ca"),  # empty prompt
    aya_row("Quina és la capital de Catalunya?", "La capital de Catalunya és Barcelona.", "ca"),  # duplicate
    aya_row("Escribe <|im_start|> aquí.", "No.", "es"),  # control token
]

COQCAT_STORY = "La Maria viu a Girona. Té un gos que es diu Pirata i cada matí el passeja pel riu Onyar."
COQCAT_ROWS: list[dict[str, Any]] = [
    coqcat_row(COQCAT_STORY, [("On viu la Maria?", "A Girona"), ("Com es diu el gos?", "Pirata")]),
    # raw CoQA JSON shape: questions and answers as lists of dicts
    {
        "source": "vilaweb",
        "story": "En Pere toca el violí.",
        "questions": [{"input_text": "Què toca en Pere?", "turn_id": 1}],
        "answers": [{"input_text": "El violí", "span_start": 8, "span_end": 22, "turn_id": 1}],
    },
    coqcat_row("", [("Pregunta?", "Resposta")]),  # empty story
    coqcat_row("Un text.", [("Pregunta?", "Resposta"), ("Una altra?", "")]),  # empty answer
    {"source": "ara", "story": "Un text.", "questions": ["A?", "B?"], "answers": {"input_text": ["a"]}},  # mismatch
    {"source": "ara", "story": "Un text.", "questions": [], "answers": {"input_text": []}},  # no questions
]

DOLLY_ROWS: list[dict[str, Any]] = [
    {
        "instruction": "Explica què és la fotosíntesi.",
        "context": "",
        "response": "És el procés...",
        "category": "open_qa",
    },
    {
        "instruction": "Resumeix el text.",
        "context": "  El riu Ebre és el més cabalós de la península.  ",
        "response": "L'Ebre porta molta aigua.",
        "category": "summarization",
    },
    {"instruction": "Sense context", "response": "Falta el camp context.", "category": "open_qa"},  # no context key
    {"instruction": "  ", "context": "", "response": "Res.", "category": "open_qa"},  # empty instruction
    {"instruction": "Digues alguna cosa.", "context": "", "response": "", "category": "open_qa"},  # empty response
]

FLORES_TEXTS = {
    0: {
        "ca": "El gat dorm al sofà.",
        "en": "The cat sleeps on the sofa.",
        "es": "El gato duerme en el sofá.",
        "eu": "Katua sofan lo dago.",
        "gl": "O gato dorme no sofá.",
        "pt": "O gato dorme no sofá.",
    },
    1: {"ca": "Plou molt avui.", "en": "It is raining a lot today.", "es": "Hoy llueve mucho."},
    2: {"ca": "Només en català."},  # nothing to translate from
}
FLORES_ROWS: list[dict[str, Any]] = [
    flores_row(sentence_id, language, text)
    for language in ALL_LANGUAGES
    for sentence_id, texts in FLORES_TEXTS.items()
    if (text := texts.get(language)) is not None
]

NO_ROBOTS_ROWS: list[dict[str, Any]] = [
    no_robots_row(
        "p1",
        [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Ahoy, matey!"},
            {"role": "user", "content": "Where is the treasure?"},
            {"role": "assistant", "content": "Buried on the island, arr."},
        ],
        category="Chat",
    ),
    no_robots_row(
        "p2",
        [
            {"role": "user", "content": "Hi"},
            {"role": "system", "content": "Late system turn."},
            {"role": "assistant", "content": "Hello"},
        ],
    ),  # system turn not first
    no_robots_row("p3", [{"role": "user", "content": "Unanswered?"}]),  # invalid turn order (no answer)
    no_robots_row("p4", [{"role": "user", "content": "Q"}, {"role": "tool", "content": "x"}]),  # unknown role
]

OPENR1_ROWS: list[dict[str, Any]] = [
    openr1_row("u-1", "Compute 2+3.", "2+3 is five.", "5"),
    {**openr1_row("u-2", "Compute 1+1.", "1+1 is two.", "2"), "messages": []},  # no messages
    {
        **openr1_row("u-3", "Compute 1+2.", "1+2 is three.", "3"),
        "messages": [{"role": "user", "content": "Compute 1+2."}, {"role": "assistant", "content": " "}],
    },  # empty message
]

RAG_ROWS: list[dict[str, Any]] = [
    rag_row("11", "ca", "Quan es va fundar el club?", "El club es va fundar el 1899.", "Es va fundar el 1899."),
    rag_row("12", "en", "Who wrote it?", "It was written by Ada.", "Ada wrote it."),
    rag_row("13", "es", "¿Dónde está?", "", "No lo sé."),  # empty context
    rag_row("14", "es", "¿Quién?", "Texto.", ""),  # empty response
    rag_row("15", "es", "", "Texto.", "Algo."),  # empty instruction
    rag_row("16", "de", "Wer?", "Text.", "Jemand."),  # not wanted
]

TOWER_ROWS: list[dict[str, Any]] = [
    tower_row(
        [
            {"from": "human", "value": "Translate from English into Spanish.\nEnglish: Good morning.\nSpanish:"},
            {"from": "gpt", "value": "Buenos días."},
        ],
        "en-es",
        dataset="ntrex",
    ),
    tower_row(
        [
            {"from": "system", "value": "You are a helpful assistant."},
            {"from": "human", "value": "Say hi."},
            {"from": "gpt", "value": "Hi!"},
        ],
        "en",
        dataset="UltraChat",
        task="general",
    ),
    tower_row(
        [{"from": "human", "value": "Translate: Hallo"}, {"from": "gpt", "value": "Hello"}], "de-en", dataset="OPUS"
    ),  # excluded sub-dataset (with exclude_datasets=["OPUS"])
    tower_row([{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}], "pt", dataset="wmt14"),  # unknown role
    tower_row([{"from": "human", "value": "Übersetze."}, {"from": "gpt", "value": "Ok."}], "en-de"),  # not wanted
    tower_row([{"from": "human", "value": "?"}, {"from": "gpt", "value": "!"}], ""),  # unrecognised language
]

WILDCHAT_ROWS: list[dict[str, Any]] = [
    wildchat_row(
        "h-es",
        [
            wildchat_turn("user", "  Escribe un poema sobre el mar.  ", "es"),
            wildchat_turn("assistant", "El mar azul...", "es"),
        ],
        "es",
    ),
    wildchat_row("h-tox", [wildchat_turn("user", "insulto", "es", toxic=True)], "es", toxic=True),
    wildchat_row("h-red", [wildchat_turn("user", "My name is NAME_1", "en", redacted=True)], "en", redacted=True),
    wildchat_row("h-zh", [wildchat_turn("user", "你好", "Chinese")], "Chinese"),  # not wanted
    wildchat_row("h-empty", [wildchat_turn("user", "   ", "en")], "en"),  # empty prompt
    wildchat_row("h-none", [wildchat_turn("assistant", "Hello?", "en")], "en"),  # no user turn
]

MESSAGES_ROWS: list[dict[str, Any]] = [
    {
        "id": "si-1",
        "language": "ca",
        "messages": [{"role": "user", "content": "Qui ets?"}, {"role": "assistant", "content": "Sóc ALIA."}],
    },
    {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am ALIA."}]},
    {"id": "si-3", "language": "es", "messages": [{"role": "user", "content": "Hola"}]},  # invalid turn order
    {"id": "si-4", "language": "en", "messages": [{"role": "robot", "content": "x"}]},  # unknown role
    {
        "id": "si-5",
        "language": "fr",
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    },
]


def _oasst2_hand_rows() -> list[dict[str, Any]]:
    def m(mid, parent, role, text, tree, **kw):
        return oasst_message(mid, parent, role, text, tree_id=tree, **kw)

    t = "2023-03-01T10:{:02d}:00.000000+00:00"
    return [
        # Tree A (en): ranked siblings, a deleted branch, a failed review, ends on a prompter message.
        m("a-r", None, "prompter", "What is the capital of France?", "a-r", created=t.format(0)),
        m("a-1", "a-r", "assistant", "Maybe Lyon.", "a-r", rank=1, created=t.format(1)),
        m("a-2", "a-r", "assistant", "Paris.", "a-r", rank=0, created=t.format(2)),
        m("a-5", "a-r", "assistant", "Paris, of course.", "a-r", rank=None, created=t.format(0)),
        m("a-p1", "a-2", "prompter", "And of Spain?", "a-r", created=t.format(5)),
        m("a-p2", "a-2", "prompter", "Deleted follow-up.", "a-r", created=t.format(3), deleted=True),
        m("a-x", "a-p2", "assistant", "Reply under a deleted message.", "a-r", created=t.format(4)),
        m("a-3", "a-p1", "assistant", "Barcelona.", "a-r", rank=0, created=t.format(6), review_result=False),
        m("a-p3", "a-3", "prompter", "Are you sure?", "a-r", created=t.format(7)),
        m("a-4", "a-p1", "assistant", "Madrid.", "a-r", rank=None, created=t.format(8)),
        m("a-p4", "a-4", "prompter", "Thanks!", "a-r", created=t.format(9)),
        # Tree B (pt-BR): unranked siblings, the older reply wins.
        m("b-r", None, "prompter", "Qual é a cor do céu?", "b-r", lang="pt-BR", created=t.format(0)),
        m("b-1", "b-r", "assistant", "Resposta tardia: azul.", "b-r", lang="pt-BR", created=t.format(30)),
        m("b-2", "b-r", "assistant", "Resposta cedo: azul.", "b-r", lang="pt-BR", created=t.format(20)),
        # Tree C (en): a prompt nobody answered.
        m("c-r", None, "prompter", "Hello?", "c-r", created=t.format(0)),
        # Tree D (es): the root itself is deleted.
        m("d-r", None, "prompter", "Hola", "d-r", lang="es", deleted=True),
        m("d-1", "d-r", "assistant", "Hola, ¿qué tal?", "d-r", lang="es"),
        # Tree E (de): not wanted, so its deleted message is not counted.
        m("e-r", None, "prompter", "Hallo", "e-r", lang="de"),
        m("e-1", "e-r", "assistant", "Guten Tag", "e-r", lang="de", deleted=True),
        # An orphan: its parent is not in the dump.
        m("o-1", "missing-parent", "assistant", "Lost reply.", "o-r", created=t.format(1)),
    ]


OASST2_ROWS: list[dict[str, Any]] = _oasst2_hand_rows()


# ------------------------------------------------------------------ the card's mixture, synthetic


def synthetic_mixture(root: Path, scale: float, val_fraction: float = 0.01, **overrides: Any):
    """A stand-in of the card's 20-source mixture at ``scale`` of its counts, written under ``root``.

    Public sources get raw rows in their own schema (Parquet, through their adapters); internal sources get
    messages-JSONL files; about 1.3x the requested rows so the filters and validation share have room. Files
    already under ``root`` are reused (the generator is deterministic). Returns the validated MixtureConfig
    (prepared_root under ``root``); ``overrides`` set other mixture keys.
    """
    import json
    import math

    import pyarrow as pa
    import pyarrow.parquet as pq

    from alia_nemo.config.compose import load_config
    from alia_nemo.config.schema import MixtureConfig

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    table = load_config(["data=sft_mixture"]).data
    datasets = {}
    for i, (name, entry) in enumerate(table.datasets.items()):
        counts = {lang: max(1, round(n * scale)) for lang, n in entry.counts.items()}
        path = root / (f"{name}-{scale:g}.jsonl" if entry.origin.kind == "local" else f"{name}-{scale:g}.parquet")
        if not path.is_file():
            rows = []
            if entry.adapter == "flores":  # sentences of every language share ids; pairs are built across them
                n_ids = math.ceil(max(counts.values()) * 1.3) + 8
                rows = raw_rows("flores", n_ids, seed=100 * i, languages=ALL_LANGUAGES)
            for j, (lang, n) in enumerate(counts.items() if entry.adapter != "flores" else ()):
                rows += raw_rows(entry.adapter, math.ceil(n * 1.3) + 8, seed=100 * i + j, languages=[lang])
            tmp = path.with_suffix(".tmp")
            if entry.origin.kind == "local":
                with open(tmp, "w", encoding="utf-8") as f:
                    for r in rows:
                        f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
            else:
                pq.write_table(pa.Table.from_pylist(rows), tmp)
            tmp.rename(path)  # whole files only: a reused stand-in is never half written
        d = entry.model_dump()
        d["counts"] = counts
        d["origin"] = {"kind": entry.origin.kind, "files": [str(path)]}
        datasets[name] = d
    return MixtureConfig.model_validate(
        {**table.model_dump(), "datasets": datasets, "prepared_root": str(root / "prepared"),
         "val_fraction": val_fraction, **overrides}
    )  # fmt: skip
