"""Source adapters on schema-exact rows: exact outputs, language filtering, drop reasons, determinism."""

from __future__ import annotations

import collections
import copy
import random

import pytest

from alia_nemo.config.schema import LANGUAGES
from alia_nemo.data.adapters import (
    ADAPTERS,
    FLORES_SOURCE_PHRASES,
    FLORES_TEMPLATES,
    ONE_TO_ONE_ADAPTERS,
    flores_source_language,
    flores_source_languages,
    normalise_language,
    towerblocks_language,
)
from alia_nemo.data.mixture import content_hash
from alia_nemo.model.chatml import validate_conversation
from tests.source_fixtures import (
    AYA_ROWS,
    COQCAT_ROWS,
    COQCAT_STORY,
    DOLLY_ROWS,
    FLORES_ROWS,
    FLORES_TEXTS,
    MESSAGES_ROWS,
    NO_ROBOTS_ROWS,
    OASST2_ROWS,
    OPENR1_ROWS,
    RAG_ROWS,
    TOWER_ROWS,
    WILDCHAT_ROWS,
    raw_rows,
)

OPTIONS = {"dolly": {"language": "ca"}, "towerblocks": {"exclude_datasets": ["OPUS"]}}


def run(adapter: str, rows, languages=LANGUAGES, options=None, source: str = "src"):
    """(records, drops) of an adapter over rows."""
    drops: collections.Counter = collections.Counter()
    out = list(ADAPTERS[adapter](rows, source=source, languages=languages, drops=drops, options=options))
    return out, drops


def msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


def by_language(records) -> dict[str, list[dict]]:
    out = collections.defaultdict(list)
    for r in records:
        out[r["language"]].append(r)
    return out


def test_registry_names():
    assert set(ADAPTERS) == {
        "aya_dataset",
        "coqcat",
        "dolly",
        "flores",
        "no_robots",
        "oasst2",
        "openr1_math",
        "rag_multilingual",
        "towerblocks",
        "wildchat_prompts",
        "messages",
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("pt-BR", "pt"),
        ("es_ES", "es"),
        ("spa", "es"),
        ("Basque", "eu"),
        ("EN", "en"),
        ("de", "de"),
        ("", None),
        (None, None),
    ],
)
def test_normalise_language(value, expected):
    assert normalise_language(value) == expected


# -------------------------------------------------------------------------------------------- aya


def test_aya_exact_output_and_drops():
    out, drops = run("aya_dataset", AYA_ROWS, source="aya-dataset")
    assert [r["language"] for r in out] == ["ca", "en"]
    assert out[0]["messages"] == msgs(
        ("user", "Quina és la capital de Catalunya?"), ("assistant", "La capital de Catalunya és Barcelona.")
    )
    assert out[1]["messages"] == msgs(("user", "What is two plus two?"), ("assistant", "Two plus two is four."))
    assert all(r["source"] == "aya-dataset" and r["id"].startswith("aya-") for r in out)
    assert len({r["id"] for r in out}) == 2
    # the German row is outside the mixture's languages: counted, like every row that is not converted
    assert drops == {
        ("unknown", "unknown_language"): 1,
        ("eu", "empty response"): 1,
        ("ca", "empty prompt"): 1,
        ("ca", "duplicate conversation"): 1,
        ("es", "ChatML control token in text"): 1,
    }


def test_aya_language_filter_and_determinism():
    out, drops = run("aya_dataset", AYA_ROWS, languages=("en",))
    assert [r["language"] for r in out] == ["en"]
    assert drops == {
        ("ca", "language_not_requested"): 3,
        ("es", "language_not_requested"): 1,
        ("eu", "language_not_requested"): 1,
        ("unknown", "unknown_language"): 1,
    }
    assert len(out) + sum(drops.values()) == len(AYA_ROWS)  # rows in == converted + dropped
    assert run("aya_dataset", AYA_ROWS) == run("aya_dataset", copy.deepcopy(AYA_ROWS))


# ----------------------------------------------------------------------------------------- coqcat


