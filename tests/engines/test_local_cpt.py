"""Both CPT stages and the hand-off on the local engine: 32k-role -> 160k-role -> SFT, alia_tiny on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alia_nemo.config.compose import load_config
from alia_nemo.engines.local import run_local
from tests.helpers import read_jsonl

pytestmark = pytest.mark.slow


def _config(path: Path) -> dict:
    return json.loads((path / "final" / "config.json").read_text())


def test_cpt_32k_then_160k_then_sft_hand_off(tmp_path):
    cpt32, cpt160, sft = tmp_path / "cpt32", tmp_path / "cpt160", tmp_path / "sft"
    first = run_local(load_config(["stage=cpt_32k_tiny", "data=cpt_sample", f"run.output_dir={cpt32}"]))
    assert first["train"]["global_step"] == 10  # 40,960 tokens / (16 windows x 256)
    losses = [r["loss"] for r in read_jsonl(cpt32 / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0] - 0.5
    c32 = _config(cpt32)
    assert c32["max_position_embeddings"] == 256
    assert c32["rope_parameters"]["rope_type"] == "llama3" and c32["rope_parameters"]["factor"] == 2.0

    second = run_local(load_config([
        "stage=cpt_160k_tiny", "data=cpt_sample", f"model.pretrained={cpt32 / 'final'}",
        f"model.tokenizer={cpt32 / 'final'}", f"run.output_dir={cpt160}",
    ]))  # fmt: skip
    assert second["train"]["global_step"] == 4  # 32,768 tokens / (8 windows x 1,024)
    c160 = _config(cpt160)
    assert c160["max_position_embeddings"] == 1024 and c160["rope_parameters"]["factor"] == 8.0
    # It started from the 32k output, not from scratch: its first loss is the 32k stage's level, far
    # below a random init's ~ln(1024) = 6.93.
    first_160 = next(r["loss"] for r in read_jsonl(cpt160 / "metrics.jsonl") if "loss" in r)
    assert first_160 < 6.3

    run_local(load_config([
        f"model.pretrained={cpt160 / 'final'}", f"model.tokenizer={cpt160 / 'final'}", f"run.output_dir={sft}",
        "stage.epochs=1",
    ]))  # fmt: skip
    csft = _config(sft)
    assert csft["max_position_embeddings"] == 1024 and csft["rope_parameters"] == c160["rope_parameters"]
    report = json.loads((cpt160 / "data_report.json").read_text())
    assert report["packing"]["real_token_fraction"] == 1.0 and report["train"] == 32
