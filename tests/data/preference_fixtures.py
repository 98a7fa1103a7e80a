"""Hand-written raw rows in the exact schema of each preference source (nothing downloaded, nothing copied).

Each ``*_ROWS`` list mixes rows that convert with rows each adapter must drop; ``*_KEPT`` are the pairs the
adapter yields (ids included) and ``*_DROPS`` the drops it counts, for the languages ``*_LANGUAGES``. Field names
and types follow the sources' dataset cards (see :mod:`alia_nemo.data.preference_adapters`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def _hash(*parts: Any, length: int = 16) -> str:
    """The adapters' content hash, written again here so that a change to the ids is caught."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def hashed_id(source: str, language: str, prompt: list[dict[str, Any]], chosen: str, rejected: str) -> str:
    """The id an adapter gives a pair without one (a content hash, stable across runs)."""
    return f"{source}-{_hash(language, [prompt, chosen, rejected])}"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------------------ preference_jsonl (ours)

JSONL_LANGUAGES = ["ca", "en", "es", "gl"]
_NEMO_CONTEXT = [user("Name a primary colour.")]
PREFERENCE_JSONL_ROWS: list[dict[str, Any]] = [
    # our format: a string prompt, string answers
    {"id": "p1", "language": "ca", "prompt": "Quant fa 2 + 2?", "chosen": "2 + 2 fa 4.", "rejected": "2 + 2 FA 4."},
    # our format: a conversation so far, an answer as one assistant message; the language as a name
    {"id": "p2", "language": "Spanish",
     "prompt": [{"role": "system", "content": "Sé breve."}, user("Hola."), assistant("¡Hola!"), user("¿Y 3 + 1?")],
     "chosen": [assistant("3 + 1 es 4.")], "rejected": "3 + 1 ES 4."},
    # NeMo-RL's PreferenceDataset shape: the lower rank is preferred (listed second here); no id
    {"language": "en", "context": _NEMO_CONTEXT,
     "completions": [{"rank": 1, "completion": [assistant("PURPLE.")]},
                     {"rank": 0, "completion": [assistant("Red.")]}]},
    # equal ranks: a tie
    {"id": "tie", "language": "en", "context": _NEMO_CONTEXT,
     "completions": [{"rank": 0, "completion": [assistant("Red.")]}, {"rank": 0, "completion": [assistant("Blue.")]}]},
    # three completions
    {"id": "three", "language": "en", "context": _NEMO_CONTEXT,
     "completions": [{"rank": i, "completion": [assistant(c)]} for i, c in enumerate(("Red.", "Blue.", "Green."))]},
    # no language, none by default
    {"id": "nolang", "prompt": "Hi?", "chosen": "Hello.", "rejected": "HELLO."},
    # a language outside the six
    {"id": "de", "language": "de", "prompt": "Hallo?", "chosen": "Hallo.", "rejected": "HALLO."},
    # one of the six, not requested from this dataset
    {"id": "pt", "language": "pt", "prompt": "Olá?", "chosen": "Olá.", "rejected": "OLÁ."},
    # an answer of two messages
    {"id": "two", "language": "ca", "prompt": "Hola?", "chosen": [assistant("Hola."), assistant("Adéu.")],
     "rejected": "HOLA."},
    # an answer whose content is an image part
    {"id": "img", "language": "ca", "prompt": "Dibuixa.", "chosen": [{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "x.png"}}]}], "rejected": "No."},
    # a prompt that is a number
    {"id": "num", "language": "gl", "prompt": 42, "chosen": "Ola.", "rejected": "OLA."},
    # neither shape
    {"id": "neither", "language": "gl", "question": "Ola?", "answer": "Ola."},
    # no rejected answer
    {"id": "norej", "language": "gl", "prompt": "Ola?", "chosen": "Ola."},
    # an empty chosen answer: the adapter passes it on, prepare drops it (check_preference)
    {"id": "empty", "language": "gl", "prompt": "Ola?", "chosen": "", "rejected": "OLA."},
    # the id of the first row again, with other content: kept under a suffixed id
    {"id": "p1", "language": "ca", "prompt": "Quant fa 2 + 3?", "chosen": "2 + 3 fa 5.", "rejected": "2 + 3 FA 5."},
]  # fmt: skip
_P2_PROMPT = [{"role": "system", "content": "Sé breve."}, user("Hola."), assistant("¡Hola!"), user("¿Y 3 + 1?")]
_P5 = [user("Quant fa 2 + 3?")], "2 + 3 fa 5.", "2 + 3 FA 5."
PREFERENCE_JSONL_KEPT: list[dict[str, Any]] = [
    {"id": "jsonl-p1", "source": "jsonl", "language": "ca", "prompt": [user("Quant fa 2 + 2?")],
     "chosen": "2 + 2 fa 4.", "rejected": "2 + 2 FA 4."},
    {"id": "jsonl-p2", "source": "jsonl", "language": "es", "prompt": _P2_PROMPT, "chosen": "3 + 1 es 4.",
     "rejected": "3 + 1 ES 4."},
    {"id": hashed_id("jsonl", "en", _NEMO_CONTEXT, "Red.", "PURPLE."), "source": "jsonl", "language": "en",
     "prompt": _NEMO_CONTEXT, "chosen": "Red.", "rejected": "PURPLE."},
    {"id": "jsonl-empty", "source": "jsonl", "language": "gl", "prompt": [user("Ola?")], "chosen": "",
     "rejected": "OLA."},
    {"id": f"jsonl-p1-{_hash(list(_P5), length=8)}", "source": "jsonl", "language": "ca", "prompt": _P5[0],
     "chosen": _P5[1], "rejected": _P5[2]},
]  # fmt: skip
PREFERENCE_JSONL_DROPS = {
    ("en", "tie (no preferred answer)"): 1,
    ("en", "needs exactly two ranked completions"): 1,
    ("unknown", "missing language"): 1,
    ("unknown", "unknown_language"): 1,
    ("pt", "language_not_requested"): 1,
    ("ca", "answer is not text or one assistant message"): 1,
    ("ca", "content_not_text"): 1,
    ("gl", "prompt is not text or a message list"): 1,
    ("gl", "not a preference row"): 1,
    ("gl", "missing chosen or rejected answer"): 1,
}