def test_coqcat_exact_output_and_drops():
    out, drops = run("coqcat", COQCAT_ROWS)
    assert len(out) == 2
    assert out[0]["language"] == "ca"
    assert out[0]["messages"] == msgs(
        ("user", f"Llegeix el text següent i respon les preguntes.\n\n{COQCAT_STORY}\n\nOn viu la Maria?"),
        ("assistant", "A Girona"),
        ("user", "Com es diu el gos?"),
        ("assistant", "Pirata"),
    )
    # the raw-JSON shape (lists of dicts) converts the same way
    assert out[1]["messages"] == msgs(
        ("user", "Llegeix el text següent i respon les preguntes.\n\nEn Pere toca el violí.\n\nQuè toca en Pere?"),
        ("assistant", "El violí"),
    )
    assert drops == {
        ("ca", "empty story"): 1,
        ("ca", "empty question or answer"): 1,
        ("ca", "questions and answers differ in number"): 1,
        ("ca", "no questions"): 1,
    }


def test_coqcat_language_filter_and_ids():
    assert run("coqcat", COQCAT_ROWS, languages=("es", "en")) == ([], {("ca", "language_not_requested"): 6})
    out, _ = run("coqcat", COQCAT_ROWS)
    again, _ = run("coqcat", copy.deepcopy(COQCAT_ROWS))
    assert [r["id"] for r in out] == [r["id"] for r in again]
    with_id, _ = run("coqcat", [{**COQCAT_ROWS[0], "id": "3xyz"}])
    assert with_id[0]["id"] == "coqcat-3xyz"


# ------------------------------------------------------------------------------------------ dolly


def test_dolly_exact_output_and_drops():
    out, drops = run("dolly", DOLLY_ROWS, options={"language": "ca"}, source="dolly-ca")
    assert [r["messages"] for r in out] == [
        msgs(("user", "Explica què és la fotosíntesi."), ("assistant", "És el procés...")),
        msgs(
            ("user", "Resumeix el text.\n\nEl riu Ebre és el més cabalós de la península."),
            ("assistant", "L'Ebre porta molta aigua."),
        ),
        msgs(("user", "Sense context"), ("assistant", "Falta el camp context.")),
    ]
    assert {r["language"] for r in out} == {"ca"} and {r["source"] for r in out} == {"dolly-ca"}
    assert drops == {("ca", "empty instruction"): 1, ("ca", "empty response"): 1}


def test_dolly_needs_language_option():
    with pytest.raises(ValueError, match="mentor-es"):
        run("dolly", DOLLY_ROWS, source="mentor-es")
    with pytest.raises(ValueError, match="mentor-es"):
        run("dolly", DOLLY_ROWS, source="mentor-es", options={"category": "x"})


def test_dolly_language_filter():
    out, drops = run("dolly", DOLLY_ROWS, languages=("en", "es"), options={"language": "ca"})
    assert out == [] and drops == {("ca", "language_not_requested"): len(DOLLY_ROWS)}
    out, _ = run("dolly", DOLLY_ROWS, languages=("es",), options={"language": "es"})
    assert len(out) == 3 and {r["language"] for r in out} == {"es"}


# ----------------------------------------------------------------------------------------- flores


def _flores_triple(record: dict) -> tuple[int, str, str]:
    """(sentence id, source, target) of a flores record, from its id."""
    sentence_id, src, tgt = record["id"].removeprefix("flores-").split("-")
    return int(sentence_id), src, tgt


def test_flores_pairs_by_id_with_target_language_templates():
    rows = list(FLORES_ROWS)
    random.Random(0).shuffle(rows)  # pairing must not depend on row order
    out, drops = run("flores", rows)
    # id 0: six targets from five sources each; id 1: three targets from two each; id 2: only Catalan
    assert len(out) == 6 * 5 + 3 * 2
    assert drops == {("ca", "no source sentence"): 1}
    for record in out:
        sentence_id, src, tgt = _flores_triple(record)
        assert record["language"] == tgt and src != tgt
        assert src in FLORES_TEXTS[sentence_id]
        assert record["messages"] == msgs(
            (
                "user",
                FLORES_TEMPLATES[tgt].format(
                    source=FLORES_SOURCE_PHRASES[tgt][src], text=FLORES_TEXTS[sentence_id][src]
                ),
            ),
            ("assistant", FLORES_TEXTS[sentence_id][tgt]),
        )
    # the first pass is one conversation per (sentence, target) with the hash-picked source, as before
    assert [_flores_triple(r) for r in out[:9]] == [
        (sentence_id, flores_source_language(sentence_id, tgt, FLORES_TEXTS[sentence_id]), tgt)
        for sentence_id in (0, 1)
        for tgt in LANGUAGES
        if tgt in FLORES_TEXTS[sentence_id]
    ]
    assert run("flores", rows) == run("flores", FLORES_ROWS)


