"""launchers/slurm/alia-ray.sbatch on a real two-node SLURM, Ray processes started through srun.

The cluster (munge, slurmctld, two slurmd on one host) and every Ray process run in a network
namespace with only loopback; the container runtime is `none`. Each node has 4 fake GPUs (GRES backed by
device nodes that are copies of /dev/null): SLURM schedules them and sets CUDA_VISIBLE_DEVICES for the
steps that get them, and Ray is told `--num-gpus`, so nothing ever opens them. See
tests/launchers/slurm_cluster.py.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launchers.slurm_cluster import SlurmCluster, available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=str(available()))]
ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launchers" / "slurm" / "alia-ray.sbatch"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), gpus=4)
    try:
        yield c.start()
    finally:
        c.stop()


def _env(cluster: SlurmCluster, tmp: Path, ray_tmp: str, **extra: str) -> dict[str, str]:
    return cluster.env(**{
        "ALIA_RUNTIME": "none", "ALIA_GPUS_PER_NODE": "0", "ALIA_CPUS_PER_NODE": "2",
        "ALIA_LOG_DIR": str(tmp / "logs"), "ALIA_RAY_TMP": ray_tmp, "ALIA_JOIN_TIMEOUT": "180", "ALIA_POLL_S": "2",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "ALIA_NEMO_PREPARED": os.environ["ALIA_NEMO_PREPARED"], "ALIA_NEMO_CACHE": os.environ["ALIA_NEMO_CACHE"],
        "HF_TOKEN": "hf_secret_must_not_leak", **extra,
    })  # fmt: skip


def _leftover_ray(ray_tmp: str) -> str:
    return subprocess.run(["pgrep", "-f", f"--temp-dir={ray_tmp}"], capture_output=True, text=True).stdout.strip()


def test_job_runs_on_a_two_node_ray_cluster_and_its_status_is_the_slurm_status(cluster, tmp_path):
    out = tmp_path / "job.out"
    ray_tmp = f"/tmp/ar{os.getpid()}a"
    rc = cluster.sbatch(
        ["-N", "2", "-o", str(out), str(SBATCH), "stage.max_steps=3", f"run.output_dir={tmp_path / 'run'}"],
        env=_env(cluster, tmp_path, ray_tmp), timeout=600,
    )  # fmt: skip
    log = out.read_text()
    assert rc == 0, log[-4000:]
    assert "node n1 joined" in log and "node n2 joined" in log and "Ray cluster up: 2 node(s)" in log
    assert re.search(r"job raysubmit_\w+ finished with status 0", log)
    driver = (tmp_path / "logs" / "driver.log").read_text()
    assert "SUCCEEDED" in driver and "step 3/3" in driver
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-3").is_dir() and (tmp_path / "run" / "final").is_dir()
    assert "Ray stopped on 2 node(s)" in log
    # The dashboard / job API listened on the head's address only; the token stayed in its 0600 file.
    head_log = (tmp_path / "logs" / "ray-n1.log").read_text()
    assert "0.0.0.0:8265" not in head_log
    token = tmp_path / "logs" / ".ray_auth_token"
    assert token.stat().st_mode & 0o777 == 0o600 and token.read_text() not in log + driver + head_log
    assert "hf_secret_must_not_leak" not in log + driver
    assert _leftover_ray(ray_tmp) == ""  # Ray torn down


def test_a_dying_worker_ends_the_slurm_job_promptly_and_names_the_node(cluster, tmp_path):
    out = tmp_path / "job.out"
    ray_tmp = f"/tmp/ar{os.getpid()}b"
    job = cluster.popen(
        ["sbatch", "--wait", "-N", "2", "-o", str(out), str(SBATCH), "stage.epochs=100000",
         f"run.output_dir={tmp_path / 'run'}"],
        env=_env(cluster, tmp_path, ray_tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    driver = tmp_path / "logs" / "driver.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (driver.is_file() and "step 1/" in driver.read_text()):
        assert job.poll() is None, out.read_text()[-3000:] if out.is_file() else "sbatch ended early"
        time.sleep(2)
    assert "step 1/" in driver.read_text(), "training never started"
    # Kill the worker node's Ray (its `ray start --block`, the srun step's task) as a node failure would.
    pids = subprocess.run(["pgrep", "-f", f"ray start .*--temp-dir={ray_tmp}/n2"], capture_output=True, text=True)
    assert pids.stdout.split(), "worker's ray start not found"
    killed_at = time.time()
    for pid in pids.stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    job.wait(timeout=180)
    ended_after = time.time() - killed_at
    log = out.read_text()
    assert job.returncode != 0, log[-3000:]
    assert "Ray on node n2 exited" in log, log[-3000:]
    assert ended_after < 120, f"the SLURM job took {ended_after:.0f} s to end"
    assert "Ray stopped on 2 node(s)" in log


# ------------------------------------------------------------------------------------------------------
# GPUs: every Ray step requests its node's GPUs; each step and each Ray node must see ALIA_GPUS_PER_NODE.


def test_dry_run_prints_each_nodes_ray_step_with_its_gpu_request(cluster, tmp_path):
    """ALIA_DRY_RUN=1 inside a real allocation: one srun line per node, the GPU request as configured."""
    variants = {
        "gpus4": "ALIA_GPUS_PER_NODE=4",
        "gpus0": "ALIA_GPUS_PER_NODE=0",
        "override": "ALIA_GPUS_PER_NODE=4 ALIA_SRUN_GPU_FLAGS='--gpus-per-node=4 --gpu-bind=none'",
        "disabled": "ALIA_GPUS_PER_NODE=4 ALIA_SRUN_GPU_FLAGS=",
    }
    job = tmp_path / "dry.sh"
    job.write_text("#!/bin/bash\nset -e\n" + "".join(
        f"{assign} ALIA_DRY_RUN=1 bash {SBATCH} > {tmp_path / name}.txt\n" for name, assign in variants.items()
    ))  # fmt: skip
    out = tmp_path / "job.out"
    rc = cluster.sbatch(["-N", "2", "--gres=gpu:4", "-o", str(out), str(job)],
                        env=_env(cluster, tmp_path, f"/tmp/ar{os.getpid()}d"), timeout=120)  # fmt: skip
    assert rc == 0, out.read_text()[-3000:]
    expected = {"gpus4": ["--gres=gpu:4"], "gpus0": [], "override": ["--gpus-per-node=4", "--gpu-bind=none"],
                "disabled": []}  # fmt: skip
    for name, gpu_flags in expected.items():
        lines = [shlex.split(line) for line in (tmp_path / f"{name}.txt").read_text().splitlines()
                 if line.startswith("srun ")]  # fmt: skip
        assert len(lines) == 2, (name, lines)
        gpus = "0" if name == "gpus0" else "4"
        for node, role, args in (("n1", "--head", lines[0]), ("n2", "--address=127.0.0.1:6379", lines[1])):
            srun_opts, command = args[: args.index("bash")], args[args.index("bash") :]
            assert srun_opts[srun_opts.index("-w") + 1] == node
            assert [a for a in srun_opts if a.startswith(("--gres", "--gpu"))] == gpu_flags, (name, srun_opts)
            # The step runs the GPU check with the node's name and GPU count, then `ray start`.
            assert command[:8] == ["bash", "-c", "$STEP_GPU_CHECK", "alia-step", node, gpus, "ray", "start"]
            assert f"--num-gpus={gpus}" in command and role in command
    assert not (tmp_path / "logs").exists()  # nothing started, nothing written


def test_ray_nodes_get_their_gpus_even_where_steps_get_none_by_default(cluster, tmp_path):
    """An exclusive job holds its nodes' GPUs, but SLURM gives a step none unless it asks: the launcher asks."""
    out = tmp_path / "job.out"
    ray_tmp = f"/tmp/ar{os.getpid()}g"
    env = _env(cluster, tmp_path, ray_tmp, ALIA_GPUS_PER_NODE="4", ALIA_COMMAND="show")
    rc = cluster.sbatch(["-N", "2", "--exclusive", "-o", str(out), str(SBATCH),
                         "recipe=sft-alia-2b-2n4g-megatron-cp2-actckpt"], env=env, timeout=600)  # fmt: skip
    log = out.read_text()
    assert rc == 0, log[-4000:]
    assert "node n1 joined Ray with 4 GPU(s)" in log and "node n2 joined Ray with 4 GPU(s)" in log
    assert "Ray cluster up: 2 node(s), 8 GPU(s)" in log and re.search(r"job raysubmit_\w+ finished with status 0", log)
    for node in ("n1", "n2"):
        step_log = (tmp_path / "logs" / f"ray-{node}.log").read_text()
        assert f"node {node}: the step sees 4 GPU(s) (CUDA_VISIBLE_DEVICES=0,1,2,3)" in step_log
    assert "Ray stopped on 2 node(s)" in log and _leftover_ray(ray_tmp) == ""


