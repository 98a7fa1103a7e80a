"""NeMo-RL's own training loop, run for real: ``alia-nemo train engine=nemo_rl`` (interrupted, resumed, final/),
``alia-nemo submit``, ``alia-nemo pipeline`` with NeMo-RL stages, ``alia-nemo export`` of a NeMo-RL checkpoint,
the over-long count and the non-finite-loss stop.

Real NeMo-RL v0.7.0 (``setup()`` + ``sft_train()``, its DTensor v1 worker, its checkpoints and converter) on the
CPU harness (tests/nemo_rl/harness.sh), a Ray head advertising one GPU, alia_tiny in float32, a few steps each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import NEMO_RL_HARNESS as HARNESS
from tests.helpers import NEMO_RL_TINY as TINY
from tests.helpers import read_jsonl, save_nan_tiny_model

pytestmark = [pytest.mark.nemo_rl, pytest.mark.slow]
CLI = [sys.executable, "-m", "alia_nemo.cli"]
GBS = 16  # the tiny recipe's global batch: 282 conversations -> 17 steps per epoch, 2 epochs


def _cli(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def _kill_when(cmd: list[str], ready: Path, log: Path, timeout: int = 900) -> None:
    """Start ``cmd``; SIGKILL its whole process group as soon as ``ready`` exists (a finished checkpoint)."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while not ready.is_dir():
            assert proc.poll() is None, f"ended before {ready} appeared:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"{ready} did not appear in {timeout} s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _steps(checkpoints: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in checkpoints.glob("step_*"))


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def interrupted_train(ray_gpu_head, tmp_path_factory):
    """The tiny SFT recipe through NeMo-RL, killed after its first checkpoint, then rerun to the end."""
    run = tmp_path_factory.mktemp("nrl") / "sft"
    args = ["train", f"recipe={TINY}", *HARNESS, f"run.output_dir={run}", "run.save_every=3"]
    _kill_when([*CLI, *args], run / "checkpoints" / "step_3", run.parent / "first.log")
    killed_at = _steps(run / "checkpoints")[-1]
    info = json.loads((run / "checkpoints" / f"step_{killed_at}" / "training_info.json").read_text())
    assert not (run / "final").exists() and killed_at < 34  # really interrupted
    return run, killed_at, info, _cli(args)


