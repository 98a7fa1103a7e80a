"""The local engine: a stage on Ray Train (``TorchTrainer``), each worker running transformers' Trainer.

In-process Ray by default; an existing cluster when ``engine.ray_address`` or ``RAY_ADDRESS`` names
one. Everything the run produces lands in ``run.output_dir``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from alia_nemo.config_compose import to_yaml
from alia_nemo.config_schema import AliaConfig, ConfigError


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (module-level so Ray can pickle it by reference)."""
    import ray.train

    from alia_nemo.hf_training import train_sft

    cfg = AliaConfig.model_validate(config["cfg"])
    metrics = train_sft(
        cfg,
        config["train"],
        config["val"],
        Path(config["tokenizer_dir"]),
        Path(config["output_dir"]),
        use_cpu=not cfg.engine.use_gpu,
    )
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["output_dir"], "train_result.json").write_text(json.dumps(metrics, indent=2))


def _init_ray(cfg: AliaConfig) -> bool:
    """Connect to the configured cluster or start an embedded one; True when this call connected."""
    import ray

    if ray.is_initialized():
        return False
    # Ray Train 2.60 re-routes print() through a logger that also writes to the console: every worker
    # line would reach the driver twice.
    runtime_env = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    address = cfg.engine.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        return True
    # Embedded: a loopback node address and no dashboard. Ray's own gRPC ports still listen on every
    # interface (Ray can not be confined to loopback); Ray >= 2.60 puts token authentication on them.
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(cfg.engine.num_workers * cfg.engine.cpus_per_worker)),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        configure_logging=False,
        runtime_env=runtime_env,
    )
    return True


# fp32 weights + gradients + two AdamW moments: 16 bytes per parameter before activations.
BYTES_PER_PARAMETER = 16


def check_fits_in_memory(cfg: AliaConfig, available_bytes: int | None = None) -> None:
    """Refuse a CPU run whose model and optimizer state alone exceed the machine's memory.

    Loading ALIA-40b on a laptop would otherwise swap or be killed minutes later, far from the cause.
    """
    if cfg.engine.use_gpu:
        return
    from alia_nemo.architectures import get_spec

    if available_bytes is None:
        available_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = get_spec(cfg.model.arch).total_parameters() * BYTES_PER_PARAMETER * cfg.engine.num_workers
    if need > available_bytes:
        raise ConfigError(
            f"model.arch={cfg.model.arch} needs about {need / 2**30:.0f} GiB for weights, gradients and AdamW state "
            f"on {cfg.engine.num_workers} CPU worker(s), more than this machine's {available_bytes / 2**30:.0f} GiB. "
            "Train it on GPUs (engine.use_gpu=true on a GPU Ray cluster, or the NeMo-RL engine), or pick "
            "model=alia_tiny for a local run."
        )


def run_local(cfg: AliaConfig) -> dict[str, Any]:
    """Train ``cfg``'s stage on Ray and return the run summary (also written to ``summary.json``)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from alia_nemo.plots import plot_loss, read_metrics
    from alia_nemo.sft_data import prepare_data
    from alia_nemo.tokenizer import load_tokenizer

    # Inputs first: a model too big for the machine, a bad tokenizer or data file fails before anything is written.
    check_fits_in_memory(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer, allow_download=cfg.model.allow_download)
    data = prepare_data(cfg, tokenizer)

    out = Path(cfg.run.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    tokenizer_dir = out / "tokenizer"
    tokenizer.save_pretrained(str(tokenizer_dir))
    (out / "data_report.json").write_text(json.dumps(data.report, indent=2))
    print(f"[alia-nemo] data: {json.dumps(data.report)}")

    connected = _init_ray(cfg)
    ray_cluster = ray.get_runtime_context().gcs_address
    try:
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={
                "cfg": cfg.model_dump(mode="json"),
                "train": data.train,
                "val": data.val,
                "tokenizer_dir": str(tokenizer_dir),
                "output_dir": str(out),
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.engine.num_workers,
                use_gpu=cfg.engine.use_gpu,
                resources_per_worker={"CPU": cfg.engine.cpus_per_worker},
            ),
            run_config=RunConfig(name="train", storage_path=str(out / "ray")),
        )
        trainer.fit()
    finally:
        if connected:  # stops an embedded cluster; only disconnects from an external one
            ray.shutdown()

    result = json.loads((out / "train_result.json").read_text())
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    if losses:
        result["first_loss"], result["last_loss"] = losses[0], losses[-1]
    plot = plot_loss(out / "metrics.jsonl", out / "loss.png", title=f"{cfg.stage.name} / {cfg.model.arch}")
    summary = {
        "output_dir": str(out),
        "final_model": str(out / "final"),
        "loss_plot": str(plot),
        "host": socket.gethostname(),
        "ray_cluster": ray_cluster,
        "data": data.report,
        "train": result,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