# ------------------------------------------------------------------------------------ nvidia/HelpSteer3


def _individual(*scores: int) -> list[dict[str, Any]]:
    return [{"score": s, "reasoning": f"@Response {1 if s < 0 else 2} is clearer."} for s in scores]


HELPSTEER3_LANGUAGES = ["en", "es", "pt"]
_HS_MULTI_TURN = [user("Give me a fruit."), assistant("An apple."), user("Another one?")]
HELPSTEER3_ROWS: list[dict[str, Any]] = [
    {"domain": "general", "language": "english", "context": [user("Say hello politely.")],
     "response1": "Hello, nice to meet you.", "response2": "yo", "overall_preference": -2,
     "individual_preference": _individual(-2, -1, -2)},
    {"domain": "multilingual", "language": "spanish", "context": [user("¿Capital de Francia?")],
     "response1": "Lyon.", "response2": "París.", "overall_preference": 3, "individual_preference": _individual(3, 3)},
    {"domain": "general", "language": "english", "context": _HS_MULTI_TURN, "response1": "No.",
     "response2": "A banana.", "overall_preference": 1, "individual_preference": _individual(1, 1, 2)},
    # a tie
    {"domain": "multilingual", "language": "portuguese", "context": [user("Olá?")], "response1": "Olá!",
     "response2": "Oi!", "overall_preference": 0, "individual_preference": _individual(0, 1, -1)},
    # a language outside the six
    {"domain": "multilingual", "language": "chinese", "context": [user("你好")], "response1": "你好！",
     "response2": "嗨", "overall_preference": -1, "individual_preference": _individual(-1)},
    # code: the language field is a programming language
    {"domain": "code", "language": "python", "context": [user("Reverse a list in Python.")],
     "response1": "xs[::-1]", "response2": "xs.sort()", "overall_preference": -3,
     "individual_preference": _individual(-3, -3)},
    # no overall preference
    {"domain": "stem", "language": "english", "context": [user("What is 2 + 2?")], "response1": "4",
     "response2": "5", "overall_preference": None, "individual_preference": []},
    # a context that is not a message list
    {"domain": "stem", "language": "english", "context": "What is 3 + 3?", "response1": "6", "response2": "7",
     "overall_preference": -3, "individual_preference": _individual(-3)},
]  # fmt: skip
HELPSTEER3_KEPT: list[dict[str, Any]] = [
    {"id": hashed_id("hs3", "en", [user("Say hello politely.")], "Hello, nice to meet you.", "yo"), "source": "hs3",
     "language": "en", "prompt": [user("Say hello politely.")], "chosen": "Hello, nice to meet you.",
     "rejected": "yo"},
    {"id": hashed_id("hs3", "es", [user("¿Capital de Francia?")], "París.", "Lyon."), "source": "hs3",
     "language": "es", "prompt": [user("¿Capital de Francia?")], "chosen": "París.", "rejected": "Lyon."},
    {"id": hashed_id("hs3", "en", _HS_MULTI_TURN, "A banana.", "No."), "source": "hs3", "language": "en",
     "prompt": _HS_MULTI_TURN, "chosen": "A banana.", "rejected": "No."},
]  # fmt: skip
HELPSTEER3_DROPS = {
    ("pt", "tie (no preferred answer)"): 1,
    ("unknown", "unknown_language"): 1,
    ("unknown", "code domain without options.code_language"): 1,
    ("en", "overall_preference is not an integer"): 1,
    ("en", "prompt is not text or a message list"): 1,
}

