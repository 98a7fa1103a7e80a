"""The tiny pipeline end to end on CPU: interrupted mid-stage, rerun, finished stages skipped, the
interrupted one resumed from its checkpoint; changed configs refused; --from and --only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alia_nemo.errors import ConfigError
from alia_nemo.launch.pipeline import Pipeline, load_pipeline

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "alia_nemo.cli", "pipeline", "recipe=alia-tiny-instruct"]


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "pipeline.json").read_text())


def test_interrupted_pipeline_resumes_and_skips_finished_stages(tmp_path):
    run_dir = tmp_path / "pipe"
    first = subprocess.Popen([*CLI, f"run_dir={run_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
    ckpt = run_dir / "sft" / "checkpoints" / "checkpoint-4"
    deadline = time.time() + 600
    while time.time() < deadline and not ckpt.is_dir():
        assert first.poll() is None, "pipeline ended before the SFT stage checkpointed"
        time.sleep(0.5)
    time.sleep(1)  # let the checkpoint finish writing (the engine only resumes from complete ones)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = _state(run_dir)
    assert before["cpt32k"]["status"] == before["cpt160k"]["status"] == "finished"
    assert before["sft"]["status"] == "running" and "export" not in before

    rerun = subprocess.run([*CLI, f"run_dir={run_dir}"], capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "cpt32k finished earlier, skipped" in rerun.stdout and "cpt160k finished earlier, skipped" in rerun.stdout
    assert "resuming sft" in rerun.stdout
    after = _state(run_dir)
    for stage in ("cpt32k", "cpt160k"):
        assert after[stage]["started"] == before[stage]["started"]  # not run again
    assert after["sft"]["attempts"] == 2 and after["sft"]["resumed_from"].startswith("checkpoint-")
    assert all(after[s]["status"] == "finished" for s in ("sft", "export", "eval"))
    # The hand-off: each stage started from the previous stage's final model.
    assert after["cpt160k"]["inputs"]["model"] == str(run_dir / "cpt32k" / "final")
    assert after["sft"]["inputs"]["model"] == str(run_dir / "cpt160k" / "final")
    export_cfg = json.loads((run_dir / "export" / "config.json").read_text())
    assert export_cfg["max_position_embeddings"] == 1024 and export_cfg["rope_parameters"]["factor"] == 8.0
    niah = json.loads((run_dir / "eval" / "niah.json").read_text())
    assert len(niah["trials"]) == 6 and (run_dir / "eval" / "niah.png").is_file()

    # A finished stage whose configuration changed stops the run instead of mixing outputs.
    pipe = Pipeline(load_pipeline("alia-tiny-instruct"), run_dir)
    pipe.state["cpt160k"]["hash"] = "0" * 64
    with pytest.raises(ConfigError, match=r"step cpt160k finished with another configuration.*--from cpt160k"):
        pipe.run(log=lambda *_: None)
    # --only reruns one step and marks what was built on it stale.
    pipe = Pipeline(load_pipeline("alia-tiny-instruct"), run_dir)
    pipe.run(only="eval", log=lambda *_: None)
    assert _state(run_dir)["eval"]["attempts"] == 2
    with pytest.raises(ConfigError, match="--from nope: not a step"):
        pipe.run(from_step="nope")


def test_pipeline_files_validate():
    spec = load_pipeline("alia-40b-instruct")
    assert list(spec.stages) == ["cpt32k", "cpt160k", "sft"] and spec.export.from_ == "sft"
    assert spec.stages["sft"].from_ == "cpt160k" and 163840 in spec.eval.niah.lengths
    pipe = Pipeline(spec, Path("/tmp/unused"))
    cfg, digest, inputs = pipe.plan("cpt160k")
    assert cfg.stage.name == "cpt_160k" and cfg.model.pretrained == "/tmp/unused/cpt32k/final"
    assert len(digest) == 64 and inputs["data"] == "long_context"
    with pytest.raises(ConfigError, match="unknown pipeline"):
        load_pipeline("nope")
