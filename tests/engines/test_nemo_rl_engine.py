"""The NeMo-RL engine's driver helpers: ``package_path_dir`` (what every worker's PYTHONPATH gets),
``write_run_config`` (the compiled stage written into the run directory) and ``run_nemo_rl`` (its guards, what it
hands NeMo-RL's loop, and one real two-step run on the CPU harness).

Only the real run needs NeMo-RL (marked ``nemo_rl``); the rest runs in the plain environment, where a stand-in
``nemo_rl`` module gets ``run_nemo_rl`` past its import check and a recorder stands in for NeMo-RL's loop.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import yaml

import alia_nemo
from alia_nemo.config.compose import load_config
from alia_nemo.config.schema import AliaConfig
from alia_nemo.engines import nemo_rl as engine
from alia_nemo.engines.nemo_rl import CONFIG_NAME, package_path_dir, run_nemo_rl, write_run_config
from alia_nemo.errors import ConfigError
from tests.helpers import NEMO_RL_HARNESS, NEMO_RL_TINY, read_jsonl
from tests.nemo_rl import conftest as nemo_rl_fixtures

PACKAGE = Path(alia_nemo.__file__).resolve().parent
# 282 training conversations of the sample mixture / global batch 16 -> 17 steps per epoch, 2 epochs.
TINY_STEPS = 34


def _tiny(out: Path, *extra: str) -> AliaConfig:
    return load_config([f"recipe={NEMO_RL_TINY}", f"run.output_dir={out}", *extra])


@pytest.fixture
def fake_nemo_rl(monkeypatch):
    """An importable ``nemo_rl`` (run_nemo_rl only checks that it imports) and a recorder for NeMo-RL's loop."""
    monkeypatch.setitem(sys.modules, "nemo_rl", types.ModuleType("nemo_rl"))
    calls: list[dict] = []

    def train_compiled(config, output_dir, ray_address=None, title=""):
        calls.append({"config": config, "output_dir": output_dir, "ray_address": ray_address, "title": title})
        return {"trained": len(calls)}

    monkeypatch.setattr(engine, "train_compiled", train_compiled)
    return calls


# package_path_dir -----------------------------------------------------------------------------------------------


def test_package_path_dir_holds_only_a_link_to_our_package(tmp_path):
    out = tmp_path / "run" / "not-yet-there"
    shim = package_path_dir(out)
    assert shim == out / ".pythonpath" and shim.is_dir()
    assert [p.name for p in shim.iterdir()] == ["alia_nemo"]  # nothing else of the driver's environment
    link = shim / "alia_nemo"
    assert link.is_symlink() and link.resolve() == PACKAGE
    assert (link / "engines" / "nemo_rl.py").read_bytes() == Path(engine.__file__).read_bytes()


def test_package_path_dir_keeps_a_current_link_and_replaces_a_stale_or_dangling_one(tmp_path):
    link = package_path_dir(tmp_path) / "alia_nemo"
    before = link.lstat().st_ino
    assert package_path_dir(tmp_path) == tmp_path / ".pythonpath" and link.lstat().st_ino == before  # kept
    old_checkout = tmp_path / "an-old-checkout"
    old_checkout.mkdir()
    for stale in (old_checkout, tmp_path / "gone"):  # another copy of the package; a deleted one
        link.unlink()
        link.symlink_to(stale, target_is_directory=True)
        package_path_dir(tmp_path)
        assert link.is_symlink() and link.resolve() == PACKAGE, stale.name


# write_run_config -----------------------------------------------------------------------------------------------


def test_write_run_config_writes_the_compiled_stage_under_its_header(tmp_path):
    from alia_nemo.engines.nemo_rl_prepare import compile_stage

    out = tmp_path / "runs" / "sft"
    cfg = _tiny(out)
    path, config = write_run_config(cfg, out)
    assert path == out / CONFIG_NAME == out / "nemo_rl_sft.yaml"
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header[0] == "# NeMo-RL v0.7 SFT config compiled by alia-nemo from: alia-nemo train engine=nemo_rl"
    assert header[2].startswith("# 282 training conversations (") and header[2].endswith(
        f") / global batch 16 -> {TINY_STEPS} steps"
    )
    assert header[3] == "# layout TP1 PP1 CP1 DP1 on 1 GPUs, 4 micro-batches accumulated per step"
    assert len(header) == 6 and text.startswith("".join(line + "\n" for line in header))
    # The YAML below the header is the returned config, and that is what compiling the stage gives.
    assert yaml.safe_load(text) == config
    assert config == compile_stage(cfg, progress=False).config
    assert config["sft"]["max_num_steps"] == TINY_STEPS and config["policy"]["train_global_batch_size"] == 16
    assert config["checkpointing"]["checkpoint_dir"] == str(out.resolve() / "checkpoints")
    assert Path(config["policy"]["model_name"]) == out.resolve() / "start_model"
    assert (out / "start_model" / "config.json").is_file()
    # Our composed config beside it, loadable back into the same config.
    recorded = json.loads((out / "alia_config.json").read_text())
    assert recorded == json.loads(json.dumps(cfg.model_dump()))
    assert AliaConfig.model_validate(recorded) == cfg


