"""`alia-nemo export`: a finished stage as a Hugging Face directory transformers (and vLLM) load as is."""

from __future__ import annotations

import json

import pytest
import torch

from alia_nemo.chatml import CHAT_TEMPLATE, render
from alia_nemo.cli import main
from alia_nemo.config_schema import ConfigError
from alia_nemo.export import export


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
    with pytest.raises(ConfigError, match="neither a run directory with final/"):
        export(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no safetensors weights"):
        export(tmp_path, tmp_path / "out")


def test_nemo_rl_checkpoints_use_nemo_rls_converters(tmp_path):
    import sys

    from alia_nemo.export import converter_command, nemo_rl_checkpoint

    for step in (5, 10):
        (tmp_path / "ckpts" / f"step_{step}" / "policy" / "weights").mkdir(parents=True)
    weights = nemo_rl_checkpoint(tmp_path / "ckpts")
    assert weights == tmp_path / "ckpts" / "step_10" / "policy" / "weights"  # the newest step
    dcp = converter_command(weights, tmp_path / "hf", tmp_path / "conv")
    assert dcp == [sys.executable, str(tmp_path / "conv" / "convert_dcp_to_hf.py"), "--config",
                   str(tmp_path / "ckpts" / "step_10" / "config.yaml"), "--dcp-ckpt-path", str(weights),
                   "--hf-ckpt-path", str(tmp_path / "hf")]  # fmt: skip
    (weights / "iter_0000010").mkdir()
    assert "convert_megatron_to_hf.py" in converter_command(weights, tmp_path / "hf", tmp_path / "conv")[1]
    assert "--megatron-ckpt-path" in converter_command(weights, tmp_path / "hf", tmp_path / "conv")
