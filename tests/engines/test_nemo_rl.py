"""The NeMo-RL engine's own pieces around NeMo-RL's loop (no NeMo-RL needed): the metrics backend that stops at
a non-finite loss, and the driver-side count of rows trained with zero loss. tests/nemo_rl/test_training.py runs
them inside NeMo-RL's real loop."""

from __future__ import annotations

import math

import pytest
import torch

from alia_nemo.engines import TrainingError
from alia_nemo.engines.nemo_rl import MaskedRows, MetricsRecorder, masked_report
from tests.helpers import read_jsonl


def test_metrics_recorder_writes_our_rows_and_stops_at_a_non_finite_loss(tmp_path):
    rec = MetricsRecorder(tmp_path / "metrics.jsonl")
    rec.log_metrics({"loss": torch.tensor(2.5), "grad_norm": 1.0, "lr": 1e-3, "global_valid_toks": 512}, 1, "train")
    rec.log_metrics({"val_loss": torch.tensor(2.0)}, 1, "validation")
    rec.log_metrics({"total_step_time": 0.3}, 1, "timing/train")  # not ours: ignored
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 2.5, "grad_norm": 1.0, "learning_rate": 1e-3, "tokens": 512.0},
        {"step": 1, "eval_loss": 2.0},
    ]
    with pytest.raises(TrainingError, match="training loss became nan at step 2; stopped there and wrote no final/"):
        rec.log_metrics({"loss": float("nan")}, 2, "train")
    with pytest.raises(TrainingError, match="validation loss became inf at step 3"):
        rec.log_metrics({"val_loss": math.inf}, 3, "validation")
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 1, 2, 3]  # recorded, then stopped


class _Loader:
    """Batches shaped like NeMo-RL's rl_collate_fn output, plus the StatefulDataLoader calls sft_train makes."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)

    def state_dict(self):
        return {"seen": len(self.batches)}


def test_masked_rows_are_recorded_where_batches_are_consumed(tmp_path):
    rows = [{"id": f"c{i}"} for i in range(6)]
    batches = [
        {"idx": [0, 1, 2], "loss_multiplier": torch.tensor([1.0, 0.0, 1.0])},
        {"idx": [3, 4, 5], "loss_multiplier": torch.tensor([0.0, 0.0, 1.0])},
    ]
    path = tmp_path / "masked.jsonl"
    train = MaskedRows(_Loader(batches), "train", rows, path)
    assert len(train) == 2 and train.state_dict() == {"seen": 2}  # the rest is the wrapped loader's
    assert list(train) == batches
    list(train)  # a second epoch sees the same rows again: counted once
    val = MaskedRows(_Loader([{"idx": [0, 1], "loss_multiplier": torch.tensor([0.0, 1.0])}]), "validation",
                     [{"id": "v0"}, {"id": "v1"}], path)  # fmt: skip
    list(val)
    assert masked_report(path) == {
        "train": {"conversations": 3, "ids": ["c1", "c3", "c4"]},
        "validation": {"conversations": 1, "ids": ["v0"]},
    }
    assert masked_report(tmp_path / "none.jsonl") == {
        "train": {"conversations": 0, "ids": []}, "validation": {"conversations": 0, "ids": []}}  # fmt: skip


def _nemo_rl_step(checkpoints, step: int) -> None:
    """A NeMo-RL-shaped ``step_N``: DCP weights and optimizer under policy/, training_info.json."""
    import json

    import torch.distributed.checkpoint as dcp

    d = checkpoints / f"step_{step}"
    for part in ("weights", "optimizer"):
        dcp.save({"w": torch.full((64, 64), float(step))}, checkpoint_id=str(d / "policy" / part), no_dist=True)
    (d / "training_info.json").write_text(json.dumps({"total_steps": step}))


def test_a_torn_newest_nemo_rl_checkpoint_is_set_aside_and_the_previous_one_resumed(tmp_path, capsys):
    from alia_nemo.engines.nemo_rl import set_aside_broken_checkpoints

    ckpts = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _nemo_rl_step(ckpts, step)
    for name in ("step_6", "step_4"):  # both newest torn: a truncated shard, a missing .metadata
        shard = next((ckpts / name / "policy" / "weights").glob("*.distcp"))
        if name == "step_6":
            shard.write_bytes(shard.read_bytes()[:100])
        else:
            (ckpts / name / "policy" / "optimizer" / ".metadata").unlink()
    set_aside_broken_checkpoints(ckpts, tmp_path)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2"]  # what NeMo-RL's get_latest_checkpoint_path sees
    aside = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "incomplete-checkpoints").iterdir())
    assert aside == ["step_4", "step_6"]  # kept for inspection, not deleted
    out = capsys.readouterr().out
    assert "step_6 is incomplete" in out and "truncated" in out and "step_4 is incomplete" in out
    set_aside_broken_checkpoints(ckpts, tmp_path)  # a sound newest checkpoint: nothing moves
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2"]
