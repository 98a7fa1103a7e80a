"""The local engine: a stage on Ray Train (``TorchTrainer``), each worker running transformers' Trainer.

In-process Ray by default; an existing cluster when ``engine.ray_address`` or ``RAY_ADDRESS`` names
one. Everything the run produces lands in ``run.output_dir``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alia_nemo.config.resolve import ResolvedStage
from alia_nemo.config.schema import AliaConfig
from alia_nemo.engines.run_dir import LOCK_NAME, run_path
from alia_nemo.errors import ConfigError

# How often a worker checks that the driver (``alia-nemo train``) still runs.
DRIVER_CHECK_S = 2.0
# A remote worker gives up on a driver whose lock has not been refreshed (the driver's DirLock does so every
# few seconds) for this long, by the worker's own clock: generous, as NFS may show a new mtime a minute late.
DRIVER_STALE_S = 180.0
_watchdog_started = False


def _process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` in /proc (``Z`` for a zombie); None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class DriverWatch:
    """Tells whether the driver that started this worker is gone.

    ``driver`` is the driver's :func:`alia_nemo.locks.identity`. On the driver's host and PID namespace its PID
    tells: gone once it no longer runs the same process (a PID reused by another process, or a killed driver
    not yet reaped, counts as gone). Elsewhere the run directory's lock (``lock_path``, which the driver holds
    and refreshes for the whole run) does: gone when another process holds it now, or when its mtime has not
    changed for ``stale_s`` seconds of this worker's own clock (clocks of other hosts do not matter). Without
    a lock file a remote worker can not tell, and keeps going.
    """

    def __init__(self, driver: dict[str, Any], lock_path: Path, stale_s: float = DRIVER_STALE_S):
        self.driver = driver
        self.lock_path = Path(lock_path)
        self.stale_s = stale_s
        self._beat: tuple[float, float] | None = None  # (lock mtime last seen, monotonic time it was first seen)

    def gone(self) -> str | None:
        """Why the driver is gone, or None while it may still run."""
        from alia_nemo.locks import holder_alive, identity, read_lock

        me = identity()
        if (self.driver.get("host"), self.driver.get("pid_namespace")) == (me["host"], me["pid_namespace"]):
            if not holder_alive(self.driver) or _process_state(self.driver["pid"]) in (None, "Z", "X"):
                return f"PID {self.driver['pid']} no longer runs"
            return None
        try:
            mtime = self.lock_path.stat().st_mtime
        except FileNotFoundError:
            self._beat = None
            return None
        info = read_lock(self.lock_path) or {}
        keys = ("host", "pid", "pid_namespace", "start_ticks")
        if "pid" in info and any(info.get(k) != self.driver.get(k) for k in keys):  # an unreadable one: by mtime
            return f"{self.lock_path} is held by another process (PID {info.get('pid')} on {info.get('host')})"
        now = time.monotonic()
        if self._beat is None or self._beat[0] != mtime:
            self._beat = (mtime, now)
        elif now - self._beat[1] > self.stale_s:
            return f"its lock {self.lock_path} has not been refreshed for {now - self._beat[1]:.0f} s"
        return None


def start_driver_watchdog(driver: dict[str, Any], lock_path: Path, interval_s: float = DRIVER_CHECK_S) -> None:
    """Exit this worker process (status 1) as soon as :class:`DriverWatch` says the driver is gone.

    Ray itself usually takes a dead driver's workers down (Ray 2.60 on Linux: the embedded gcs_server and raylet
    die with the driver, a cluster's GCS kills the dead job's actors; about 2 s either way), but nothing here
    may rely on it: workers outliving their driver (a worker cut off from the GCS, another Ray version or
    platform) would keep training and write checkpoints and ``final/`` into a run nobody watches any more, or
    one a new ``train`` has taken over. ``os._exit``, not an exception: the training thread must stop at once,
    wherever it is.
    """
    global _watchdog_started
    if _watchdog_started:  # one per process, should Ray run the loop again in it
        return
    _watchdog_started = True
    watch = DriverWatch(driver, lock_path)

    def run() -> None:
        while True:
            time.sleep(interval_s)
            try:
                why = watch.gone()
            except Exception:  # a failed check must never stop a healthy run
                continue
            if why:
                print(
                    f"[alia-nemo] the driver (PID {driver.get('pid')} on {driver.get('host')}) is gone ({why}): "
                    f"stopping worker PID {os.getpid()}",
                    flush=True,
                )
                os._exit(1)

    threading.Thread(target=run, name="alia-driver-watchdog", daemon=True).start()


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (module-level so Ray can pickle it by reference)."""
    import ray.train

    from alia_nemo.engines.dpo_training import train_dpo
    from alia_nemo.engines.hf_training import train_sft

    if config.get("driver"):
        start_driver_watchdog(config["driver"], Path(config["output_dir"], LOCK_NAME))
    cfg = AliaConfig.model_validate(config["cfg"])
    train = train_dpo if cfg.stage.kind == "dpo" else train_sft  # CPT trains like SFT: rows of ids and labels
    metrics = train(
        cfg,
        ResolvedStage(**config["stage"]),
        config["train"],
        config["val"],
        Path(config["tokenizer_dir"]),
        Path(config["output_dir"]),
        use_cpu=not cfg.engine.use_gpu,
    )
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["output_dir"], "train_result.json").write_text(json.dumps(metrics, indent=2))


