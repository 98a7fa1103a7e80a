"""Our ChatML template through NeMo-RL's own SFT message formatting (runs where nemo_rl imports)."""

from __future__ import annotations

import pytest

from alia_nemo.model.chatml import tokenize_conversation

pytestmark = pytest.mark.nemo_rl

CONV = [
    {"role": "system", "content": "Respon breument."},
    {"role": "user", "content": "Quin dia ve després de dilluns?"},
    {"role": "assistant", "content": "Dimarts."},
    {"role": "user", "content": "I després?"},
    {"role": "assistant", "content": "Dimecres."},
]


def _nemo_rl_ids(tok, add_bos: bool, add_eos: bool) -> list[int]:
    from nemo_rl.data.interfaces import TaskDataSpec
    from nemo_rl.data.llm_message_utils import get_formatted_message_log

    log = get_formatted_message_log(
        [dict(m) for m in CONV], tok, TaskDataSpec(task_name="alia"), add_bos_token=add_bos, add_eos_token=add_eos
    )
    return [int(t) for m in log for t in m["token_ids"]]


def test_nemo_rl_sft_formatting_gives_one_bos_and_our_tokens(tok):
    # NeMo-RL prepends BOS only when the rendered text lacks it; our template already wrote it.
    ids = _nemo_rl_ids(tok, add_bos=True, add_eos=False)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids == tokenize_conversation(tok, CONV).input_ids


def test_nemo_rl_add_eos_appends_a_second_stop_token(tok):
    # Why our NeMo-RL data config must set add_eos: false: the answer already ends in <|im_end|>.
    ids = _nemo_rl_ids(tok, add_bos=True, add_eos=True)
    assert ids[-2:] == [5, tok.eos_token_id]