def test_flores_every_source_once_per_sentence_and_target_in_passes():
    rows = raw_rows("flores", 3, seed=5, languages=LANGUAGES)  # 3 sentences x 6 languages, config by config
    out, drops = run("flores", rows)
    triples = [_flores_triple(r) for r in out]
    assert not drops and len(triples) == len(set(triples)) == len({r["id"] for r in out}) == 3 * 6 * 5
    assert set(triples) == {(s, src, tgt) for s in range(3) for tgt in LANGUAGES for src in LANGUAGES if src != tgt}
    # pass k (18 conversations: every sentence and target once) takes each pair's k-th source
    for rank in range(5):
        assert triples[rank * 18 : (rank + 1) * 18] == [
            (s, flores_source_languages(s, tgt, LANGUAGES)[rank], tgt) for s in range(3) for tgt in LANGUAGES
        ]
    # all distinct for the mixture's duplicate filter too: the user turns differ
    assert len({content_hash(r["messages"]) for r in out}) == len(out)
    for seed in range(3):
        shuffled = copy.deepcopy(rows)
        random.Random(seed).shuffle(shuffled)
        assert run("flores", shuffled) == (out, drops)
    only, _ = run("flores", rows, languages=("es", "gl"))
    assert only == [r for r in out if r["language"] in ("es", "gl")]


def test_flores_same_target_text_from_identical_sources_is_not_a_duplicate():
    # Sentence 0's Galician and Portuguese texts are identical: the prompts still name different sources.
    out, _ = run("flores", FLORES_ROWS, languages=("es",))
    from_gl_pt = [r for r in out if _flores_triple(r)[:2] in ((0, "gl"), (0, "pt"))]
    assert len(from_gl_pt) == 2
    assert from_gl_pt[0]["messages"][1] == from_gl_pt[1]["messages"][1]
    assert content_hash(from_gl_pt[0]["messages"]) != content_hash(from_gl_pt[1]["messages"])
    assert len({content_hash(r["messages"]) for r in run("flores", FLORES_ROWS)[0]}) == 36


def test_flores_templates_are_written_in_the_target_language():
    assert FLORES_TEMPLATES["ca"].format(source=FLORES_SOURCE_PHRASES["ca"]["en"], text="Hi.") == (
        "Tradueix el text següent de l'anglès al català:\n\nHi."
    )
    assert FLORES_TEMPLATES["es"].startswith("Traduce el siguiente texto del")
    assert (
        FLORES_TEMPLATES["eu"]
        .format(source=FLORES_SOURCE_PHRASES["eu"]["es"], text="x")
        .startswith("Itzuli hurrengo testua gaztelaniatik euskarara")
    )
    assert "Galician" in FLORES_SOURCE_PHRASES["en"].values()
    for target in LANGUAGES:
        assert set(FLORES_SOURCE_PHRASES[target]) == set(LANGUAGES) - {target}


def test_flores_source_choice_is_deterministic_and_spread():
    choices = {flores_source_language(i, "ca", ["en", "es", "eu", "ca"]) for i in range(200)}
    assert choices == {"en", "es", "eu"}
    assert flores_source_language(7, "es", ["en", "ca"]) == flores_source_language(7, "es", ["ca", "en", "es"])
    for i in range(50):
        order = flores_source_languages(i, "gl", reversed(LANGUAGES))
        assert order[0] == flores_source_language(i, "gl", LANGUAGES)
        others = sorted(set(LANGUAGES) - {"gl"})  # the sorted others, rotated to start at the hash pick
        first = others.index(order[0])
        assert order == others[first:] + others[:first]
    assert flores_source_languages(3, "en", ["en", "ca"]) == ["ca"]
    with pytest.raises(ValueError, match="no source language"):
        flores_source_languages(3, "en", ["en"])


