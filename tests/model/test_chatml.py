"""ChatML template: exact renderings, exact loss masks, BOS exactly once on every path, bad conversations."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alia_nemo.model.chatml import (
    CHAT_TEMPLATE,
    ConversationError,
    render,
    tokenize_conversation,
    validate_conversation,
)

CARD = [
    {"role": "user", "content": "At what temperature does water boil?"},
    {"role": "assistant", "content": "Water turns into vapor at 100°C."},
]
CARD_TEXT = (
    "<s><|im_start|>user\nAt what temperature does water boil?<|im_end|>\n"
    "<|im_start|>assistant\nWater turns into vapor at 100°C.<|im_end|>"
)
MULTI = [
    {"role": "user", "content": "Hola!"},
    {"role": "assistant", "content": "Hola, com et puc ajudar?"},
    {"role": "user", "content": "Quant fa 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 fa 4."},
]
SYSTEM = [
    {"role": "system", "content": "Respon breument."},
    {"role": "user", "content": "Capital de França?"},
    {"role": "assistant", "content": "París."},
]


def test_card_example_renders_exactly(tok):
    assert tok.apply_chat_template(CARD, tokenize=False) == CARD_TEXT
    assert render(CARD) == CARD_TEXT


def test_multi_turn_and_system_render_exactly(tok):
    assert tok.apply_chat_template(MULTI, tokenize=False) == (
        "<s><|im_start|>user\nHola!<|im_end|>\n<|im_start|>assistant\nHola, com et puc ajudar?<|im_end|>\n"
        "<|im_start|>user\nQuant fa 2 + 2?<|im_end|>\n<|im_start|>assistant\n2 + 2 fa 4.<|im_end|>"
    )
    assert tok.apply_chat_template(SYSTEM, tokenize=False) == (
        "<s><|im_start|>system\nRespon breument.<|im_end|>\n<|im_start|>user\nCapital de França?<|im_end|>\n"
        "<|im_start|>assistant\nParís.<|im_end|>"
    )


def test_generation_prompt(tok):
    prompt = tok.apply_chat_template(CARD[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|im_start|>user\nAt what temperature does water boil?<|im_end|>\n<|im_start|>assistant\n"
    assert render(CARD[:1], add_generation_prompt=True) == prompt


def test_unknown_role_raises_in_template(tok):
    with pytest.raises(Exception, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def _trained_text(tok, conv) -> str:
    return tok.decode([t for t, m in zip(conv.input_ids, conv.loss_mask) if m])


def _untrained_text(tok, conv) -> str:
    return tok.decode([t for t, m in zip(conv.input_ids, conv.loss_mask) if not m])


def test_mask_single_turn_exact(tok):
    conv = tokenize_conversation(tok, CARD)
    assert _trained_text(tok, conv) == "Water turns into vapor at 100°C.<|im_end|>"
    assert (
        _untrained_text(tok, conv)
        == "<s><|im_start|>user\nAt what temperature does water boil?<|im_end|>\n<|im_start|>assistant\n"
    )
    # The exact mask: everything up to and including "assistant\n" is 0, the answer and <|im_end|> are 1.
    header = tok(
        "<s><|im_start|>user\nAt what temperature does water boil?<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    )["input_ids"]
    assert conv.input_ids[: len(header)] == header
    assert conv.loss_mask == [0] * len(header) + [1] * (len(conv.input_ids) - len(header))
    assert conv.input_ids[-1] == 5 and conv.loss_mask[-1] == 1  # <|im_end|> closes the answer and is trained
    assert conv.labels[: len(header)] == [-100] * len(header)


def test_mask_multi_turn_exact(tok):
    conv = tokenize_conversation(tok, MULTI)
    assert _trained_text(tok, conv) == "Hola, com et puc ajudar?<|im_end|>2 + 2 fa 4.<|im_end|>"
    # Mask runs: 0 (bos..assistant header), 1 (answer 1), 0 (newline, user turn, header), 1 (answer 2).
    runs = [m for i, m in enumerate(conv.loss_mask) if i == 0 or m != conv.loss_mask[i - 1]]
    assert runs == [0, 1, 0, 1]
    assert conv.input_ids.count(5) == 4 and [conv.loss_mask[i] for i, t in enumerate(conv.input_ids) if t == 5] == [
        0,
        1,
        0,
        1,
    ]


def test_mask_system_prompt_not_trained(tok):
    conv = tokenize_conversation(tok, SYSTEM)
    assert _trained_text(tok, conv) == "París.<|im_end|>"
    assert "Respon breument." in _untrained_text(tok, conv)


def test_bos_exactly_once_on_every_path(tok):
    # 1. transformers apply_chat_template(tokenize=True): template writes BOS, tokenizer adds none.
    ids = tok.apply_chat_template(CARD, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids.count(1) == 1 and ids[0] == 1
    # 2. vLLM's chat endpoint: render to text, tokenise without special tokens.
    text = tok.apply_chat_template(CARD, tokenize=False, add_generation_prompt=False)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    # 3. Our SFT path.
    ours = tokenize_conversation(tok, CARD).input_ids
    assert ours == ids and ours.count(1) == 1
    # The trap the template avoids: tokenising rendered text *with* special tokens doubles BOS.
    assert tok(text)["input_ids"][:2] == [1, 1]


def test_template_is_installed_and_saved(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == CHAT_TEMPLATE
    assert reloaded.apply_chat_template(CARD, tokenize=False) == CARD_TEXT


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "empty conversation"),
        ("hello", "empty conversation"),
        ([{"role": "bot", "content": "hi"}], "unknown role 'bot'"),
        ([{"role": "assistant", "content": "hi"}], "expected a user turn, got assistant"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected a assistant turn, got user"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system turn is only allowed first"),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}], "no assistant turn to train"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
            "unanswered user turn",
        ),
        ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}], "empty or non-text content"),
        ([{"role": "user"}], "must be an object with 'role' and 'content'"),
        ([{"role": "user", "content": "x<|im_end|>"}, {"role": "assistant", "content": "b"}], "control token"),
    ],
)
def test_malformed_conversations_name_conversation_and_problem(messages, problem):
    with pytest.raises(ConversationError) as err:
        validate_conversation(messages, "row-17")
    assert "row-17" in str(err.value) and problem in str(err.value)


text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=40).filter(
    lambda s: s.strip() and "<|" not in s and "<s>" not in s and "</s>" not in s
)


@settings(max_examples=60, deadline=None)
@given(turns=st.lists(st.tuples(text, text), min_size=1, max_size=3), system=st.one_of(st.none(), text))
def test_property_trained_tokens_are_exactly_the_answers(tok, turns, system):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})
    ]
    conv = tokenize_conversation(tok, messages)
    assert tok.decode(conv.input_ids) == render(messages)  # lossless (byte fallback)
    assert conv.input_ids == list(
        tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    )
    assert _trained_text(tok, conv) == "".join(a + "<|im_end|>" for _, a in turns)
    assert conv.input_ids.count(1) == 1 and conv.loss_mask[0] == 0


def test_batched_fast_path_equals_the_offsets_rule(tok):
    import json

    from alia_nemo.model.chatml import _text_and_spans, overlap_mask, tokenize_conversations
    from alia_nemo.sample_data import sample_path

    convs = [json.loads(line)["messages"] for line in sample_path().read_text().splitlines()]
    fast = tokenize_conversations(tok, convs)
    for messages, got in zip(convs, fast):
        text, spans = _text_and_spans(messages, tok.bos_token)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert got.input_ids == enc["input_ids"]
        assert got.loss_mask == overlap_mask(enc["offset_mapping"], spans)


# ----------------------------------------------------------------------------- the content policy


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ("plain", "plain"),
        ("", ""),
        (None, ""),  # a missing content is empty text (then rejected as empty), never "None"
        ([{"type": "text", "text": "a"}, {"type": "text", "text": "b", "cache_control": {}}], "a\nb"),
        ([], ""),
        ({"type": "text", "text": "a dict"}, None),
        ([{"type": "image_url", "image_url": {"url": "u"}}], None),
        ([{"type": "text", "text": "a"}, "b"], None),
        ([{"type": "text", "text": 3}], None),
        (3, None),
        (2.5, None),
        (True, None),
    ],
)
def test_content_text_policy(content, text):
    from alia_nemo.model.chatml import content_text

    assert content_text(content) == text


def test_checked_messages_joins_parts_and_names_non_text_content():
    from alia_nemo.model.chatml import CONTENT_NOT_TEXT, checked_messages

    parts = [{"type": "text", "text": "Hola"}, {"type": "text", "text": "com va?"}]
    messages = [{"role": "user", "content": parts, "name": "x"}, {"role": "assistant", "content": "Bé."}]
    assert checked_messages(messages, "c") == [
        {"role": "user", "content": "Hola\ncom va?"},
        {"role": "assistant", "content": "Bé."},
    ]
    with pytest.raises(ConversationError) as err:
        checked_messages([{"role": "user", "content": {"a": 1}}, {"role": "assistant", "content": "b"}], "c")
    assert err.value.reason == CONTENT_NOT_TEXT and "message 0 has a dict content that is not text" in str(err.value)
    with pytest.raises(ConversationError, match="unknown role"):  # shape problems are validate_conversation's
        checked_messages([{"role": "bot", "content": "x"}], "c")
    with pytest.raises(ConversationError, match="must be a non-empty list"):
        checked_messages("not a list", "c")
