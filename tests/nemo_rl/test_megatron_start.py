"""A redone stage's final/ reaches the next stage on the Megatron backend.

NeMo-RL converts a Hugging Face starting model to Megatron once and reuses the conversion while the path it is
keyed by is the same (``validate_model_paths`` in nemo_rl/models/megatron/setup.py). That module needs
Megatron-Bridge, which does not install on a CPU, so its own function is taken from NeMo-RL's source text with
``ast`` (unchanged) and run here; only its path logic is involved.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from alia_nemo.config.compose import load_config
from alia_nemo.engines.nemo_rl_prepare import compile_stage
from tests.helpers import NEMO_RL_TINY, save_peaked_tiny_model

pytestmark = pytest.mark.nemo_rl


def nemo_rl_validate_model_paths():
    """NeMo-RL v0.7's ``validate_model_paths`` and the helpers it calls, from its source, unmodified."""
    import nemo_rl
    from nemo_rl.models.policy.utils import get_megatron_checkpoint_dir

    source = Path(nemo_rl.__file__).parent / "models" / "megatron" / "setup.py"
    wanted = {"validate_model_paths", "_get_hf_config_overrides_hash", "_canonicalize_hf_config_overrides",
              "_resolve_iter_dir_from_root"}  # fmt: skip
    tree = ast.parse(source.read_text())
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    assert {f.name for f in functions} == wanted
    namespace: dict[str, Any] = {"os": os, "json": json, "hashlib": hashlib, "Any": Any, "PolicyConfig": dict,
                                 "get_megatron_checkpoint_dir": get_megatron_checkpoint_dir}  # fmt: skip
    exec(compile(ast.Module(body=functions, type_ignores=[]), str(source), "exec"), namespace)
    return namespace["validate_model_paths"]


def _write_final(directory: Path, seed: int, tok) -> bytes:
    save_peaked_tiny_model(directory, seed=seed)
    tok.save_pretrained(str(directory))
    return (directory / "model.safetensors").read_bytes()


def test_a_rewritten_final_is_converted_again_and_an_unchanged_one_reused(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("NRL_MEGATRON_CHECKPOINT_DIR", str(tmp_path / "conversions"))
    validate = nemo_rl_validate_model_paths()
    final = tmp_path / "cpt" / "final"
    first = _write_final(final, seed=0, tok=tok)

    def compiled_policy() -> dict:
        cfg = load_config([f"recipe={NEMO_RL_TINY}", "engine.backend=megatron", f"model.pretrained={final}",
                           f"model.tokenizer={final}", f"run.output_dir={tmp_path / 'sft'}"])  # fmt: skip
        return compile_stage(cfg, progress=False).config["policy"]

    def convert(policy: dict) -> Path:
        """What NeMo-RL does at a worker's start: convert unless a conversion exists at the derived path."""
        name, path, exists = validate(policy)
        if not exists and not policy["megatron_cfg"]["force_reconvert_from_hf"]:
            (Path(path) / "iter_0000000").mkdir(parents=True)
            (Path(path) / "converted_from.bin").write_bytes((Path(name) / "model.safetensors").read_bytes())
        return Path(path)

    p1 = compiled_policy()
    assert p1["megatron_cfg"]["force_reconvert_from_hf"] is False  # resumes reuse the conversion
    c1 = convert(p1)
    assert (c1 / "converted_from.bin").read_bytes() == first
    assert validate(compiled_policy())[1:] == (str(c1), True)  # unchanged final/: the same conversion

    second = _write_final(final, seed=1, tok=tok)  # the stage redone: other weights at the same path
    assert second != first
    p2 = compiled_policy()
    c2 = convert(p2)
    assert c2 != c1 and (c2 / "converted_from.bin").read_bytes() == second  # the second final/ is what is used

    # Keyed by the final/ path itself (as compiled before), both weights map to one conversion directory:
    # NeMo-RL would have found the first conversion there and skipped the second weights.
    assert validate({**p1, "model_name": str(final)})[1] == validate({**p2, "model_name": str(final)})[1]


def test_a_final_not_written_yet_is_converted_at_every_start(tmp_path):
    later = tmp_path / "cpt160k" / "final"  # compiled before the earlier stage has run
    cfg = load_config([f"recipe={NEMO_RL_TINY}", "engine.backend=megatron", f"model.pretrained={later}",
                       f"model.tokenizer={later}", f"run.output_dir={tmp_path / 'sft'}"])  # fmt: skip
    policy = compile_stage(cfg, prepare=False, materialise=False).config["policy"]
    assert policy["model_name"] == str(later) and policy["megatron_cfg"]["force_reconvert_from_hf"] is True