# --------------------------------------------------------------------- HuggingFaceH4/ultrafeedback_binarized


def _uf(prompt_id: str, prompt: str, chosen: Any, rejected: Any, scores: tuple[float, float]) -> dict[str, Any]:
    return {"prompt": prompt, "prompt_id": prompt_id, "chosen": chosen, "rejected": rejected,
            "messages": chosen if isinstance(chosen, list) else [], "score_chosen": scores[0],
            "score_rejected": scores[1]}  # fmt: skip


ULTRAFEEDBACK_LANGUAGES = ["en"]
ULTRAFEEDBACK_ROWS: list[dict[str, Any]] = [
    _uf("a1b2", "Name a planet.", [user("Name a planet."), assistant("Mars.")],
        [user("Name a planet."), assistant("The Moon.")], (8.5, 3.0)),
    # equal scores: a tie
    _uf("c3d4", "Name a metal.", [user("Name a metal."), assistant("Iron.")],
        [user("Name a metal."), assistant("Copper.")], (7.0, 7.0)),
    # the two conversations do not share their prompt
    _uf("e5f6", "Name a river.", [user("Name a river."), assistant("The Nile.")],
        [user("Name a lake."), assistant("Titicaca.")], (9.0, 2.0)),
    # the chosen conversation does not end with the answer
    _uf("g7h8", "Name a tree.", [user("Name a tree.")], [user("Name a tree."), assistant("A rose.")], (6.0, 1.0)),
    # not message lists
    _uf("i9j0", "Name a bird.", "A robin.", "A bat.", (6.0, 1.0)),
]  # fmt: skip
ULTRAFEEDBACK_KEPT: list[dict[str, Any]] = [
    {"id": "uf-a1b2", "source": "uf", "language": "en", "prompt": [user("Name a planet.")], "chosen": "Mars.",
     "rejected": "The Moon."},
]  # fmt: skip
ULTRAFEEDBACK_DROPS = {
    ("en", "tie (no preferred answer)"): 1,
    ("en", "chosen and rejected prompts differ"): 1,
    ("en", "conversation does not end with the assistant answer"): 1,
    ("en", "chosen or rejected is not a message list"): 1,
}
