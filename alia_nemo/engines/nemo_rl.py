"""``engine=nemo_rl``: compile the stage and run NeMo-RL's SFT entry points (setup + sft_train) on Ray.

Runs where NeMo-RL is importable (its container image). Ray: the cluster at ``engine.ray_address`` or
``RAY_ADDRESS``, else a local one (NeMo-RL's ``init_ray``). Our package reaches every Ray worker through
``PYTHONPATH``, which NeMo-RL forwards to its workers. Rerunning with the same ``run.output_dir`` resumes
from NeMo-RL's newest checkpoint there (its CheckpointManager finds it).
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from alia_nemo.config_schema import AliaConfig, ConfigError

CONFIG_NAME = "nemo_rl_sft.yaml"


def require_nemo_rl() -> None:
    """Fail early, with the way out, where NeMo-RL is missing."""
    try:
        import nemo_rl  # noqa: F401
    except ImportError:
        raise ConfigError(
            "engine=nemo_rl needs NeMo-RL v0.7 (its container image, or its source on PYTHONPATH with its "
            "dependencies). Here, `alia-nemo compile ... --out FILE` writes the config to run there with "
            "examples/run_sft.py; engine=local trains on this machine."
        ) from None


def package_path_dir(output_dir: Path) -> Path:
    """A directory holding only ``alia_nemo`` (a link), safe to put on every worker's PYTHONPATH.

    Pointing PYTHONPATH at site-packages would leak the driver's packages into NeMo-RL's worker venvs.
    """
    import alia_nemo

    shim = output_dir / ".pythonpath"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "alia_nemo"
    target = Path(alia_nemo.__file__).resolve().parent
    if link.is_symlink() and link.resolve() != target:
        link.unlink()
    if not link.exists():
        link.symlink_to(target, target_is_directory=True)
    return shim


def build_datasets(master_config: Any, tokenizer: Any) -> tuple[Any, Any]:
    """Our dataset class through NeMo-RL's own loader, wrapped as NeMo-RL processed datasets."""
    from nemo_rl.data.datasets import AllTaskProcessedDataset, load_response_dataset

    data = master_config.data
    raw = load_response_dataset(dict(data["train"]))
    processor = partial(
        raw.processor,
        add_bos=data["add_bos"],
        add_eos=data["add_eos"],
        add_generation_prompt=data["add_generation_prompt"],
    )
    processors = {raw.task_name: (raw.task_spec, processor)}
    max_len = data["max_input_seq_length"]
    train = AllTaskProcessedDataset(raw.dataset, tokenizer, None, processors, max_seq_length=max_len)
    val = None
    if raw.val_dataset is not None:
        val = AllTaskProcessedDataset(raw.val_dataset, tokenizer, None, processors, max_seq_length=max_len)
    return train, val


def write_run_config(cfg: AliaConfig, output_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Compile the stage and write it (and our composed config) into the run directory."""
    from alia_nemo.nemo_rl.compile import compile_stage, header

    compiled = compile_stage(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / CONFIG_NAME
    text = header(cfg, compiled, "alia-nemo train engine=nemo_rl") + yaml.safe_dump(compiled.config, sort_keys=False)
    path.write_text(text)
    (output_dir / "alia_config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    return path, compiled.config


def run_nemo_rl(cfg: AliaConfig) -> dict[str, Any]:
    """Compile, connect to Ray, build tokenizer and data, and train with NeMo-RL."""
    require_nemo_rl()
    out = Path(cfg.run.output_dir).expanduser().resolve()
    checkpoints = out / "checkpoints"
    if not cfg.run.resume and checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise ConfigError(
            f"{checkpoints} holds checkpoints and run.resume=false; NeMo-RL would resume from them anyway. "
            "Pick a new run.output_dir, or set run.resume=true to continue"
        )
    path, config = write_run_config(cfg, out)
    address = getattr(cfg.engine, "ray_address", None)
    if address:
        os.environ["RAY_ADDRESS"] = address
    shim = str(package_path_dir(out))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (shim, os.environ.get("PYTHONPATH")) if p)

    from nemo_rl.algorithms.sft import MasterConfig, setup, sft_train
    from nemo_rl.algorithms.utils import get_tokenizer
    from nemo_rl.distributed.virtual_cluster import init_ray
    from nemo_rl.utils.logger import get_next_experiment_dir

    master = MasterConfig(**config)
    master.logger["log_dir"] = get_next_experiment_dir(master.logger["log_dir"])
    init_ray()
    tokenizer = get_tokenizer(master.policy["tokenizer"])
    train, val = build_datasets(master, tokenizer)
    (policy, _cluster, train_loader, val_loader, loss_fn, logger, checkpointer, state, master) = setup(
        master, tokenizer, train, val
    )
    sft_train(policy, train_loader, val_loader, tokenizer, loss_fn, master, logger, checkpointer, state)
    from alia_nemo.nemo_rl.processor import OVERLONG

    return {
        "config": str(path),
        "checkpoints": str(checkpoints),
        "log_dir": master.logger["log_dir"],
        "train_rows": len(train),
        "masked_overlong": dict(OVERLONG),
    }
