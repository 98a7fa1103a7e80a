"""`alia-nemo export`: a finished stage as a Hugging Face directory transformers (and vLLM) load as is."""

from __future__ import annotations

import json

import pytest
import torch

from alia_nemo.cli import main
from alia_nemo.errors import ConfigError
from alia_nemo.model.chatml import CHAT_TEMPLATE, render
from alia_nemo.model.export import export


@pytest.fixture(scope="module")
def finished_stage(tmp_path_factory, tok):
    """A local-engine-shaped run directory: final/ with weights, config and tokenizer."""
    from tests.helpers import save_peaked_tiny_model

    run = tmp_path_factory.mktemp("run")
    save_peaked_tiny_model(run / "final")
    tok.save_pretrained(str(run / "final"))
    return run


def test_export_loads_renders_our_template_and_stops_at_im_end(finished_stage, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    out = tmp_path / "hf"
    assert main(["export", "--from", str(finished_stage), "--out", str(out)]) == 0
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}  # fmt: skip
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 5] and gen["temperature"] == 0.1 and gen["repetition_penalty"] == 1.0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    msgs = [{"role": "system", "content": "Sigues breu."}, {"role": "user", "content": "Hola!"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == render(msgs, tok.bos_token, add_generation_prompt=True)
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert ids["input_ids"][0].tolist().count(tok.bos_token_id) == 1

    class ImEndAtThird(LogitsProcessor):  # the model "answers" two tokens, then closes its turn
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - ids["input_ids"].shape[1] == 2:
                scores[:] = -1e9
                scores[:, tok.convert_tokens_to_ids("<|im_end|>")] = 0
            return scores

    with torch.no_grad():
        out_ids = model.generate(
            **ids, max_new_tokens=20, do_sample=False, logits_processor=LogitsProcessorList([ImEndAtThird()])
        )
    new = out_ids[0, ids["input_ids"].shape[1] :].tolist()
    assert len(new) == 3 and new[-1] == 5  # generation stopped on <|im_end|>, 17 tokens short of the limit


def test_export_errors_name_the_problem(tmp_path):
    src = tmp_path / "src"
    with pytest.raises(ConfigError, match="src does not exist"):
        export(src, tmp_path / "out")
    src.mkdir()
    with pytest.raises(ConfigError, match="neither a run directory with final/"):
        export(src, tmp_path / "out")
    (src / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no safetensors weights"):
        export(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no out, no staging left behind


def test_nemo_rl_checkpoints_use_nemo_rls_converters(tmp_path):
    """The converter command lines: DCP in this Python, Megatron in the image's Megatron worker venv on the
    newest iter_* directory, both with a config whose policy.hf_overrides carries our RoPE overrides."""
    import re
    import sys

    import yaml

    from alia_nemo.model.export import (
        MEGATRON_WORKER,
        converter_command,
        converter_config,
        converter_python,
        nemo_rl_checkpoint,
    )

    ckpts = tmp_path / "run" / "checkpoints"
    for step in (5, 10):
        (ckpts / f"step_{step}" / "policy" / "weights").mkdir(parents=True)
    weights = nemo_rl_checkpoint(ckpts)
    assert weights == ckpts / "step_10" / "policy" / "weights"  # the newest step
    assert nemo_rl_checkpoint(tmp_path / "run") == weights  # a run directory: its checkpoints/ is looked into
    assert nemo_rl_checkpoint(tmp_path / "nothing") is None
    cfg = tmp_path / "conv.yaml"
    dcp = converter_command(weights, cfg, tmp_path / "hf", tmp_path / "conv", converter_python(False))
    assert dcp == [sys.executable, str(tmp_path / "conv" / "convert_dcp_to_hf.py"), "--config", str(cfg),
                   "--dcp-ckpt-path", str(weights), "--hf-ckpt-path", str(tmp_path / "hf")]  # fmt: skip

    for it in ("iter_0000000", "iter_0000010"):
        (weights / it).mkdir()
    venvs = tmp_path / "ray_venvs"
    with pytest.raises(ConfigError, match=r"Megatron worker venv.*NEMO_RL_VENV_DIR"):
        converter_python(True, {"NEMO_RL_VENV_DIR": str(venvs)})
    (venvs / MEGATRON_WORKER / "bin").mkdir(parents=True)
    (venvs / MEGATRON_WORKER / "bin" / "python").touch()
    python = converter_python(True, {"NEMO_RL_VENV_DIR": str(venvs)})
    assert python == str(venvs / MEGATRON_WORKER / "bin" / "python")
    with pytest.raises(ConfigError, match=re.escape(f"/opt/ray_venvs/{MEGATRON_WORKER}/bin/python does not exist")):
        converter_python(True, {})  # the image's location when NEMO_RL_VENV_DIR is unset
    mcore = converter_command(weights, cfg, tmp_path / "hf", tmp_path / "conv", python)
    assert mcore == [python, str(tmp_path / "conv" / "convert_megatron_to_hf.py"), "--config", str(cfg),
                     "--megatron-ckpt-path", str(weights / "iter_0000010"),
                     "--hf-ckpt-path", str(tmp_path / "hf")]  # fmt: skip

    # The converters read policy.hf_overrides; training reads policy.hf_config_overrides (what we compile).
    rope = {"max_position_embeddings": 32768, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}
    step_cfg = ckpts / "step_10" / "config.yaml"
    step_cfg.write_text(yaml.safe_dump({"policy": {"model_name": "m", "hf_config_overrides": rope}}))
    copy = yaml.safe_load(converter_config(step_cfg, tmp_path / "copy.yaml").read_text())
    assert copy["policy"]["hf_overrides"] == rope and copy["policy"]["hf_config_overrides"] == rope
    assert "hf_overrides" not in yaml.safe_load(step_cfg.read_text())["policy"]  # the checkpoint is untouched


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_every_exported_file_is_readable_as_the_umask_allows(finished_stage, tmp_path, umask, mode):
    """safetensors 0.8 writes model.safetensors 0600 (a temporary file renamed into place) and copy2 kept that: a
    serving account could read the export's config but not its weights. Now every file gets ``0o666 & ~umask``."""
    import os
    import stat

    old = os.umask(umask)
    try:
        out = export(finished_stage, tmp_path / "hf")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and "config.json" in modes and "tokenizer.json" in modes
    assert modes == dict.fromkeys(modes, mode), {name: oct(m) for name, m in modes.items()}
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # the directory, not mkdtemp's 0700 staging