def test_write_run_config_rewrites_an_earlier_config(tmp_path):
    out = tmp_path / "sft"
    write_run_config(_tiny(out), out)
    path, config = write_run_config(_tiny(out, "stage.max_steps=3"), out)
    assert config["sft"]["max_num_steps"] == 3
    assert yaml.safe_load(path.read_text())["sft"]["max_num_steps"] == 3
    assert json.loads((out / "alia_config.json").read_text())["stage"]["max_steps"] == 3


def test_write_run_config_refuses_a_stage_nemo_rl_can_not_run_and_writes_nothing(tmp_path):
    out = tmp_path / "local"
    with pytest.raises(ConfigError, match="compile needs engine=nemo_rl"):
        write_run_config(load_config([f"run.output_dir={out}"]), out)
    assert not out.exists()


# run_nemo_rl: guards and hand-over ------------------------------------------------------------------------------


def test_run_nemo_rl_without_nemo_rl_says_where_to_run_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nemo_rl", None)  # `import nemo_rl` raises ImportError
    out = tmp_path / "sft"
    with pytest.raises(ConfigError, match=r"engine=nemo_rl needs NeMo-RL v0\.7 .*alia-nemo compile .* --out FILE"):
        run_nemo_rl(_tiny(out))
    assert not out.exists()


def test_run_nemo_rl_refuses_an_output_dir_that_is_a_file(tmp_path, fake_nemo_rl):
    out = tmp_path / "sft"
    out.write_text("not a run")
    with pytest.raises(ConfigError, match=r"run\.output_dir=.*sft is a file, not a directory"):
        run_nemo_rl(_tiny(out))
    assert out.read_text() == "not a run" and fake_nemo_rl == []  # nothing compiled, nothing trained


def test_run_nemo_rl_trains_the_config_it_wrote_into_the_run_directory(tmp_path, fake_nemo_rl, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _tiny(Path("relative") / "sft", "engine.ray_address=10.0.0.1:6379", "stage.max_steps=2")
    assert run_nemo_rl(cfg) == {"trained": 1}  # what NeMo-RL's loop returned
    (call,) = fake_nemo_rl
    out = tmp_path / "relative" / "sft"
    assert call["output_dir"] == out  # absolute, whatever the current directory later becomes
    assert call["config"] == yaml.safe_load((out / CONFIG_NAME).read_text())
    assert call["config"]["sft"]["max_num_steps"] == 2
    assert call["config"]["checkpointing"]["checkpoint_dir"] == str(out / "checkpoints")
    assert call["ray_address"] == "10.0.0.1:6379"
    assert call["title"] == "sft_tiny / alia_tiny (NeMo-RL)"


# run_nemo_rl: a real run ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_head(_isolated_cache):
    """tests/nemo_rl's Ray head advertising one GPU, for this module only (stopped when it ends)."""
    yield from nemo_rl_fixtures.ray_gpu_head.__wrapped__(_isolated_cache)


@pytest.mark.nemo_rl
@pytest.mark.slow
def test_run_nemo_rl_trains_two_steps_and_writes_final(ray_head, tmp_path, monkeypatch):
    # The driver's environment as it was: run_nemo_rl points PYTHONPATH at its package link for NeMo-RL's workers.
    for name in ("PYTHONPATH", "RAY_ADDRESS", "RAY_OVERRIDE_JOB_RUNTIME_ENV"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    out = tmp_path / "sft"
    cfg = _tiny(out, *NEMO_RL_HARNESS, "stage.max_steps=2", "run.save_every=2", "run.eval_every=null")
    summary = run_nemo_rl(cfg)

    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["config"] == str(out / CONFIG_NAME)
    assert yaml.safe_load((out / CONFIG_NAME).read_text())["sft"]["max_num_steps"] == 2
    train = summary["train"]
    assert (train["global_step"], train["consumed_samples"]) == (2, 2 * 16)
    assert (train["resumed_from"], train["start_step"], train["checkpoint"]) == (
        None, 0, str(out / "checkpoints" / "step_2")
    )  # fmt: skip
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert train["first_loss"] > 6.0  # a random init over 1,024 pieces: about ln 1024 = 6.93
    assert summary["data"]["train_rows"] == 282 and summary["data"]["val_rows"] == 18
    export = json.loads((out / "final" / "alia_export.json").read_text())
    assert (export["source"], export["step"]) == (str(out / "checkpoints" / "step_2"), 2)
    assert summary["final_model"] == str(out / "final") and (out / "final" / "model.safetensors").is_file()
    # The workers imported our package through the link the driver put first on PYTHONPATH.
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(out / ".pythonpath")
    assert (out / ".pythonpath" / "alia_nemo").resolve() == PACKAGE
