"""The per-worker training loop, in-process (no Ray): batching, loss semantics, checkpoints."""

from __future__ import annotations

import pytest

from alia_nemo.config.compose import load_config
from alia_nemo.config.resolve import resolve
from alia_nemo.data.loading import prepare_sft
from alia_nemo.data.sources import load_for_training
from alia_nemo.engines.hf_training import SFTCollator, newest_complete_checkpoint, train_sft
from alia_nemo.model.export import current_umask
from tests.helpers import (
    plotted_curves,
    read_jsonl,
    save_peaked_tiny_model,
    token_and_sequence_means,
    uneven_overrides,
    write_uneven_conversations,
)


def test_collator_pads_inputs_and_ignores_padding_in_labels():
    batch = SFTCollator(pad_id=3)(
        [{"input_ids": [1, 7, 8], "labels": [-100, 7, 8]}, {"input_ids": [1, 9], "labels": [-100, 9]}]
    )
    assert batch["input_ids"].tolist() == [[1, 7, 8], [1, 9, 3]]
    assert batch["labels"].tolist() == [[-100, 7, 8], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_newest_complete_checkpoint_skips_partial_and_torn_saves(tmp_path):
    run, tmp_path = tmp_path, tmp_path / "checkpoints"  # checkpoint-N live in run/checkpoints
    import shutil

    import torch
    from transformers import LlamaForCausalLM

    from alia_nemo.model.architectures import get_spec

    good = tmp_path / "checkpoint-5"
    LlamaForCausalLM(get_spec("alia_tiny").hf_config(64)).save_pretrained(good)
    torch.save({"state": {}}, good / "optimizer.pt")
    torch.save({"last_epoch": 5}, good / "scheduler.pt")
    (good / "trainer_state.json").write_text('{"global_step": 5}')
    for step in (10, 15, 20):
        shutil.copytree(good, tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-15" / "optimizer.pt").unlink()  # a save killed before its optimizer
    weights = tmp_path / "checkpoint-20" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # torn: truncated weights
    assert newest_complete_checkpoint(tmp_path).name == "checkpoint-10"
    assert (tmp_path / "checkpoint-20").is_dir()  # only looked at
    assert newest_complete_checkpoint(tmp_path, move_aside=True).name == "checkpoint-10"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    moved = sorted(p.name.rsplit("-", 1)[0] for p in (run / "incomplete-checkpoints").iterdir())
    assert moved == ["checkpoint-15", "checkpoint-20"]
    assert newest_complete_checkpoint(tmp_path / "absent") is None


@pytest.fixture()
def uneven_setup(tmp_path, tok):
    model_dir = save_peaked_tiny_model(tmp_path / "peaked")
    data_file = write_uneven_conversations(tmp_path / "uneven.jsonl")
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    return model_dir, data_file, tok_dir


def test_loss_is_the_mean_over_trained_tokens_of_the_global_batch(tmp_path, tok, uneven_setup):
    model_dir, data_file, tok_dir = uneven_setup
    # One optimizer step whose global batch is all four conversations: 4 micro-batches of 1, accumulated.
    cfg = load_config([*uneven_overrides(model_dir, data_file, tmp_path / "run", 1), "run.save_every=1"])
    data = prepare_sft(cfg.data, tok, cfg.stage.seq_length, cfg.run.seed)
    stage = resolve(cfg, data.report)
    assert (stage.grad_accumulation, stage.steps) == (4, 1)
    token_mean, sequence_mean = token_and_sequence_means(model_dir, data.train)
    # The two averaging schemes differ by far more than the tolerance below, so the test discriminates.
    assert abs(token_mean - sequence_mean) > 20 * 1e-4 * token_mean

    metrics = train_sft(cfg, stage, data.train, data.val, tok_dir, tmp_path / "run", report_to=[])
    logged = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert logged[0]["step"] == 1
    assert logged[0]["loss"] == pytest.approx(token_mean, rel=1e-4)
    assert (metrics["global_step"], metrics["world_size"], metrics["grad_accumulation"]) == (1, 1, 4)


def test_schedule_clipping_and_steps(tmp_path, tok):
    cfg = load_config(
        [
            "stage.max_steps=12",
            "stage.warmup_steps=4",
            "stage.lr=0.01",
            "stage.lr_scheduler=cosine",
            "stage.grad_clip=0.5",
            "run.save_every=5",
            "run.keep_checkpoints=2",
            f"run.output_dir={tmp_path}",
        ]
    )
    data, stage = load_for_training(cfg, tok)
    tok.save_pretrained(tmp_path / "tok")
    metrics = train_sft(cfg, stage, data.train, data.val, tmp_path / "tok", tmp_path, report_to=[])
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "learning_rate" in r]
    lrs = {r["step"]: r["learning_rate"] for r in rows}
    assert lrs[1] == pytest.approx(0.0) and lrs[4] == pytest.approx(0.0075) and lrs[5] == pytest.approx(0.01)
    assert lrs[12] < lrs[8] < lrs[5]  # cosine decay after warmup
    assert metrics["global_step"] == 12
    # Saved every 5 steps and at the end, two newest kept.
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-12"]
    assert (tmp_path / "final" / "model.safetensors").is_file()
    # run.eval_every=auto: 12 steps validate every 2 (and at the end), and loss.png draws them as a curve.
    assert stage.eval_every == 2
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    evals = sorted({r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}.items())
    assert [step for step, _ in evals] == [2, 4, 6, 8, 10, 12] and evals[-1][1] < evals[0][1]
    curves = plotted_curves(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert curves["validation"] == evals and len(curves["train"]) == 12
    # final/ is readable like any new file (safetensors alone would leave model.safetensors 0600).
    expected = 0o666 & ~current_umask()
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "final").iterdir()} == {
        p.name: oct(expected) for p in (tmp_path / "final").iterdir()
    }