def test_flores_language_filter_and_drops():
    out, drops = run("flores", FLORES_ROWS, languages=("eu",))
    assert [r["language"] for r in out] == ["eu"] * 5 and not drops
    extra = [
        {**FLORES_ROWS[0], "text": "  "},  # empty text
        dict(FLORES_ROWS[0]),  # the same sentence again
        {**FLORES_ROWS[0], "iso_639_3": "fra", "glottocode": "stan1290"},  # another config: not wanted
    ]
    _, drops = run("flores", FLORES_ROWS + extra, languages=("en",))
    assert drops == {("ca", "empty text"): 1, ("ca", "duplicate sentence"): 1}


# -------------------------------------------------------------------------------------- no_robots


def test_no_robots_exact_output_and_drops():
    out, drops = run("no_robots", NO_ROBOTS_ROWS)
    assert len(out) == 1
    assert out[0]["id"] == "no_robots-p1" and out[0]["language"] == "en"
    assert out[0]["messages"] == NO_ROBOTS_ROWS[0]["messages"]
    assert drops == {("en", "system turn not first"): 1, ("en", "invalid turn order"): 1, ("en", "unknown role"): 1}
    assert run("no_robots", NO_ROBOTS_ROWS, languages=("ca",)) == ([], {("en", "language_not_requested"): 4})


# ----------------------------------------------------------------------------------------- oasst2


def test_oasst2_threads_follow_best_ranked_surviving_replies():
    out, drops = run("oasst2", OASST2_ROWS)
    records = {r["id"]: r for r in out}
    assert set(records) == {"oasst2-a-r", "oasst2-b-r"}
    # rank 0 beats rank 1 and unranked; the failed-review reply is skipped; the final "Thanks!" is trimmed
    assert records["oasst2-a-r"]["messages"] == msgs(
        ("user", "What is the capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Spain?"),
        ("assistant", "Madrid."),
    )
    assert records["oasst2-a-r"]["language"] == "en"
    # unranked siblings: the older one; pt-BR -> pt
    assert records["oasst2-b-r"]["language"] == "pt"
    assert records["oasst2-b-r"]["messages"] == msgs(
        ("user", "Qual é a cor do céu?"), ("assistant", "Resposta cedo: azul.")
    )
    assert drops == {
        ("en", "deleted"): 2,  # the deleted follow-up and the reply under it
        ("en", "failed review"): 2,  # the failed reply and the prompt under it
        ("en", "no assistant reply"): 1,
        ("en", "orphan message"): 1,
        ("es", "deleted"): 2,  # a deleted root takes its reply with it
    }  # nothing for the German tree: not wanted


def test_oasst2_language_filter_and_order_independence():
    out, drops = run("oasst2", OASST2_ROWS, languages=("pt",))
    assert [r["id"] for r in out] == ["oasst2-b-r"] and not drops
    shuffled = list(OASST2_ROWS)
    random.Random(1).shuffle(shuffled)
    assert run("oasst2", shuffled) == run("oasst2", OASST2_ROWS)


# ------------------------------------------------------------------------------------ openr1_math


def test_openr1_math_exact_output_and_drops():
    out, drops = run("openr1_math", OPENR1_ROWS)
    assert len(out) == 1
    assert out[0]["id"] == "openr1_math-u-1" and out[0]["language"] == "en"
    assert out[0]["messages"] == OPENR1_ROWS[0]["messages"]
    assert out[0]["messages"][1]["content"].startswith("<think>\n2+3 is five.")
    assert drops == {("en", "no messages"): 1, ("en", "empty message"): 1}
    assert run("openr1_math", OPENR1_ROWS, languages=("es",)) == ([], {("en", "language_not_requested"): 3})


# ------------------------------------------------------------------------------- rag_multilingual


def test_rag_multilingual_exact_output_and_drops():
    out, drops = run("rag_multilingual", RAG_ROWS)
    assert [(r["id"], r["language"]) for r in out] == [("rag_multilingual-11", "ca"), ("rag_multilingual-12", "en")]
    assert out[0]["messages"] == msgs(
        ("user", "El club es va fundar el 1899.\n\nQuan es va fundar el club?"), ("assistant", "Es va fundar el 1899.")
    )
    assert drops == {
        ("es", "empty context"): 1,
        ("es", "empty response"): 1,
        ("es", "empty instruction"): 1,
        ("unknown", "unknown_language"): 1,
    }
    out, drops = run("rag_multilingual", RAG_ROWS, languages=("en",))
    assert [r["language"] for r in out] == ["en"]
    assert drops == {
        ("ca", "language_not_requested"): 1,
        ("es", "language_not_requested"): 3,
        ("unknown", "unknown_language"): 1,
    }


