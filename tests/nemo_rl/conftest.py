"""Fixtures for the NeMo-RL tests: the tiny one-GPU recipe compiled, and a Ray head for NeMo-RL's training loop.

The training tests run real NeMo-RL v0.7.0 (tests/nemo_rl/harness.sh: its CPU harness on a CPU machine, or its
container). ``sft.setup`` always asks Ray for GPUs, so the head advertises one; on a CPU the harness's DTensor
v1 worker trains on it with gloo.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import NEMO_RL_TINY as TINY


@pytest.fixture(scope="session")
def tiny_compiled(tmp_path_factory, _isolated_cache):
    """(composed config, compiled NeMo-RL config) of the tiny recipe, its mixture prepared and model written."""
    from alia_nemo.config.compose import load_config
    from alia_nemo.engines.nemo_rl_prepare import compile_stage

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config([f"recipe={TINY}", f"run.output_dir={out}"])
    return cfg, compile_stage(cfg, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_api_up(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.HTTPError:
        return True  # any HTTP answer: the job API is serving
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def ray_gpu_head(_isolated_cache):
    """A Ray head advertising one GPU, its job API on loopback; ``RAY_ADDRESS`` points at it for the session.

    Yields the job API's URL. Started with ``--block`` in its own session so that it, and every process it
    started, can be stopped without touching any other Ray on the machine.
    """
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port, dashboard = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (temp / "head.log").open("w")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-gpus=1", "--num-cpus=4",
         f"--port={port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{dashboard}"
    before = os.environ.get("RAY_ADDRESS")
    try:
        deadline = time.time() + 180
        while not _job_api_up(f"{url}/api/version"):
            assert head.poll() is None, f"ray head exited:\n{(temp / 'head.log').read_text()[-3000:]}"
            assert time.time() < deadline, "Ray's job API did not come up in 180 s"
            time.sleep(1)
        # Under load a head has been seen to die just after its job API answered; a driver would then hang in
        # ray.init. Fail here, with the head's log, instead.
        time.sleep(3)
        assert head.poll() is None and _job_api_up(f"{url}/api/version"), (
            f"ray head died after starting:\n{(temp / 'head.log').read_text()[-3000:]}"
        )
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        yield url
    finally:
        if before is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = before
        _stop(head, temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _stop(head: subprocess.Popen, temp: Path) -> None:
    """TERM, then KILL, the head's process group, then any process of this Ray session left elsewhere."""
    import psutil

    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
            head.wait(timeout=wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(temp) in arg for arg in proc.info["cmdline"] or []):
            proc.kill()
