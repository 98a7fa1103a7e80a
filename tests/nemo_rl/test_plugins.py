"""Our dataset class and processor against NeMo-RL's RawDataset / DatumSpec contracts, by structure (CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from alia_nemo.model.chatml import tokenize_conversation
from alia_nemo.nemo_rl import AliaSFTDataset, alia_sft_processor
from alia_nemo.nemo_rl.dataset import AliaDataError
from alia_nemo.nemo_rl.processor import segment_message_log

MESSAGES = [
    {"role": "system", "content": "Ets un assistent."},
    {"role": "user", "content": "Hola, com estàs?"},
    {"role": "assistant", "content": "Molt bé, gràcies."},
    {"role": "user", "content": "I tu?"},
    {"role": "assistant", "content": "També 123."},
]


def test_importing_plugins_does_not_import_nemo_rl():
    code = "import sys, alia_nemo.nemo_rl, alia_nemo.config.to_nemo_rl; print('nemo_rl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dataset_exposes_the_raw_dataset_contract(tiny_compiled):
    _, compiled = tiny_compiled
    entry = compiled.config["data"]["train"]
    ds = AliaSFTDataset(**entry)  # exactly how NeMo-RL's loader builds it
    manifest = ds.manifest
    assert ds.task_name == "alia_sft"
    assert len(ds.dataset) == manifest["totals"]["selected"] + manifest["totals"].get("repeated", 0) == 282
    assert len(ds.val_dataset) == manifest["totals"]["val"] == 18
    row = ds.dataset[0]
    assert row["task_name"] == "alia_sft"
    assert isinstance(row["messages"], list) and row["messages"][-1]["role"] == "assistant"
    assert {"id", "source", "language"} <= set(row)
    assert ds.data_path == entry["data_path"] and len(ds) == 282
    # NeMo-RL's loader fills these through set_task_spec/set_processor (test_integration.py runs them for real).
    assert ds.task_spec is None and ds.processor is None and ds.data_config == {}
    assert ds.processor_name == "alia_sft_processor" and ds.processor_function() is alia_sft_processor
    train_ids = [r["id"] for r in ds.dataset]
    val_ids = [r["id"] for r in ds.val_dataset]
    assert len(set(train_ids)) == 282 and len(set(val_ids)) == 18  # every row its own id
    assert not set(train_ids) & set(val_ids)  # the held-out rows are not trained on


def test_dataset_refuses_bad_entries(tiny_compiled, tmp_path):
    _, compiled = tiny_compiled
    entry = dict(compiled.config["data"]["train"])
    with pytest.raises(TypeError, match="unknown keys \\['data_pth'\\]"):
        AliaSFTDataset(**entry, data_pth="x")
    with pytest.raises(AliaDataError, match=r"not a prepared mixture.*alia-nemo prepare"):
        AliaSFTDataset(**{**entry, "data_path": str(tmp_path)})
    with pytest.raises(AliaDataError, match="prompt_file"):
        AliaSFTDataset(**{**entry, "prompt_file": "p.txt"})
    no_val = AliaSFTDataset(**{**entry, "use_validation": False})
    assert no_val.val_dataset is None


def test_processor_yields_datumspec_whose_assistant_entries_are_the_mask(tok):
    datum = alia_sft_processor({"messages": MESSAGES, "task_name": "alia_sft"}, None, tok, 256, 7)
    assert set(datum) == {"message_log", "length", "extra_env_info", "loss_multiplier", "idx", "task_name"}
    assert datum["idx"] == 7 and datum["loss_multiplier"] == 1.0 and datum["extra_env_info"] is None
    ours = tokenize_conversation(tok, MESSAGES)
    log = datum["message_log"]
    assert all(isinstance(m["token_ids"], torch.Tensor) and m["token_ids"].dtype == torch.long for m in log)
    ids = torch.cat([m["token_ids"] for m in log]).tolist()
    # NeMo-RL's rule: every token of an assistant entry is trained, nothing else.
    mask = [int(m["role"] == "assistant") for m in log for _ in range(len(m["token_ids"]))]
    assert ids == ours.input_ids and mask == ours.loss_mask and datum["length"] == len(ids)
    assert [m["role"] for m in log] == ["system", "assistant", "user", "assistant"]
    assert [m["content"] for m in log if m["role"] == "assistant"] == [
        "Molt bé, gràcies.<|im_end|>",
        "També 123.<|im_end|>",
    ]
    assert log[0]["content"].startswith("<s><|im_start|>system\n") and log[0]["content"].endswith(
        "<|im_start|>assistant\n"
    )
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_processor_options(tok):
    with pytest.raises(ValueError, match="add_eos=false"):
        alia_sft_processor({"messages": MESSAGES}, None, tok, 256, 0, add_eos=True)
    with pytest.raises(ValueError, match="add_generation_prompt"):
        alia_sft_processor({"messages": MESSAGES}, None, tok, 256, 0, add_generation_prompt=True)
    without_bos = alia_sft_processor({"messages": MESSAGES}, None, tok, 256, 0, add_bos=False)
    assert without_bos["message_log"][0]["token_ids"][0].item() != tok.bos_token_id
    assert without_bos["length"] == len(tokenize_conversation(tok, MESSAGES).input_ids) - 1


def test_overlong_conversation_is_masked_and_said(tok, capsys):
    """Truncated to the limit with zero loss weight; the engine counts such rows as the driver consumes them."""
    datum = alia_sft_processor({"messages": MESSAGES, "task_name": "t", "id": "c7"}, None, tok, 10, 0)
    assert datum["loss_multiplier"] == 0.0 and datum["length"] == 10
    assert sum(len(m["token_ids"]) for m in datum["message_log"]) == 10
    assert "conversation c7 has" in capsys.readouterr().err


def test_segment_message_log_rejects_masks_that_do_not_line_up(tok):
    ours = tokenize_conversation(tok, MESSAGES)
    with pytest.raises(ValueError, match="do not line up"):
        segment_message_log(MESSAGES, ours.input_ids, [1] * len(ours.input_ids), tok.bos_token)


class _NoEncoding:
    """A tokenizer that refuses to tokenise (its hash and special tokens still work): proves no second pass."""

    def __init__(self, tok):
        self._tok = tok
        self.backend_tokenizer = _NoEncodingBackend(tok.backend_tokenizer)

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenised again")


class _NoEncodingBackend:
    def __init__(self, backend):
        self._backend = backend

    def to_str(self):
        return self._backend.to_str()

    def encode_batch(self, *args, **kwargs):
        raise AssertionError("tokenised again")


def _stored(tok, messages, **hashes):
    from alia_nemo.data.cache import tokenizer_hash
    from alia_nemo.nemo_rl.processor import TEMPLATE_SHA256

    ours = tokenize_conversation(tok, messages)
    return {"messages": messages, "task_name": "t", "id": "c1", "input_ids": ours.input_ids,
            "loss_mask": ours.loss_mask, "prepared_tokenizer_sha256": tokenizer_hash(tok),
            "prepared_template_sha256": TEMPLATE_SHA256, **hashes}  # fmt: skip


def _logs_equal(a, b):
    return [(m["role"], m["content"], m["token_ids"].tolist()) for m in a["message_log"]] == [
        (m["role"], m["content"], m["token_ids"].tolist()) for m in b["message_log"]
    ]


def test_processor_builds_the_log_from_stored_ids_without_tokenising(tok):
    fresh = alia_sft_processor({"messages": MESSAGES, "task_name": "t", "id": "c1"}, None, tok, 256, 3)
    stored = alia_sft_processor(_stored(tok, MESSAGES), None, _NoEncoding(tok), 256, 3)
    assert _logs_equal(fresh, stored) and stored["length"] == fresh["length"]
    with pytest.raises(AssertionError, match="tokenised again"):  # the guard itself works
        alia_sft_processor({"messages": MESSAGES, "task_name": "t"}, None, _NoEncoding(tok), 256, 3)
    # Over-long stored rows are cut and masked exactly like tokenised ones.
    cut = alia_sft_processor(_stored(tok, MESSAGES), None, _NoEncoding(tok), 10, 3)
    assert cut["loss_multiplier"] == 0.0 and cut["length"] == 10


def test_processor_tokenises_again_when_tokenizer_or_template_differ(tok, capsys):
    import alia_nemo.nemo_rl.processor as processor

    processor._WARNED.clear()
    fresh = alia_sft_processor({"messages": MESSAGES, "task_name": "t"}, None, tok, 256, 0)
    for hashes in ({"prepared_tokenizer_sha256": "0" * 64}, {"prepared_template_sha256": "1" * 64}):
        datum = _stored(tok, MESSAGES, **hashes)
        datum["input_ids"] = [5] * len(datum["input_ids"])  # stale ids must not be trained
        for _ in range(2):
            assert _logs_equal(alia_sft_processor(datum, None, tok, 256, 0), fresh)
    err = capsys.readouterr().err
    assert err.count("tokenising every conversation again") == 2  # once per mismatch, not once per row
    assert "another tokenizer" in err and "another chat template" in err


def test_prepared_rows_carry_their_stored_ids(tiny_compiled, tok):
    _, compiled = tiny_compiled
    ds = AliaSFTDataset(**compiled.config["data"]["train"])
    row = ds.dataset[0]
    assert row["prepared_tokenizer_sha256"] == ds.manifest["tokenizer"]["sha256"]
    assert row["prepared_template_sha256"] == ds.manifest["template_sha256"]
    ours = tokenize_conversation(tok, row["messages"])
    assert row["input_ids"] == ours.input_ids and row["loss_mask"] == ours.loss_mask
    datum = alia_sft_processor(row, None, _NoEncoding(tok), 4096, 0)
    assert torch.cat([m["token_ids"] for m in datum["message_log"]]).tolist() == ours.input_ids