# ------------------------------------------------------------------------------------ towerblocks


def test_towerblocks_exact_output_and_drops():
    out, drops = run("towerblocks", TOWER_ROWS, options={"exclude_datasets": ["OPUS"]})
    assert [r["language"] for r in out] == ["es", "en"]  # a pair's language is its target side
    assert out[0]["messages"] == msgs(
        ("user", "Translate from English into Spanish.\nEnglish: Good morning.\nSpanish:"),
        ("assistant", "Buenos días."),
    )
    assert out[1]["messages"] == msgs(
        ("system", "You are a helpful assistant."), ("user", "Say hi."), ("assistant", "Hi!")
    )
    assert drops == {
        ("en", "excluded sub-dataset (licence)"): 1,
        ("pt", "unknown role"): 1,
        ("unknown", "unrecognised language"): 1,
        ("unknown", "unknown_language"): 1,
    }


def test_towerblocks_language_and_exclusion_options():
    assert towerblocks_language("en-es") == "es" and towerblocks_language("pt") == "pt"
    out, drops = run("towerblocks", TOWER_ROWS[:3], languages=("en",))
    assert [r["messages"][-1]["content"] for r in out] == ["Hi!", "Hello"]  # nothing excluded without the option
    assert drops == {("es", "language_not_requested"): 1}


# ------------------------------------------------------------------------------- wildchat_prompts


def test_wildchat_prompts_extracts_first_user_turn():
    out, drops = run("wildchat_prompts", WILDCHAT_ROWS, source="wildchat")
    assert out == [{"id": "h-es", "source": "wildchat", "language": "es", "prompt": "Escribe un poema sobre el mar."}]
    assert drops == {
        ("es", "toxic"): 1,
        ("en", "redacted"): 1,
        ("en", "empty prompt"): 1,
        ("en", "no user turn"): 1,
        ("unknown", "unknown_language"): 1,
    }
    out, drops = run("wildchat_prompts", WILDCHAT_ROWS, languages=("es",))
    assert [r["id"] for r in out] == ["h-es"]
    assert drops == {("es", "toxic"): 1, ("en", "language_not_requested"): 3, ("unknown", "unknown_language"): 1}


# --------------------------------------------------------------------------------------- messages


def test_messages_exact_output_and_drops():
    out, drops = run("messages", MESSAGES_ROWS, options={"language": "en"}, source="self-identity")
    assert out[0] == {
        "id": "self-identity-si-1",
        "source": "self-identity",
        "language": "ca",
        "messages": MESSAGES_ROWS[0]["messages"],
    }
    assert out[1]["language"] == "en" and out[1]["id"].startswith("self-identity-")
    assert len(out) == 2
    # the French row is outside the mixture's languages: counted, not skipped
    assert drops == {("es", "invalid turn order"): 1, ("en", "unknown role"): 1, ("unknown", "unknown_language"): 1}


def test_messages_missing_language_is_dropped():
    out, drops = run("messages", MESSAGES_ROWS[:2])
    assert len(out) == 1 and drops == {("unknown", "missing language"): 1}


def test_repeated_source_ids_stay_unique():
    row = MESSAGES_ROWS[0]
    other = {**row, "messages": msgs(("user", "Com et dius?"), ("assistant", "ALIA."))}
    out, drops = run("messages", [row, other, copy.deepcopy(row)], source="s")
    assert out[0]["id"] == "s-si-1" and out[1]["id"].startswith("s-si-1-")
    assert drops == {("ca", "duplicate conversation"): 1}


# ------------------------------------------------------------------------- synthetic rows, at scale


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_raw_rows_are_deterministic(adapter):
    assert raw_rows(adapter, 5, seed=3) == raw_rows(adapter, 5, seed=3)
    assert raw_rows(adapter, 5, seed=3) != raw_rows(adapter, 5, seed=4)


