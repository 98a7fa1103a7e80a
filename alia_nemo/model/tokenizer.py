"""Tokenizers: the real ALIA tokenizer (local path or hub id, offline-safe) and a small test tokenizer.

Both carry ALIA's special-token layout (ids 0..5: ``<unk> <s> </s> <pad> <|im_start|> <|im_end|>``)
and our ChatML template.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from alia_nemo.errors import AliaError
from alia_nemo.model.chatml import CHAT_TEMPLATE, IM_END, IM_START

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IM_START, IM_END)
TEST_TOKENIZER = "builtin:test"
TEST_VOCAB_SIZE = 1024
TEST_TOKENIZER_RECIPE = "spm-bpe-bytefallback-bos-v2"  # bump when the build below changes


class TokenizerError(AliaError, RuntimeError):
    """A tokenizer that can not be loaded or does not have ALIA's layout."""


def check_layout(tokenizer) -> None:
    """Raise unless ids 0..5 are ALIA's special tokens (a wrong tokenizer would train silently wrong)."""
    got = tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS))))
    if tuple(got) != SPECIAL_TOKENS:
        raise TokenizerError(f"tokenizer ids 0..5 are {got}, expected ALIA's {list(SPECIAL_TOKENS)}")


def with_chatml(tokenizer):
    """Install the ChatML template and make <|im_start|>/<|im_end|> special tokens (skipped when decoding)."""
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.pad_token = "<pad>"
    check_layout(tokenizer)
    return tokenizer


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def load_pretrained_tokenizer(name_or_path: str, allow_download: bool = False, key: str = "model.tokenizer"):
    """Load the ALIA tokenizer from a local directory or a hub id already in the local cache.

    Compute nodes are often offline, so the hub is only contacted when ``allow_download`` is set and
    ``HF_HUB_OFFLINE`` is not. A local path (see :func:`alia_nemo.model.hub_cache.is_local_path`) that is not a
    tokenizer directory raises TokenizerError naming ``key`` (the setting it came from) and the path.
    """
    from transformers import AutoTokenizer

    from alia_nemo.model.hub_cache import is_local_path, local_path_problem

    if is_local_path(name_or_path):
        problem = local_path_problem(key, name_or_path, "tokenizer")
        if problem:
            raise TokenizerError(problem)
        return with_chatml(AutoTokenizer.from_pretrained(str(Path(name_or_path).expanduser())))
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except OSError as exc:
        if not allow_download or _offline():
            raise TokenizerError(
                f"tokenizer {name_or_path!r} is neither a local directory nor in the Hugging Face cache "
                f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}). Download it where there is network, "
                f"e.g. `hf download {name_or_path} --include 'tokenizer*' 'special_tokens_map.json'`, "
                f"or set {key} to a local directory."
            ) from exc
        tok = AutoTokenizer.from_pretrained(name_or_path)
    return with_chatml(tok)


def sample_texts() -> list[str]:
    """All message texts of the bundled SFT sample (what the test tokenizer is trained on)."""
    from alia_nemo.sample_data import sample_path

    texts = []
    with open(sample_path()) as f:
        for line in f:
            texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts


def train_test_spm(texts: Iterable[str], vocab_size: int = TEST_VOCAB_SIZE) -> bytes:
    """Train a SentencePiece BPE model the way ALIA's was built (byte fallback, split digits), in memory."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        pad_piece="<pad>",
        user_defined_symbols=[IM_START, IM_END],
        # Keep text as written: no NFKC, newlines survive (they fall back to the <0x0A> byte).
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def build_test_tokenizer(cache_dir: str | os.PathLike | None = None, vocab_size: int = TEST_VOCAB_SIZE):
    """A 1,024-piece tokenizer with ALIA's special-token layout, trained on the bundled sample text.

    Built once per content hash and cached as a transformers directory, so every process (and every
    Ray worker) gets the identical tokenizer.
    """
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    texts = sample_texts()
    key = hashlib.sha256(
        ("\n".join(texts) + f"|{vocab_size}|{TEST_TOKENIZER_RECIPE}|{CHAT_TEMPLATE}").encode()
    ).hexdigest()[:16]
    root = Path(cache_dir or os.environ.get("ALIA_NEMO_CACHE", Path.home() / ".cache" / "alia_nemo"))
    target = root / "tokenizers" / f"test-{key}"
    if not (target / "tokenizer_config.json").exists():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "tokenizer.model").write_bytes(train_test_spm(texts, vocab_size))
        tok = with_chatml(AutoTokenizer.from_pretrained(str(tmp)))
        # Like ALIA's tokenizer (add_bos_token: true), plain encoding prepends <s>; chat paths don't.
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
        tok.save_pretrained(str(tmp))
        (tmp / "tokenizer.model").unlink()  # the fast tokenizer.json is the artefact
        try:
            os.replace(tmp, target)  # atomic: concurrent builders race harmlessly
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return with_chatml(AutoTokenizer.from_pretrained(str(target)))


def load_tokenizer(spec: str, allow_download: bool = False, key: str = "model.tokenizer"):
    """Load ``builtin:test`` (the test tokenizer) or a pretrained ALIA tokenizer by path or hub id.

    ``key`` names the setting ``spec`` came from, for the error when it is a local path that does not work.
    """
    if spec == TEST_TOKENIZER:
        return build_test_tokenizer()
    return load_pretrained_tokenizer(spec, allow_download=allow_download, key=key)
