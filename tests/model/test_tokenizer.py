"""Tokenizers: ALIA's special-token layout, the built-in test tokenizer, offline-safe loading."""

from __future__ import annotations

import re

import pytest

from alia_nemo.model.tokenizer import (
    SPECIAL_TOKENS,
    TokenizerError,
    build_test_tokenizer,
    check_layout,
    load_pretrained_tokenizer,
    load_tokenizer,
)


def test_test_tokenizer_layout(tok):
    assert len(tok) == 1024
    assert tok.convert_ids_to_tokens(list(range(6))) == list(SPECIAL_TOKENS)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 3, 0)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [4, 5]


def test_test_tokenizer_behaves_like_alia(tok):
    # Plain encoding prepends <s> (add_bos_token), digits are split, unseen characters fall back to bytes.
    assert tok("Hola")["input_ids"][0] == 1
    digits = tok("12345", add_special_tokens=False)["input_ids"]
    assert [t for t in tok.convert_ids_to_tokens(digits) if t != "▁"] == ["1", "2", "3", "4", "5"]
    ids = tok("雪 ☃", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "雪 ☃" and 0 not in ids
    assert tok.decode(tok("a\nb", add_special_tokens=False)["input_ids"]) == "a\nb"  # newlines survive


def test_test_tokenizer_is_deterministic(tmp_path):
    a = build_test_tokenizer(tmp_path / "a")
    b = build_test_tokenizer(tmp_path / "b")
    assert a.get_vocab() == b.get_vocab()
    assert build_test_tokenizer(tmp_path / "a").get_vocab() == a.get_vocab()  # cached copy


def test_load_from_local_directory_installs_chatml(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ 'other template' }}")
    loaded = load_pretrained_tokenizer(str(tmp_path))
    assert (
        loaded.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        == "<s><|im_start|>user\nx<|im_end|>"
    )


def test_missing_hub_id_offline_is_a_clear_error():
    with pytest.raises(
        TokenizerError,
        match=r"'BSC-LT/not-a-model' is neither a local directory nor in the Hugging Face cache.*hf download",
    ):
        load_tokenizer("BSC-LT/not-a-model", allow_download=True)  # HF_HUB_OFFLINE=1 in tests wins


def test_wrong_layout_is_rejected():
    class Fake:
        def convert_ids_to_tokens(self, ids):
            return ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]

    with pytest.raises(TokenizerError, match="expected ALIA's"):
        check_layout(Fake())


@pytest.mark.parametrize("shape", ["abs", "./toks/alia", "../alia", "~/alia-tok", "scratch/me/alia", "a-file", "empty"])
def test_local_tokenizer_path_that_does_not_hold_one_is_named(shape, tmp_path, monkeypatch):
    """A missing local tokenizer path used to go to the hub lookup ("not in the Hugging Face cache", hf download):
    now the error names the setting, the path and the fix."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    value = {"abs": str(tmp_path / "gone"), "a-file": "a-file", "empty": "empty"}.get(shape, shape)
    why = "does not exist"
    if shape == "a-file":
        (tmp_path / "a-file").write_text("{}")
        why = "is a file, not a directory"
    if shape == "empty":
        (tmp_path / "empty").mkdir()
        why = "has none of tokenizer.json, tokenizer_config.json, tokenizer.model"
    with pytest.raises(TokenizerError, match=rf"^model.tokenizer={re.escape(value)}: the local path .* {why}; set"):
        load_tokenizer(value, allow_download=True)
    with pytest.raises(TokenizerError, match=rf"^--tokenizer={re.escape(value)}: the local path"):
        load_tokenizer(value, key="--tokenizer")


def test_export_names_a_missing_tokenizer_path(tmp_path, capsys):
    from alia_nemo.cli import main
    from tests.helpers import save_peaked_tiny_model

    save_peaked_tiny_model(tmp_path / "run" / "final")  # no tokenizer in it: --tokenizer is needed
    assert main(["export", "--from", str(tmp_path / "run"), "--out", str(tmp_path / "hf"),
                 "--tokenizer", str(tmp_path / "tok")]) == 2  # fmt: skip
    tok = tmp_path / "tok"
    assert f"alia-nemo export: error: --tokenizer={tok}: the local path {tok} does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written, no staging left