def test_train_resumes_from_its_checkpoint_and_ends_with_a_final_hf_model(interrupted_train):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alia_nemo.model.chatml import CHAT_TEMPLATE

    run, killed_at, info, rerun = interrupted_train
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # Resumed at the saved step with the saved consumed-sample count, then ran to the end (2 epochs).
    assert f"resuming from {run / 'checkpoints' / f'step_{killed_at}'}" in rerun.stdout
    train = json.loads((run / "summary.json").read_text())["train"]
    assert train["resumed_from"] == f"step_{killed_at}" and train["start_step"] == killed_at
    assert train["start_consumed_samples"] == info["consumed_samples"] == killed_at * GBS
    assert train["global_step"] == 34 and train["consumed_samples"] == 34 * GBS
    # The loss NeMo-RL logged, every step once, falls.
    losses = {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}
    assert sorted(losses) == list(range(1, 35))
    assert sum(losses[s] for s in (32, 33, 34)) / 3 < sum(losses[s] for s in (1, 2, 3)) / 3 - 0.5
    assert (run / "loss.png").is_file() and "eval_loss" in train
    # final/: the newest checkpoint through NeMo-RL's converter, a Hugging Face directory with our template.
    final = run / "final"
    info = json.loads((final / "alia_export.json").read_text())
    assert (info["source"], info["step"]) == (str(run / "checkpoints" / "step_34"), 34)
    assert sorted(info["files"]) == sorted(p.name for p in final.iterdir())  # what export wrote, and only that
    assert (final / "model.safetensors").is_file() and not (final / "pytorch_model.bin").exists()
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template == CHAT_TEMPLATE
    assert json.loads((final / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "Hola"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1
    # The stage's RoPE and context (sft_tiny keeps the starting model's) and the card's stop tokens.
    config, start = _config(final), _config(run / "start_model")
    assert config["rope_parameters"] == start["rope_parameters"]
    assert config["max_position_embeddings"] == start["max_position_embeddings"]
    assert config["eos_token_id"] == [2, 5] and model.config.num_hidden_layers == 4


def test_rerun_of_a_finished_run_keeps_final(interrupted_train):
    run, *_ = interrupted_train
    before = (run / "final" / "model.safetensors").stat().st_mtime_ns
    summary = (run / "summary.json").read_text()
    again = _cli(["train", f"recipe={TINY}", *HARNESS, f"run.output_dir={run}", "run.save_every=3"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is a finished run (summary.json, final/): nothing to do" in again.stdout
    assert "done: 34 steps" in again.stdout
    assert (run / "summary.json").read_text() == summary  # nothing trained, nothing rewritten
    assert (run / "final" / "model.safetensors").stat().st_mtime_ns == before


def test_submit_wait_runs_nemo_rl_inside_a_ray_job(ray_gpu_head, tmp_path):
    """The job's runtime env and NeMo-RL's init_ray runtime env must merge (RAY_OVERRIDE_JOB_RUNTIME_ENV)."""
    out = tmp_path / "submitted"
    proc = _cli(["submit", "--address", ray_gpu_head, "--wait", f"recipe={TINY}", *HARNESS, "stage.max_steps=4",
                 "run.save_every=2", f"run.output_dir={out}"])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stderr
    assert _steps(out / "checkpoints") == [2, 4]
    assert (out / "final" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def nemo_rl_pipeline(ray_gpu_head, tmp_path_factory):
    """The tiny chain on NeMo-RL, killed once SFT has a checkpoint, then rerun."""
    run_dir = tmp_path_factory.mktemp("nrl_pipe") / "pipe"
    cmd = [*CLI, "pipeline", "recipe=alia-tiny-instruct-nemo-rl", f"run_dir={run_dir}"]
    _kill_when(cmd, run_dir / "sft" / "checkpoints" / "step_4", run_dir.parent / "first.log")
    before = json.loads((run_dir / "pipeline.json").read_text())
    return run_dir, before, subprocess.run(cmd, capture_output=True, text=True, timeout=1500)


def test_pipeline_hands_each_nemo_rl_stage_final_to_the_next_and_resumes(nemo_rl_pipeline):
    run_dir, before, rerun = nemo_rl_pipeline
    assert before["cpt32k"]["status"] == before["cpt160k"]["status"] == "finished"
    assert before["sft"]["status"] == "running" and "export" not in before
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "cpt32k finished earlier, skipped" in rerun.stdout and "resuming sft" in rerun.stdout
    after = json.loads((run_dir / "pipeline.json").read_text())
    assert after["cpt160k"]["started"] == before["cpt160k"]["started"]  # not run again
    assert after["sft"]["attempts"] == 2 and after["sft"]["resumed_from"] == "step_4"
    assert all(after[s]["status"] == "finished" for s in ("sft", "export", "eval"))
    # Each stage starts from the previous stage's final/, and NeMo-RL was given that directory.
    for stage, prev in (("cpt160k", "cpt32k"), ("sft", "cpt160k")):
        assert after[stage]["inputs"]["model"] == str(run_dir / prev / "final")
        compiled = (run_dir / stage / "nemo_rl_sft.yaml").read_text()
        assert f"model_name: {run_dir / prev / 'final'}" in compiled
    # Each final/ carries its stage's RoPE: 256 tokens at llama3 factor 2, then 1,024 at factor 8, which SFT
    # (RoPE "none") and the export inherit.
    expected = {"cpt32k": (256, 2.0), "cpt160k": (1024, 8.0), "sft": (1024, 8.0)}
    for stage, (context, factor) in expected.items():
        cfg = _config(run_dir / stage / "final")
        assert (cfg["max_position_embeddings"], cfg["rope_parameters"]["factor"]) == (context, factor), stage
        assert cfg["rope_parameters"]["rope_type"] == "llama3"
    export = _config(run_dir / "export")
    assert (export["max_position_embeddings"], export["rope_parameters"]["factor"]) == (1024, 8.0)
    # CPT 160k continued from trained weights, not from a random init (ln 1024 = 6.93).
    cpt32k = json.loads((run_dir / "cpt32k" / "summary.json").read_text())["train"]
    cpt160k = json.loads((run_dir / "cpt160k" / "summary.json").read_text())["train"]
    assert cpt32k["first_loss"] > 6.8 and cpt160k["first_loss"] < cpt32k["last_loss"] + 0.3
    assert json.loads((run_dir / "eval" / "niah.json").read_text())["trials"]


def _dcp_tensors(weights: Path) -> dict:
    """Every tensor of a DCP checkpoint, read with torch.distributed.checkpoint (no process group)."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(weights))
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if isinstance(m, TensorStorageMetadata)}  # fmt: skip
    load(state, storage_reader=reader, no_dist=True)
    return state


def test_export_of_a_nemo_rl_checkpoint_keeps_tensors_and_the_stages_rope(nemo_rl_pipeline, tmp_path):
    """CPT 160k's checkpoint (it changed RoPE from factor 2 to 8): converted by NeMo-RL's DCP converter."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run_dir, *_ = nemo_rl_pipeline
    checkpoints = run_dir / "cpt160k" / "checkpoints"
    out = tmp_path / "hf"
    proc = _cli(["export", "--from", str(checkpoints), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert AutoModelForCausalLM.from_pretrained(out).config.max_position_embeddings == 1024
    cfg = _config(out)
    assert cfg["rope_parameters"]["factor"] == 8.0 and cfg["max_position_embeddings"] == 1024
    # The starting model (cpt32k's final/) had factor 2 and 256: the overrides reached the converter.
    assert _config(run_dir / "cpt32k" / "final")["rope_parameters"]["factor"] == 2.0
    exported = load_file(out / "model.safetensors")
    # DTensor v1 saves {"model": state_dict}: DCP keys are the model's, under "model.".
    dcp = {k.removeprefix("model."): v for k, v in _dcp_tensors(checkpoints / "step_4" / "policy" / "weights").items()}
    assert set(exported) == set(dcp) and len(exported) == 39
    for name, tensor in exported.items():
        assert tensor.dtype == dcp[name].dtype and bool((tensor == dcp[name]).all()), name


def test_overlong_conversations_are_counted_exactly_with_dataloader_workers(ray_gpu_head, tmp_path):
    """Our processor masks conversations over max_input_seq_length in NeMo-RL's dataloader worker processes;
    the driver counts them as batches arrive. One whole epoch (global batch 141 = 282 / 2) and the whole
    validation set are consumed, so every row longer than the limit must be counted, and no other."""
    from alia_nemo.model.chatml import tokenize_conversation
    from alia_nemo.model.tokenizer import load_tokenizer
    from alia_nemo.nemo_rl.dataset import AliaSFTDataset

    limit, out = 48, tmp_path / "run"
    script = (
        "import json, sys\nfrom pathlib import Path\nfrom alia_nemo.config.compose import load_config\n"
        "from alia_nemo.engines.nemo_rl import train_compiled, write_run_config\n"
        "cfg = load_config(sys.argv[2:])\nout = Path(cfg.run.output_dir)\n_, config = write_run_config(cfg, out)\n"
        "config['data']['max_input_seq_length'] = int(sys.argv[1])\n"
        "print('REPORT', json.dumps(train_compiled(config, out)['data']['masked_overlong']))\n"
    )
    overrides = [f"recipe={TINY}", *HARNESS, "engine.dataloader_workers=2", "stage.epochs=1",
                 "stage.global_batch_size=141", "stage.micro_batch_size=47", f"run.output_dir={out}"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script, str(limit), *overrides], capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1].splitlines()[0])

    data_path = yaml.safe_load((out / "nemo_rl_sft.yaml").read_text())["data"]["train"]["data_path"]
    raw = AliaSFTDataset(data_path)
    tok = load_tokenizer(str(out / "start_model"))
    for split, rows in (("train", raw.dataset), ("validation", raw.val_dataset)):
        longer = {str(r["id"]) for r in rows if len(tokenize_conversation(tok, r["messages"]).input_ids) > limit}
        assert 0 < len(longer) < len(rows), split
        assert report[split]["conversations"] == len(longer) and set(report[split]["ids"]) == longer, split
    assert json.loads((out / "data_report.json").read_text())["masked_overlong"] == report


def test_a_run_whose_loss_goes_non_finite_fails_without_final(ray_gpu_head, tmp_path):
    # A starting model with a non-finite weight (stage.lr=inf and the like are refused by the schema).
    start = save_nan_tiny_model(tmp_path / "nan-start", with_tokenizer=True)
    out = tmp_path / "diverged"
    start_args = [f"model.pretrained={start}", f"model.tokenizer={start}", "stage.max_steps=6"]
    proc = _cli(["train", f"recipe={TINY}", *HARNESS, *start_args, f"run.output_dir={out}"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "failed: training loss became nan at step 1; stopped there and wrote no final/" in proc.stderr
    assert not (out / "final").exists()
    assert json.loads((out / "nonfinite.json").read_text())["step"] == 1
    again = _cli(["train", f"recipe={TINY}", *HARNESS, *start_args, f"run.output_dir={out}"])
    assert again.returncode == 2 and "is a run whose loss went non-finite" in again.stderr


def test_a_cluster_without_the_gpus_the_run_needs_is_refused_at_once(ray_gpu_head, tmp_path):
    proc = _cli(["train", f"recipe={TINY}", *HARNESS, "cluster.gpus_per_node=2", f"run.output_dir={tmp_path}"],
                timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert "the Ray cluster has 1 GPUs and this run needs 2" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
