"""Checkpoint integrity without loading a model: each damaged file is named, each sound one passes."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from alia_nemo.model.checkpoints import (
    checkpoint_problem,
    dcp_problem,
    safetensors_problem,
    torch_file_problem,
    weights_problem,
)

# torch.distributed.checkpoint.save in one process, as intended here, warns that there is no process group.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A tiny Hugging Face model directory (one safetensors file, config.json)."""
    from tests.helpers import save_peaked_tiny_model

    save_peaked_tiny_model(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def sharded_dir(tmp_path) -> Path:
    """The same model in three shards named by model.safetensors.index.json."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoModelForCausalLM

    from tests.helpers import save_peaked_tiny_model

    save_peaked_tiny_model(tmp_path / "single")
    state = AutoModelForCausalLM.from_pretrained(tmp_path / "single").state_dict()
    out = tmp_path / "sharded"
    out.mkdir()
    save_torch_state_dict({k: v.contiguous() for k, v in state.items()}, str(out), max_shard_size="200KB")
    (out / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    return out


def test_sound_weights_pass(model_dir, sharded_dir):
    assert safetensors_problem(model_dir / "model.safetensors") is None
    assert weights_problem(model_dir) is None and checkpoint_problem(model_dir) is None
    assert len(list(sharded_dir.glob("*.safetensors"))) >= 2
    assert weights_problem(sharded_dir) is None


@pytest.mark.parametrize("cut", ["a few bytes", "half", "to the header"])
def test_truncated_safetensors_is_named(model_dir, cut):
    f = model_dir / "model.safetensors"
    size = f.stat().st_size
    _truncate(f, {"a few bytes": size - 3, "half": size // 2, "to the header": 20}[cut])
    problem = safetensors_problem(f)
    assert problem is not None and problem.startswith(str(f)) and "truncated" in problem
    assert weights_problem(model_dir) == problem and checkpoint_problem(model_dir) == problem


def test_corrupt_safetensors_headers_are_named(model_dir, tmp_path):
    f = model_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8] = ord("#")  # the JSON header's opening brace
    f.write_bytes(bytes(data))
    assert "corrupt safetensors header (not JSON" in safetensors_problem(f)

    def write(header: dict, payload: bytes) -> Path:
        raw = json.dumps(header).encode()
        path = tmp_path / "x.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
        return path

    good = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    assert safetensors_problem(write(good, bytes(16))) is None
    assert "bytes after the last tensor" in safetensors_problem(write(good, bytes(20)))
    wrong_shape = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}
    assert "F32 [2, 3] needs 24 bytes, its offsets span 16" in safetensors_problem(write(wrong_shape, bytes(16)))
    gap = {**good, "b": {"dtype": "BF16", "shape": [2], "data_offsets": [20, 24]}}
    assert "tensor 'b' starts at 20, expected 16" in safetensors_problem(write(gap, bytes(24)))
    assert "no dtype, shape and data_offsets" in safetensors_problem(write({"a": {"dtype": "F32"}}, b""))
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    assert "shorter than the 8-byte" in safetensors_problem(tmp_path / "short.safetensors")
    assert safetensors_problem(tmp_path / "absent.safetensors").endswith("absent.safetensors: missing")


def test_shards_named_by_the_index(sharded_dir):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (sharded_dir / shard).unlink()
    assert weights_problem(sharded_dir) == f"{sharded_dir / shard}: missing (named by model.safetensors.index.json)"


def test_index_naming_a_tensor_its_shard_lacks(sharded_dir):
    path = sharded_dir / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.extra.weight"] = first
    path.write_text(json.dumps(index))
    assert weights_problem(sharded_dir) == (
        f"{sharded_dir / first}: lacks 1 tensor(s) model.safetensors.index.json puts there (model.extra.weight)"
    )


def test_config_json_must_parse(model_dir):
    (model_dir / "config.json").write_text('{"hidden_size": 6')
    assert weights_problem(model_dir).startswith(f"{model_dir / 'config.json'}: corrupt")
    (model_dir / "config.json").unlink()
    assert weights_problem(model_dir) == f"{model_dir / 'config.json'}: missing"


def test_truncated_or_corrupt_torch_files(tmp_path):
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    f = tmp_path / "optimizer.pt"
    torch.save(opt.state_dict(), f)
    assert torch_file_problem(f) is None
    data = f.read_bytes()
    _truncate(f, len(data) - 100)
    assert "not a complete zip archive" in torch_file_problem(f)
    _truncate(f, 0)
    assert torch_file_problem(f) == f"{f}: empty"
    # A flipped byte inside a tensor's data: the zip directory is intact, the member's CRC is not.
    with zipfile.ZipFile(tmp_path / "ok.pt", "w") as z:
        z.writestr("archive/data/0", bytes(range(256)) * 16)
    info = zipfile.ZipFile(tmp_path / "ok.pt").getinfo("archive/data/0")
    data = bytearray((tmp_path / "ok.pt").read_bytes())
    data[info.header_offset + 30 + len(info.filename) + 100] ^= 0xFF
    f.write_bytes(bytes(data))
    assert torch_file_problem(f) == f"{f}: member archive/data/0 fails its CRC check (corrupt)"
    assert torch_file_problem(f, crc=False) is None  # only the directory: fast, catches truncation only


def _dcp(directory: Path) -> Path:
    """A tiny model + optimizer state saved with torch.distributed.checkpoint in one process (no group)."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    state = {"model": {"w": torch.randn(32, 32), "b": torch.arange(32)}, "step": 7}
    save(state, storage_writer=FileSystemWriter(str(directory)), no_dist=True)
    return directory


def test_dcp_truncated_storage_file(tmp_path):
    weights = _dcp(tmp_path / "weights")
    assert dcp_problem(weights) is None
    distcp = sorted(weights.glob("*.distcp"))[0]
    _truncate(distcp, distcp.stat().st_size - 10)
    problem = dcp_problem(weights)
    assert problem.startswith(f"{distcp}: truncated, ") and "that .metadata references" in problem


def test_dcp_missing_or_damaged_files(tmp_path):
    weights = _dcp(tmp_path / "weights")
    distcp = sorted(weights.glob("*.distcp"))[0]
    distcp.unlink()
    assert dcp_problem(weights) == f"{distcp}: missing (referenced by {weights / '.metadata'})"
    weights = _dcp(tmp_path / "w2")
    _truncate(weights / ".metadata", 30)
    assert dcp_problem(weights).startswith(f"{weights / '.metadata'}: unreadable")
    (weights / ".metadata").unlink()
    assert "missing (not a complete torch.distributed.checkpoint)" in dcp_problem(weights)
    assert dcp_problem(tmp_path / "nothing") == f"{tmp_path / 'nothing'}: missing"


def test_nemo_rl_step_and_trainer_checkpoint(tmp_path, model_dir):
    """checkpoint_problem knows NeMo-RL's step_N (weights and optimizer as DCP) and a Trainer checkpoint-N."""
    step = tmp_path / "step_4"
    _dcp(step / "policy" / "weights")
    _dcp(step / "policy" / "optimizer")
    (step / "training_info.json").write_text('{"step": 4}')
    assert checkpoint_problem(step) is None
    distcp = sorted((step / "policy" / "optimizer").glob("*.distcp"))[0]
    _truncate(distcp, 100)
    assert checkpoint_problem(step).startswith(f"{distcp}: truncated")

    # Megatron under NeMo-RL: policy/weights/iter_N is the DCP directory.
    mstep = tmp_path / "mstep_4"
    _dcp(mstep / "policy" / "weights" / "iter_0000004")
    assert checkpoint_problem(mstep) is None

    ckpt = model_dir  # a Trainer checkpoint-N: the model plus optimizer.pt, scheduler.pt, trainer_state.json
    torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
    torch.save({"last_epoch": 3}, ckpt / "scheduler.pt")
    (ckpt / "trainer_state.json").write_text('{"global_step": 3}')
    assert checkpoint_problem(ckpt) is None
    _truncate(ckpt / "optimizer.pt", 50)
    assert checkpoint_problem(ckpt).startswith(f"{ckpt / 'optimizer.pt'}: not a complete zip archive")
    (ckpt / "optimizer.pt").unlink()
    (ckpt / "trainer_state.json").write_text('{"global_st')
    assert checkpoint_problem(ckpt).startswith(f"{ckpt / 'trainer_state.json'}: corrupt")
    (tmp_path / "empty").mkdir()
    assert checkpoint_problem(tmp_path / "empty").startswith(f"{tmp_path / 'empty'}: no checkpoint weights")
