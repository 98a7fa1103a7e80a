"""The SFT processor NeMo-RL calls per conversation: ChatML tokens with our assistant-only loss mask.

NeMo-RL's SFT loop rebuilds ``token_loss_mask`` from each ``message_log`` entry's role (every token of
an ``assistant`` entry is trained). So the log is cut at our mask's edges: ``assistant`` entries hold
exactly the trained tokens (assistant content + its ``<|im_end|>``) and everything else (BOS, system and
user turns, the ``<|im_start|>assistant\\n`` headers, the newlines between turns) sits in entries named
for the turn they start with. No NeMo-RL import is needed: DatumSpec is a plain dict.

Tokenise once: rows of a prepared mixture carry the ids and mask ``prepare`` computed, with the hashes of the
tokenizer and template that made them; when they match the training tokenizer and our template, the message log
is cut from the stored ids without tokenising again (:func:`stored_tokens_usable`).
"""

from __future__ import annotations

import hashlib
import itertools
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from alia_nemo.data.cache import tokenizer_hash
from alia_nemo.model.chatml import CHAT_TEMPLATE, render_segments, tokenize_conversation

_RUNS = re.compile(rb"\x00+|\x01+")
TEMPLATE_SHA256 = hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()
_TOKENIZER_HASHES: dict[int, str] = {}  # id(tokenizer) -> its hash, computed once per process
_WARNED: set[tuple[str, str]] = set()


def stored_tokens_usable(datum: Mapping[str, Any], tokenizer: Any) -> bool:
    """Whether ``datum`` carries ids and a mask that ``prepare`` made with this tokenizer and our template.

    A mismatch (a different tokenizer or template than the mixture was prepared with) is said once per
    process: the conversations are tokenised again, so what is trained follows the training tokenizer.
    """
    if datum.get("input_ids") is None or datum.get("loss_mask") is None:
        return False
    key = id(tokenizer)
    if key not in _TOKENIZER_HASHES:
        _TOKENIZER_HASHES[key] = tokenizer_hash(tokenizer)
    problems = []
    if datum.get("prepared_tokenizer_sha256") != _TOKENIZER_HASHES[key]:
        problems.append(f"tokenizer (prepared with {str(datum.get('prepared_tokenizer_sha256'))[:12]}, training "
                        f"with {_TOKENIZER_HASHES[key][:12]})")  # fmt: skip
    if datum.get("prepared_template_sha256") != TEMPLATE_SHA256:
        problems.append("chat template")
    if problems:
        why = (str(datum.get("prepared_tokenizer_sha256")), str(datum.get("prepared_template_sha256")))
        if why not in _WARNED:
            _WARNED.add(why)
            print("[alia-nemo] warning: the prepared mixture's token ids were made with another "
                  f"{' and '.join(problems)}; "
                  "tokenising every conversation again (slower). Prepare the mixture with the tokenizer you train "
                  "with (alia-nemo compile does).", file=sys.stderr, flush=True)  # fmt: skip
        return False
    return True


def segment_message_log(
    messages: Sequence[Mapping[str, str]], input_ids: Sequence[int], loss_mask: Sequence[int], bos_token: str
) -> list[dict[str, Any]]:
    """Split a tokenised conversation into message-log entries along the loss mask's runs.

    Returns dicts with ``role``, ``content`` (the entry's text) and ``token_ids`` (a list; the processor
    turns them into tensors). Concatenating the entries gives back ``input_ids``; an entry's role is
    ``assistant`` exactly when its tokens are trained.
    """
    # Runs of equal mask values, found by the regex engine over the mask's bytes (C speed, not a Python loop).
    flags = bytes(loss_mask) if not hasattr(loss_mask, "astype") else loss_mask.astype("int8").tobytes()
    runs = [(r.start(), r.end(), flags[r.start()]) for r in _RUNS.finditer(flags)]  # (start, end, trained)
    # The rendered text in the same alternation: untrained text, trained text, untrained text, ...
    pieces: list[tuple[str, bool, str]] = []  # (text, trained, role of the turn the piece starts in)
    segments = render_segments(messages, bos_token)
    roles = [None] + [m["role"] for m in messages for _ in range(2 if m["role"] == "assistant" else 1)]
    for seg, role in zip(segments, roles):
        if pieces and pieces[-1][1] == seg.trained:
            pieces[-1] = (pieces[-1][0] + seg.text, seg.trained, pieces[-1][2])
        else:
            pieces.append((seg.text, seg.trained, role or messages[0]["role"]))
    if len(pieces) != len(runs) or any(bool(r[2]) != p[1] for r, p in zip(runs, pieces)):
        raise ValueError(
            f"loss mask runs ({len(runs)}) do not line up with the ChatML segments ({len(pieces)}); "
            "the tokenizer merged text across a turn boundary"
        )
    log = []
    for (start, end, trained), (text, _, role) in zip(runs, pieces):
        entry_role = "assistant" if trained else ("user" if role == "assistant" else role)
        log.append({"role": entry_role, "content": text, "token_ids": list(input_ids[start:end])})
    return log


