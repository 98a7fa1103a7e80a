"""launchers/slurm/alia-ray.sbatch on a real two-node SLURM, Ray processes started through srun.

The cluster (munge, slurmctld, two slurmd on one host) and every Ray process run in a network
namespace with only loopback; the container runtime is `none`. See tests/launchers/slurm_cluster.py.
"""

from __future__ import annotations

import os
import re
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
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield c.start()
    finally:
        c.stop()


def _env(cluster: SlurmCluster, tmp: Path, ray_tmp: str) -> dict[str, str]:
    return cluster.env(
        ALIA_RUNTIME="none", ALIA_GPUS_PER_NODE="0", ALIA_CPUS_PER_NODE="2", ALIA_LOG_DIR=str(tmp / "logs"),
        ALIA_RAY_TMP=ray_tmp, ALIA_JOIN_TIMEOUT="180", ALIA_POLL_S="2",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        ALIA_NEMO_PREPARED=os.environ["ALIA_NEMO_PREPARED"], ALIA_NEMO_CACHE=os.environ["ALIA_NEMO_CACHE"],
        HF_TOKEN="hf_secret_must_not_leak",
    )  # fmt: skip


def test_job_runs_on_a_two_node_ray_cluster_and_its_status_is_the_slurm_status(cluster, tmp_path):
    out = tmp_path / "job.out"
    ray_tmp = f"/tmp/ar{os.getpid()}a"
    proc = cluster.run(
        ["sbatch", "--wait", "-N", "2", "-o", str(out), str(SBATCH), "stage.max_steps=3",
         f"run.output_dir={tmp_path / 'run'}"],
        env=_env(cluster, tmp_path, ray_tmp), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = out.read_text()
    assert proc.returncode == 0, log[-4000:]
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
    leftover = subprocess.run(["pgrep", "-f", f"--temp-dir={ray_tmp}"], capture_output=True, text=True).stdout
    assert leftover.strip() == ""  # Ray torn down


def test_a_dying_worker_ends_the_slurm_job_promptly_and_names_the_node(cluster, tmp_path):
    out = tmp_path / "job.out"
    ray_tmp = f"/tmp/ar{os.getpid()}b"
    job = cluster.popen(
        ["sbatch", "--wait", "-N", "2", "-o", str(out), str(SBATCH), "stage.max_steps=100000",
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
