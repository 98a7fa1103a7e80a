"""ChatML for ALIA: the Jinja chat template, conversation checks, and assistant-only loss masks.

The template writes ``bos_token`` itself, because transformers' ``apply_chat_template(tokenize=True)``
and vLLM's chat endpoint tokenise the rendered text without adding special tokens. Everything here
that tokenises rendered text therefore passes ``add_special_tokens=False``: BOS appears exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from alia_nemo.errors import AliaError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant")

# Messages are joined by a newline; the last one has none after it (the card's example ends at
# <|im_end|>). A generation prompt opens an assistant turn after the last message.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('ChatML: unknown role ' ~ message['role'] ~ '; use system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages | length > 0 -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


# Generation stops on <|im_end|> (5) as well as </s> (2); the card's sampling advice.
GENERATION_DEFAULTS = {
    "eos_token_id": [2, 5],
    "pad_token_id": 3,
    "bos_token_id": 1,
    "do_sample": True,
    "temperature": 0.1,
    "repetition_penalty": 1.0,
}


class ConversationError(AliaError, ValueError):
    """A conversation that can not be rendered or trained; the message names it and the problem.

    ``reason`` is the short, stable text a dropped row is counted under (the problem up to its first ';'
    unless given): reports stay readable because it carries no row numbers or ids.
    """

    def __init__(self, conversation_id: str, problem: str, reason: str | None = None):
        self.conversation_id = conversation_id
        self.problem = problem
        self.reason = reason or problem.split(";")[0]
        super().__init__(f"conversation {conversation_id!r}: {problem}")


CONTENT_NOT_TEXT = "content_not_text"


def content_text(content: Any) -> str | None:
    """The text of a message's ``content``: the one content policy of every data path.

    - a string is the text, as it is;
    - a list of text parts ``[{"type": "text", "text": str}, ...]`` (the OpenAI / Hugging Face multimodal
      shape; other keys of a part are ignored) is the parts' texts joined with newlines;
    - ``None`` (a missing content) is the empty text, which the checks then reject as empty;
    - anything else (a dict, a number, a boolean, a list with an image or any other part) is not text:
      ``None`` is returned and the caller drops the row under :data:`CONTENT_NOT_TEXT`. Never str(): a
      Python repr of a structure must not become training text.
    """
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                return None
            texts.append(part["text"])
        return "\n".join(texts)
    return None


def checked_messages(
    messages: Any, conversation_id: str = "<unnamed>", *, require_assistant: bool = True
) -> list[dict[str, str]]:
    """``messages`` as ``[{"role", "content": str}]`` (other keys left out), contents read by :func:`content_text`
    and the conversation checked by :func:`validate_conversation`.

    Raises :class:`ConversationError`: reason :data:`CONTENT_NOT_TEXT` for a content that is not text, else
    the shape problem. Both the mixture (:mod:`alia_nemo.data.adapters`) and ``data=jsonl``
    (:mod:`alia_nemo.data.loading`) read messages through here, so a row is kept or dropped alike on both.
    """
    if isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)):
        out: list[Any] = []
        for i, message in enumerate(messages):
            if isinstance(message, Mapping) and "role" in message and "content" in message:
                text = content_text(message["content"])
                if text is None:
                    raise ConversationError(
                        conversation_id,
                        f"message {i} has a {type(message['content']).__name__} content that is not text; use a "
                        'string or a list of {"type": "text", "text": ...} parts',
                        reason=CONTENT_NOT_TEXT,
                    )
                out.append({"role": message["role"], "content": text})
            else:
                out.append(message)  # validate_conversation names the problem
        messages = out
    validate_conversation(messages, conversation_id, require_assistant=require_assistant)
    return messages


def validate_conversation(messages: Any, conversation_id: str = "<unnamed>", *, require_assistant: bool = True) -> None:
    """Check a conversation's shape: optional leading system turn, then user/assistant alternating.

    With ``require_assistant`` (training) it must end with an assistant turn, so there is something
    to learn and no unanswered prompt.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or len(messages) == 0:
        raise ConversationError(conversation_id, "empty conversation: 'messages' must be a non-empty list")
    expected = "user"
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ConversationError(conversation_id, f"message {i} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ConversationError(conversation_id, f"message {i} has unknown role {role!r}; use one of {list(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise ConversationError(conversation_id, f"message {i} ({role}) has empty or non-text content")
        if IM_START in content or IM_END in content:
            raise ConversationError(
                conversation_id, f"message {i} ({role}) contains a ChatML control token in its text"
            )
        if role == "system":
            if i != 0:
                raise ConversationError(conversation_id, f"message {i}: a system turn is only allowed first")
            continue
        if role != expected:
            raise ConversationError(
                conversation_id,
                f"message {i}: expected a {expected} turn, got {role} (user and assistant must alternate)",
            )
        expected = "assistant" if role == "user" else "user"
    if require_assistant:
        if not any(m["role"] == "assistant" for m in messages):
            raise ConversationError(conversation_id, "no assistant turn to train")
        if messages[-1]["role"] != "assistant":
            raise ConversationError(conversation_id, "ends with an unanswered user turn; drop it or add the answer")


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text and whether its tokens carry loss."""

    text: str
    trained: bool


def render_segments(
    messages: Sequence[Mapping[str, str]], bos_token: str = "<s>", add_generation_prompt: bool = False
) -> list[Segment]:
    """The template's output split into trained (assistant content + its ``<|im_end|>``) and untrained text.

    Mirrors :data:`CHAT_TEMPLATE`; tests check that the concatenation equals the Jinja rendering.
    """
    segments = [Segment(bos_token, False)]
    for i, message in enumerate(messages):
        header = ("\n" if i else "") + f"{IM_START}{message['role']}\n"
        if message["role"] == "assistant":
            segments += [Segment(header, False), Segment(message["content"] + IM_END, True)]
        else:
            segments.append(Segment(header + message["content"] + IM_END, False))
    if add_generation_prompt:
        segments.append(Segment(("\n" if messages else "") + f"{IM_START}assistant\n", False))
    return segments


def render(messages: Sequence[Mapping[str, str]], bos_token: str = "<s>", add_generation_prompt: bool = False) -> str:
    """Render a conversation to text exactly as :data:`CHAT_TEMPLATE` does."""
    return "".join(s.text for s in render_segments(messages, bos_token, add_generation_prompt))


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is trained

    @property
    def labels(self) -> list[int]:
        """Labels for a causal LM: the token where trained, -100 (ignored) elsewhere."""
        return [t if m else -100 for t, m in zip(self.input_ids, self.loss_mask)]


def _text_and_spans(messages: Sequence[Mapping[str, str]], bos_token: str) -> tuple[str, list[tuple[int, int]]]:
    spans, start, parts = [], 0, []
    for seg in render_segments(messages, bos_token):
        if seg.trained:
            spans.append((start, start + len(seg.text)))
        start += len(seg.text)
        parts.append(seg.text)
    return "".join(parts), spans


def _encode_masked(
    tokenizer, texts: list[str], spans: list[list[tuple[int, int]]]
) -> list[tuple[list[int], list[int]]]:
    """Token ids and loss masks of rendered texts whose trained character spans are given."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        encs = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [(list(i), overlap_mask(o, s)) for i, o, s in zip(encs["input_ids"], encs["offset_mapping"], spans)]
    # The Rust tokenizer directly: same ids as the transformers wrapper without its per-call overhead, a
    # batch encoded in parallel, and each span mapped to its first and last token by two lookups instead
    # of materialising every token's offsets in Python.
    out = []
    for enc, conv_spans in zip(backend.encode_batch(texts, add_special_tokens=False), spans):
        ids = enc.ids
        mask = [0] * len(ids)
        for start, end in conv_spans:
            first, last = enc.char_to_token(start), enc.char_to_token(end - 1)
            if first is None or last is None:  # a character no token covers: fall back to offsets
                mask = overlap_mask(enc.offsets, conv_spans)
                break
            mask[first : last + 1] = [1] * (last + 1 - first)
        out.append((ids, mask))
    return out


def tokenize_conversation(
    tokenizer, messages: Sequence[Mapping[str, str]], conversation_id: str = "<unnamed>"
) -> TokenizedConversation:
    """Tokenise a training conversation and mark assistant content and its ``<|im_end|>`` as trained.

    The rendered text is tokenised in one piece (so ids equal ``apply_chat_template(tokenize=True)``)
    with ``add_special_tokens=False`` (the template already wrote BOS); character offsets map the
    trained spans onto tokens.
    """
    return tokenize_conversations(tokenizer, [messages], [conversation_id])[0]


def tokenize_conversations(
    tokenizer, conversations: Sequence[Sequence[Mapping[str, str]]], ids: Sequence[str] | None = None
) -> list[TokenizedConversation]:
    """:func:`tokenize_conversation` for many conversations with one batched tokenizer call."""
    ids = ids or [f"#{i}" for i in range(len(conversations))]
    rendered = []
    for messages, cid in zip(conversations, ids):
        validate_conversation(messages, cid)
        rendered.append(_text_and_spans(messages, tokenizer.bos_token))
    encoded = _encode_masked(tokenizer, [text for text, _ in rendered], [spans for _, spans in rendered])
    return [TokenizedConversation(ids, mask) for ids, mask in encoded]


def overlap_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose character range overlaps a trained span, in one pass (both lists sorted).

    Tokens never straddle the special <|im_end|> / <|im_start|> boundaries, so the overlap rule only
    matters for merges at a newline.
    """
    mask, j = [], 0
    for a, b in offsets:
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        mask.append(int(j < len(spans) and spans[j][0] < b and a < spans[j][1]))
    return mask


# --- preference pairs (DPO) -------------------------------------------------------------------------------------


def check_preference(
    prompt: Any, chosen: Any, rejected: Any, pair_id: str = "<unnamed>"
) -> tuple[list[dict[str, str]], str, str]:
    """A preference pair checked: ``prompt`` a conversation ending with a user turn, two different non-empty answers.

    Returns ``(prompt messages, chosen, rejected)`` with contents read by :func:`content_text`. Raises
    :class:`ConversationError` naming the problem; its ``reason`` is what a dropped pair is counted under.
    """
    messages = checked_messages(prompt, pair_id, require_assistant=False)
    if messages[-1]["role"] != "user":
        raise ConversationError(
            pair_id, f"the prompt ends with a {messages[-1]['role']} turn; it must end with the user turn both "
            "answers reply to", reason="prompt does not end with a user turn",
        )  # fmt: skip
    answers = []
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        text = content_text(answer)
        if text is None:
            raise ConversationError(pair_id, f"the {name} answer is not text", reason=CONTENT_NOT_TEXT)
        if not text.strip():
            raise ConversationError(pair_id, f"the {name} answer is empty", reason=f"empty {name} answer")
        if IM_START in text or IM_END in text:
            raise ConversationError(
                pair_id, f"the {name} answer contains a ChatML control token", reason="ChatML control token in answer"
            )
        answers.append(text)
    if answers[0] == answers[1]:
        raise ConversationError(pair_id, "chosen and rejected answers are identical; nothing to prefer",
                                reason="identical answers")  # fmt: skip
    return messages, answers[0], answers[1]


def preference_segments(prompt: Sequence[Mapping[str, str]], answer: str, bos_token: str = "<s>") -> list[Segment]:
    """``prompt`` answered by ``answer``: only the answer's content and its ``<|im_end|>`` are trained.

    Assistant turns inside the prompt are context (they are the same for both answers of a pair), so they
    carry no loss; the sequence ends at the answer's ``<|im_end|>``, as :data:`CHAT_TEMPLATE` renders it.
    """
    segments = render_segments([*prompt, {"role": "assistant", "content": answer}], bos_token)
    return [Segment(s.text, False) for s in segments[:-1]] + [segments[-1]]


def tokenize_preferences(
    tokenizer,
    pairs: Sequence[tuple[Sequence[Mapping[str, str]], str, str]],
    ids: Sequence[str] | None = None,
) -> list[tuple[TokenizedConversation, TokenizedConversation]]:
    """(chosen, rejected) token ids and masks of checked pairs ``(prompt, chosen, rejected)``, one batched call.

    Each sequence is the ChatML rendering of the prompt plus one answer, tokenised in one piece with one BOS
    (the template's; ``add_special_tokens=False``); the mask is 1 on the answer's content and ``<|im_end|>`` only.
    """
    ids = ids or [f"#{i}" for i in range(len(pairs))]
    texts, spans = [], []
    for (prompt, chosen, rejected), pid in zip(pairs, ids):
        check_preference(prompt, chosen, rejected, pid)
        for answer in (chosen, rejected):
            start, parts, trained = 0, [], []
            for seg in preference_segments(prompt, answer, tokenizer.bos_token):
                if seg.trained:
                    trained.append((start, start + len(seg.text)))
                start += len(seg.text)
                parts.append(seg.text)
            texts.append("".join(parts))
            spans.append(trained)
    encoded = [TokenizedConversation(i, m) for i, m in _encode_masked(tokenizer, texts, spans)]
    return [(encoded[2 * k], encoded[2 * k + 1]) for k in range(len(pairs))]