def _ray_address(cfg: AliaConfig) -> str | None:
    """The external cluster to run on (``engine.ray_address``, else ``RAY_ADDRESS``); None for an embedded one."""
    return cfg.engine.ray_address or os.environ.get("RAY_ADDRESS") or None


# Ray reads this variable (at import, into ray._private.ray_constants.ENABLE_RAY_CLUSTER) to decide whether a node
# it starts may be joined from other machines. Off (macOS and Windows by default), the node's address is 127.0.0.1.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _loopback_node() -> Iterator[None]:
    """Inside this block a new Ray node gets 127.0.0.1 as its address and binds its sockets there (see _init_ray).

    The variable, for the processes ``ray.init`` spawns (GCS, raylet, agents; the raylet's workers inherit it), and
    the constant Ray read from it when this process imported ray; both are restored afterwards, so that a later
    connection to a real cluster from this process is not affected.
    """
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = saved_env


def _init_ray(cfg: AliaConfig) -> bool:
    """Connect to the configured cluster or start an embedded one; True when this call connected.

    Either way the workers' output reaches this driver (``log_to_driver``) and goes through the run's console
    (:func:`alia_nemo.console.route_worker_output`): all of it to ``logs/console.log``, our lines to the console.
    """
    import ray

    from alia_nemo.console import route_worker_output

    if ray.is_initialized():
        return False
    # Ray Train 2.60 re-routes print() through a logger that also writes to the console: every worker
    # line would reach the driver twice.
    runtime_env = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    address = _ray_address(cfg)
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        route_worker_output()
        return True
    # Embedded: one node on loopback, no dashboard; the workers' torch rendezvous (store, gloo) stays on 127.0.0.1
    # too (alia_nemo.engines.rendezvous).
    # - Address: Ray turns 127.0.0.1 given as _node_ip_address into the machine's outward address; its gRPC servers
    #   then listen on every interface (`::`), the autoscaler's and the dashboard's metrics servers on 0.0.0.0. With
    #   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (_loopback_node) the node's address is 127.0.0.1 and every server binds
    #   to it. The listening TCP sockets of a run, measured with Ray 2.60 on Linux (tests/engines/test_local_sockets.py
    #   checks that all are on loopback and which answer without the token), all on 127.0.0.1 or ::ffff:127.0.0.1
    #   (an IPv6 socket bound to the IPv4 loopback address):
    #     driver and every worker process (Ray Train's controller, its helper actors, the training workers, idle
    #       pre-started workers): one core-worker gRPC port each (random);
    #     gcs_server: the GCS gRPC port; raylet: node-manager and object-manager gRPC ports (random);
    #     dashboard agent: its gRPC port (random) and its HTTP server (52365);
    #     runtime-env agent: an HTTP port (random);
    #     autoscaler monitor (monitor.py): Prometheus metrics over HTTP on 44217, fixed (AUTOSCALER_METRIC_PORT);
    #     dashboard head (dashboard.py, started in its minimal mode even with include_dashboard=False): Prometheus
    #       metrics over HTTP on 44227, fixed (DASHBOARD_METRIC_PORT);
    #     a multi-worker run's rendezvous: rank 0's TCPStore and every rank's gloo pair sockets (random).
    #   Token authentication (Ray >= 2.60, on by default for a new local cluster; the token is ~/.ray/auth_token)
    #   guards the gRPC ports (a driver with a wrong token is refused by the GCS) and the two agents' HTTP servers
    #   (401 without it). Without it: the two metrics endpoints (read-only counters) and the torch rendezvous, which is
    #   why that one is bound to loopback (rendezvous.py). So local users of the machine can reach these ports and,
    #   without the token, read only metrics; other machines reach none.
    # - enable_metrics_collection off: it removes one more unauthenticated listener, the dashboard agent's own
    #   Prometheus endpoint (nothing scrapes any of them here); the two above have no switch.
    # - RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0: a node that lives and dies with this process is never drained for
    #   preemption, and the watcher actor only adds a process and a warning.
    runtime_env["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    with _loopback_node():
        ray.init(
            num_cpus=max(os.cpu_count() or 1, int(cfg.engine.num_workers * cfg.engine.cpus_per_worker)),
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
            runtime_env=runtime_env,
            _system_config={"enable_metrics_collection": False},
        )
    route_worker_output()
    return True


# fp32 weights + gradients + two AdamW moments: 16 bytes per parameter before activations.
BYTES_PER_PARAMETER = 16


def check_fits_in_memory(cfg: AliaConfig, available_bytes: int | None = None) -> None:
    """Refuse a CPU run whose model and optimizer state alone exceed the machine's memory.

    Loading ALIA-40b on a laptop would otherwise swap or be killed minutes later, far from the cause.
    """
    if cfg.engine.use_gpu:
        return
    from alia_nemo.model.architectures import get_spec

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


# Training metrics the summary reports at the first and the last logged step: summary key -> metrics.jsonl key.
# The DPO ones are only in a DPO stage's metrics.
SUMMARY_METRICS = {"loss": "loss", "margin": "rewards/margin", "accuracy": "rewards/accuracy"}


def first_and_last(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``first_<name>`` and ``last_<name>`` of each :data:`SUMMARY_METRICS` logged in ``rows`` (metrics.jsonl)."""
    found: dict[str, float] = {}
    for name, key in SUMMARY_METRICS.items():
        values = [r[key] for r in rows if key in r]
        if values:
            found[f"first_{name}"], found[f"last_{name}"] = values[0], values[-1]
    return found


def announce_resume(cfg: AliaConfig, out: Path, total_steps: int) -> Path | None:
    """Say plainly where this attempt starts, before Ray starts: ``resuming from checkpoint-N (step N of M)``.

    The checkpoint is the one the workers' ``resume_point`` then finds: torn or incomplete newer ones are moved to
    ``incomplete-checkpoints/`` here, by the driver, which holds the run directory's lock.
    """
    from alia_nemo.engines.hf_training import newest_complete_checkpoint

    if not cfg.run.resume:
        return None
    ckpt = newest_complete_checkpoint(out / "checkpoints", move_aside=True)
    if ckpt is not None:
        step = int(ckpt.name.split("-")[-1])
        print(f"[alia-nemo] resuming from {ckpt.name} (step {step} of {total_steps})", flush=True)
    return ckpt


def run_local(cfg: AliaConfig) -> dict[str, Any]:
    """Train ``cfg``'s stage on Ray and return the run summary (also written to ``summary.json``)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from alia_nemo.data.sources import load_for_training
    from alia_nemo.engines.rendezvous import BoundTorchConfig
    from alia_nemo.locks import identity
    from alia_nemo.model.tokenizer import load_tokenizer
    from alia_nemo.plots import plot_loss, read_metrics

    # Inputs first: a model too big for the machine, a bad tokenizer or data file fails before anything is written.
    check_fits_in_memory(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer, allow_download=cfg.model.allow_download)
    data, stage = load_for_training(cfg, tokenizer)  # the step count from the rows actually read
    stage.check_trainable()

    out = run_path(cfg)  # locked and its config.yaml written by run_dir.open_run (run_stage)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = out / "tokenizer"
    tokenizer.save_pretrained(str(tokenizer_dir))
    (out / "data_report.json").write_text(json.dumps(data.report, indent=2))
    print(f"[alia-nemo] data: {json.dumps(data.report)}")
    announce_resume(cfg, out, stage.steps)

    connected = _init_ray(cfg)
    embedded = connected and _ray_address(cfg) is None  # all workers on this machine: rendezvous on loopback
    ray_cluster = ray.get_runtime_context().gcs_address
    try:
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={
                "cfg": cfg.model_dump(mode="json"),
                "stage": stage.as_dict(),
                "train": data.train,
                "val": data.val,
                "tokenizer_dir": str(tokenizer_dir),
                "output_dir": str(out),
                "driver": identity(),  # the workers stop when this process is gone (start_driver_watchdog)
            },
            torch_config=BoundTorchConfig(loopback=embedded),
            scaling_config=ScalingConfig(
                num_workers=cfg.engine.num_workers,
                use_gpu=cfg.engine.use_gpu,
                resources_per_worker={"CPU": cfg.engine.cpus_per_worker},
            ),
            run_config=RunConfig(name="train", storage_path=str(out / "ray")),
        )
        try:
            trainer.fit()
        except Exception as exc:  # a worker's own error (non-finite loss, disk full), not Ray's wrapper
            from alia_nemo.engines import explain_failure

            cause = explain_failure(exc, out)
            if cause is exc:
                raise
            raise cause from exc
    finally:
        if connected:  # stops an embedded cluster; only disconnects from an external one
            ray.shutdown()

    result = json.loads((out / "train_result.json").read_text())
    result.update(first_and_last(read_metrics(out / "metrics.jsonl")))
    plot = plot_loss(out / "metrics.jsonl", out / "loss.png", title=f"{cfg.stage.name} / {cfg.model.arch}")
    summary = {
        "output_dir": str(out),
        "final_model": str(out / "final"),
        "loss_plot": str(plot),
        "host": socket.gethostname(),
        "ray_cluster": ray_cluster,
        "data": data.report,
        "resolved": stage.as_dict(),
        "train": result,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