def entry_tensors(log: list[dict[str, Any]]) -> None:
    """Each message-log entry's ids as an int64 tensor, in place.

    One tensor for the whole sequence, split into views per entry: a torch.tensor call per entry costs more than
    everything else the stored-ids path does.
    """
    import numpy as np
    import torch

    sizes = [len(m["token_ids"]) for m in log]
    chained = itertools.chain.from_iterable(m["token_ids"] for m in log)
    flat = torch.from_numpy(np.fromiter(chained, dtype=np.int64, count=sum(sizes)))
    for m, ids in zip(log, torch.split(flat, sizes)):
        m["token_ids"] = ids


def alia_sft_processor(
    datum_dict: dict[str, Any],
    task_data_spec: Any,
    tokenizer: Any,
    max_seq_length: int | None,
    idx: int,
    add_bos: bool = True,
    add_eos: bool = False,
    add_generation_prompt: bool = False,
) -> dict[str, Any]:
    """NeMo-RL ``TaskDataProcessFnCallable``: a datum with ``messages`` -> a DatumSpec.

    ``add_eos`` must be false (ChatML ends each turn with ``<|im_end|>``; an extra ``</s>`` would be trained
    after it) and ``add_generation_prompt`` false (SFT conversations end with the assistant's answer).
    ``add_bos=false`` drops the BOS the template writes.
    """
    if add_eos:
        raise ValueError(
            "data.add_eos=true would append </s> after <|im_end|> and train it; ALIA's ChatML ends turns with "
            "<|im_end|>: set data.add_eos=false (alia-nemo compile does)"
        )
    if add_generation_prompt:
        raise ValueError("data.add_generation_prompt=true opens an untrained assistant turn; set it to false for SFT")
    messages = datum_dict["messages"]
    cid = str(datum_dict.get("id", f"#{idx}"))
    if stored_tokens_usable(datum_dict, tokenizer):  # prepare tokenised it already: no second tokenisation
        log = segment_message_log(messages, datum_dict["input_ids"], datum_dict["loss_mask"], tokenizer.bos_token)
    else:
        tok = tokenize_conversation(tokenizer, messages, cid)
        log = segment_message_log(messages, tok.input_ids, tok.loss_mask, tokenizer.bos_token)
    if not add_bos and log[0]["token_ids"][:1] == [tokenizer.bos_token_id]:
        log[0]["token_ids"] = log[0]["token_ids"][1:]
        log[0]["content"] = log[0]["content"].removeprefix(tokenizer.bos_token)
    length = sum(len(m["token_ids"]) for m in log)
    loss_multiplier = 1.0
    if max_seq_length is not None and length > max_seq_length:
        # Can not happen with a mixture prepared for this length; if it does, say so instead of NeMo-RL's silence.
        # This may run in a dataloader worker process: the engine counts masked rows where batches are consumed.
        print(
            f"[alia-nemo] conversation {cid} has {length} tokens > max_input_seq_length={max_seq_length}: "
            "masked out (loss 0); prepare the mixture for this length",
            file=sys.stderr,
        )
        keep = max_seq_length
        for m in log:
            m["token_ids"], keep = m["token_ids"][:keep], max(0, keep - len(m["token_ids"]))
        log = [m for m in log if m["token_ids"]]
        length = sum(len(m["token_ids"]) for m in log)
        loss_multiplier = 0.0
    entry_tensors(log)
    return {
        "message_log": log,
        "length": length,
        "extra_env_info": None,
        "loss_multiplier": loss_multiplier,
        "idx": idx,
        "task_name": datum_dict.get("task_name", getattr(task_data_spec, "task_name", None)),
    }