STEP_FAILURES = {
    "fewer_gpus_than_configured": (
        ["--gres=gpu:4"], {"ALIA_SRUN_GPU_FLAGS": "--gres=gpu:2"},
        ["node n1: this SLURM step sees 2 GPU(s) (CUDA_VISIBLE_DEVICES=0,1), ALIA_GPUS_PER_NODE=4"],
    ),
    "no_request_in_an_exclusive_job": (  # what the launcher did before it requested GPUs
        ["--exclusive"], {"ALIA_SRUN_GPU_FLAGS": ""},
        ["node n1: this SLURM step sees 0 GPU(s) (CUDA_VISIBLE_DEVICES unset and no nvidia-smi), ALIA_GPUS_PER_NODE=4"],
    ),
    "nvidia_smi_lists_fewer_gpus": (  # no GRES request: the step counts what `nvidia-smi -L` lists (a fake here)
        ["--exclusive"], {"ALIA_SRUN_GPU_FLAGS": ""},
        ["node n1: this SLURM step sees 2 GPU(s) (CUDA_VISIBLE_DEVICES unset; nvidia-smi -L lists 2), "
         "ALIA_GPUS_PER_NODE=4"],
    ),
    "job_without_gpus": (
        [], {},
        ["Invalid generic resource (gres) specification", "SLURM refused the step's GPU request", "--gres=gpu:4"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(STEP_FAILURES))
def test_a_step_without_the_configured_gpus_fails_before_ray_starts_and_names_the_node(cluster, tmp_path, case):
    sbatch_gpus, extra, messages = STEP_FAILURES[case]
    if case == "no_request_in_an_exclusive_job" and shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi is on PATH: the check would count this machine's GPUs")
    out = tmp_path / "job.out"
    ray_tmp = f"/tmp/ar{os.getpid()}f"
    env = _env(cluster, tmp_path, ray_tmp, ALIA_GPUS_PER_NODE="4", **extra)
    if case == "nvidia_smi_lists_fewer_gpus":
        fake = tmp_path / "bin" / "nvidia-smi"
        fake.parent.mkdir()
        # Two GPUs, one of them split into a MIG device (its line is not a GPU of its own).
        fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-1)'\n"
                        "echo '  MIG 1g.10gb     Device  0: (UUID: MIG-1)'\n")  # fmt: skip
        fake.chmod(0o755)
        env["PATH"] = f"{fake.parent}{os.pathsep}{env['PATH']}"
    rc = cluster.sbatch(["-N", "1", *sbatch_gpus, "-o", str(out), str(SBATCH)], env=env, timeout=120)
    log = out.read_text()
    assert rc != 0, log[-3000:]
    assert "Ray on node n1 exited" in log, log[-3000:]
    for message in messages:
        assert message in log, log[-3000:]
    assert not Path(ray_tmp, "n1").exists()  # `ray start` never ran
    assert _leftover_ray(ray_tmp) == ""


def test_a_ray_node_with_fewer_gpus_than_configured_fails_the_job_and_names_the_node(cluster, tmp_path):
    """The step sees its 4 GPUs, but Ray registers 2 (RAY_OVERRIDE_RESOURCES, as an autoscaler would set)."""
    out = tmp_path / "job.out"
    ray_tmp = f"/tmp/ar{os.getpid()}r"
    env = _env(cluster, tmp_path, ray_tmp, ALIA_GPUS_PER_NODE="4", RAY_OVERRIDE_RESOURCES='{"GPU": 2}')
    rc = cluster.sbatch(["-N", "1", "--gres=gpu:4", "-o", str(out), str(SBATCH)], env=env, timeout=300)
    log = out.read_text()
    assert rc != 0, log[-3000:]
    assert "node n1 joined Ray with 2 GPU(s), ALIA_GPUS_PER_NODE=4" in log, log[-3000:]
    assert "Ray stopped on 1 node(s)" in log and _leftover_ray(ray_tmp) == ""