@pytest.mark.parametrize("adapter", sorted(set(ADAPTERS) - {"wildchat_prompts"}))
def test_raw_rows_convert_to_valid_conversations(adapter):
    rows = raw_rows(adapter, 200)
    out, drops = run(adapter, rows, options=OPTIONS.get(adapter))
    assert len(out) >= 100
    assert len({r["id"] for r in out}) == len(out)
    for record in out:
        # "tier" (optional): the adapter's ranking for the mixture's selection (flores: its source pass)
        assert set(record) - {"tier"} == {"id", "source", "language", "messages"}
        assert record["source"] == "src" and record["language"] in LANGUAGES
        validate_conversation(record["messages"], record["id"])
    assert all(count > 0 and isinstance(reason, str) for (_, reason), count in drops.items())
    assert run(adapter, rows, options=OPTIONS.get(adapter)) == (out, drops)


def test_raw_rows_schema_and_shapes():
    flores = raw_rows("flores", 10, languages=("ca", "en", "es"))
    assert len(flores) == 30 and {r["iso_639_3"] for r in flores} == {"cat", "eng", "spa"}
    assert set(flores[0]) == {"id", "iso_639_3", "iso_15924", "glottocode", "text", "url", "domain", "topic"} | {
        "has_image",
        "has_hyperlink",
        "last_updated",
    }
    assert all("language" not in r for r in raw_rows("dolly", 20))
    trees = raw_rows("oasst2", 30)
    assert sum(r["parent_id"] is None for r in trees) == 30 and len(trees) > 90
    assert any(r["deleted"] for r in trees) and any(r["review_result"] is False for r in trees)
    assert any(r["rank"] is not None for r in trees)
    words = [
        len(m["content"].split()) for r in raw_rows("messages", 200) for m in r["messages"] if m["role"] == "assistant"
    ]
    assert min(words) >= 20 and max(words) > 400


def test_wildchat_raw_rows_give_prompts_and_drops():
    rows = raw_rows("wildchat_prompts", 200)
    out, drops = run("wildchat_prompts", rows)
    assert len(out) + sum(drops.values()) == 200
    assert drops[next(k for k in drops if k[1] == "toxic")] > 0
    assert all(set(r) == {"id", "source", "language", "prompt"} and r["prompt"] for r in out)
    assert len({r["id"] for r in out}) == len(out)


# ------------------------------------------------------------------------ content policy, balance


def test_message_content_policy_is_the_chatml_one():
    parts = [{"type": "text", "text": "Hola"}, {"type": "text", "text": "com va?"}]
    rows = [
        {"id": "p", "language": "ca", "messages": msgs(("user", "x"), ("assistant", "y"))},
        {"id": "l", "language": "ca", "messages": [{"role": "user", "content": parts}, *msgs(("assistant", "Bé."))]},
        {"id": "d", "language": "ca", "messages": [{"role": "user", "content": {"t": 1}}, *msgs(("assistant", "b"))]},
        {"id": "n", "language": "ca", "messages": [{"role": "user", "content": 7}, *msgs(("assistant", "b"))]},
    ]
    out, drops = run("messages", rows, source="s")
    assert [r["id"] for r in out] == ["s-p", "s-l"] and out[1]["messages"][0]["content"] == "Hola\ncom va?"
    assert drops == {("ca", "content_not_text"): 2}  # never str() of the structure
    aya = [{"inputs": ["not", "text"], "targets": "t", "language_code": "cat"},
           {"inputs": "q", "targets": {"a": 1}, "language_code": "cat"}]  # fmt: skip
    assert run("aya_dataset", aya) == ([], {("ca", "content_not_text"): 2})
    dolly = [{"instruction": "i", "context": 5, "response": "r"}]
    assert run("dolly", dolly, options={"language": "ca"}) == ([], {("ca", "content_not_text"): 1})


@pytest.mark.parametrize("adapter", sorted(ONE_TO_ONE_ADAPTERS))
def test_one_to_one_adapters_count_every_row_they_do_not_convert(adapter):
    # Rows of every mixture language, asked for only two: the others are counted, not skipped.
    rows = raw_rows(adapter, 60, languages=LANGUAGES)
    for languages in (LANGUAGES, ("ca", "es"), ("eu",)):
        out, drops = run(adapter, rows, languages=languages, options=OPTIONS.get(adapter))
        assert len(out) + sum(drops.values()) == len(rows), (adapter, languages)
