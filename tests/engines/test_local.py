"""The local engine end to end on a real (in-process) Ray: default job, two workers, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alia_nemo.config.compose import load_config
from alia_nemo.config.resolve import resolve
from alia_nemo.data.loading import prepare_sft
from alia_nemo.engines.local import run_local
from tests.helpers import (
    plotted_curves,
    read_jsonl,
    save_peaked_tiny_model,
    token_and_sequence_means,
    uneven_overrides,
    write_uneven_conversations,
)

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "alia_nemo.cli"]


def _losses(metrics: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(metrics) if "loss" in r]


def test_default_job_trains_loss_falls_and_final_model_chats(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([*CLI, "train", f"run.output_dir={out}"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "final model:" in proc.stdout and "(first step) ->" in proc.stdout

    losses = _losses(out / "metrics.jsonl")
    first, last = losses[0][1], sum(v for _, v in losses[-10:]) / 10
    assert first > 6.0 and last < 2.5 and last < first / 2.5, (first, last)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["global_step"] == 12 * 17  # 12 epochs x 282 // 16 whole global batches (resolve)
    assert summary["resolved"]["steps"] == 12 * 17 and summary["resolved"]["train_rows"] == 282
    # The sample went through the mixture pipeline: 47 per language for training, 3 held out.
    assert summary["data"]["train"] == 282 and summary["data"]["val"] == 18 and summary["data"]["dropped"] == 0
    assert (Path(summary["data"]["prepared"]) / "manifest.json").is_file()
    assert summary["train"]["eval_loss"] < first
    for artefact in (
        "config.yaml",
        "data_report.json",
        "loss.png",
        "final/config.json",
        "final/model.safetensors",
        "final/tokenizer_config.json",
        "final/generation_config.json",
    ):
        assert (out / artefact).is_file(), artefact
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # run.eval_every=auto: validation every 21 steps and at the end, spread over the run, drawn as a curve.
    evals = sorted({r["step"]: r["eval_loss"] for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r}.items())
    assert [step for step, _ in evals] == [*range(21, 204, 21), 204] and summary["resolved"]["eval_every"] == 21
    assert evals[-1][1] < evals[0][1] and evals[-1][1] == pytest.approx(summary["train"]["eval_loss"])
    assert plotted_curves(out / "metrics.jsonl", tmp_path / "replot.png")["validation"] == evals

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.max_position_embeddings == 4096
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Quin dia ve després de dilluns?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert prompt["input_ids"][0].tolist().count(1) == 1
    generated = model.generate(**prompt, max_new_tokens=48, do_sample=False)[0, prompt["input_ids"].shape[1] :].tolist()
    assert generated[-1] == 5, tok.decode(generated)  # stopped on <|im_end|> by itself
    assert tok.decode(generated, skip_special_tokens=True).strip()


def test_two_workers_average_loss_over_all_trained_tokens(tmp_path, tok):
    model_dir = save_peaked_tiny_model(tmp_path / "peaked")
    data_file = write_uneven_conversations(tmp_path / "uneven.jsonl")
    cfg = load_config(["recipe=sft-alia-tiny-1n0g-dp2", *uneven_overrides(model_dir, data_file, tmp_path / "run", 2)])
    assert (cfg.engine.num_workers, resolve(cfg).grad_accumulation) == (2, 2)
    token_mean, sequence_mean = token_and_sequence_means(model_dir, prepare_sft(cfg.data, tok, 256, 0).train)
    assert abs(token_mean - sequence_mean) > 20 * 1e-4 * token_mean

    summary = run_local(cfg)
    assert (summary["train"]["world_size"], summary["train"]["global_step"]) == (2, 2)
    step1 = _losses(tmp_path / "run" / "metrics.jsonl")[0]
    assert step1[0] == 1 and step1[1] == pytest.approx(token_mean, rel=1e-4)


def test_interrupted_run_resumes_from_its_newest_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [*CLI, "train", f"run.output_dir={out}", "run.save_every=20", "stage.epochs=4"]  # 68 steps (4 x 282 // 16)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "checkpoint-20" / "trainer_state.json").is_file():
            assert proc.poll() is None and time.time() < deadline, "training ended or stalled before checkpoint-20"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session: driver, Ray and its workers
        proc.wait()
    assert not (out / "final").exists()  # it really was interrupted
    from alia_nemo.engines.hf_training import newest_complete_checkpoint

    resume_step = int(newest_complete_checkpoint(out / "checkpoints").name.split("-")[1])
    assert 20 <= resume_step < 68

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    result = json.loads((out / "train_result.json").read_text())
    assert result["resumed_from"] == f"checkpoint-{resume_step}" and result["global_step"] == 68
    rows = read_jsonl(out / "metrics.jsonl")
    begins = [i for i, r in enumerate(rows) if r.get("event") == "train_begin"]
    assert [rows[i]["step"] for i in begins] == [0, resume_step]
    resumed_steps = [r["step"] for r in rows[begins[1] :] if "loss" in r]
    assert resumed_steps[0] == resume_step + 1 and resumed_steps[-1] == 68
    assert resumed_steps == list(range(resume_step + 1, 69))


@pytest.mark.parametrize(("arch", "fits"), [("alia_tiny", True), ("alia_2b", False), ("alia_40b", False)])
def test_cpu_run_refuses_models_that_cannot_fit(arch, fits):
    from alia_nemo.engines.local import check_fits_in_memory
    from alia_nemo.errors import ConfigError

    cfg = load_config([f"model={arch}"])
    if fits:
        check_fits_in_memory(cfg, available_bytes=24 * 2**30)
    else:
        with pytest.raises(ConfigError, match=rf"model.arch={arch} needs about \d+ GiB.*model=alia_tiny"):
            check_fits_in_memory(cfg, available_bytes=24 * 2**30)
    check_fits_in_memory(load_config([f"model={arch}", "engine.use_gpu=true"]), available_bytes=1)


def test_runs_on_an_existing_ray_cluster(tmp_path, monkeypatch):
    import socket
    import tempfile

    # Token authentication for the head and this driver alike, from Ray's default token file (the one an
    # embedded Ray of an earlier test in this process uses too); without it the outcome depended on test order.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    if not (Path.home() / ".ray" / "auth_token").is_file():
        subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"], check=True,
                       capture_output=True)  # fmt: skip

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp_dir}", "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(60):
            probe = subprocess.run([ray_bin, "status", f"--address=127.0.0.1:{port}"], capture_output=True, timeout=30)
            if probe.returncode == 0:
                break
            assert head.poll() is None, "ray head exited"
            time.sleep(1)
        cfg = load_config([f"engine.ray_address=127.0.0.1:{port}", "stage.max_steps=3", f"run.output_dir={tmp_path}"])
        summary = run_local(cfg)
        assert summary["ray_cluster"].endswith(f":{port}")
        assert summary["train"]["global_step"] == 3 and (tmp_path / "final" / "model.safetensors").is_file()
        # The cluster outlives the run: only the driver disconnected.
        assert head.poll() is None
        assert subprocess.run([ray_bin, "status", f"--address=127.0.0.1:{port}"], capture_output=True).returncode == 0
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
