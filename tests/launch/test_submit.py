"""`alia-nemo submit` / `jobs` against a real Ray head (`ray start --head`) in a loopback-only namespace."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alia_nemo.errors import ConfigError
from alia_nemo.launch.submit import job_address, runtime_env

VENV_BIN = str(Path(sys.executable).parent)
# Any HTTP answer means the job API is up (under token auth an unauthenticated call gets 401).
JOB_API_PROBE = (
    "import sys, urllib.error, urllib.request\n"
    "try:\n    urllib.request.urlopen(sys.argv[1], timeout=5)\nexcept urllib.error.HTTPError:\n    pass\n"
)


def test_runtime_env_forwards_the_allowlist_and_never_secrets():
    environ = {"HF_HOME": "/gpfs/hf", "HF_HUB_OFFLINE": "1", "ALIA_NEMO_PREPARED": "/p", "HF_TOKEN": "hf_x",
               "WANDB_API_KEY": "k", "AWS_SECRET_ACCESS_KEY": "s", "HOME": "/root"}  # fmt: skip
    env = runtime_env(["MY_FLAG=1"], environ)["env_vars"]
    assert {k: env[k] for k in ("HF_HOME", "HF_HUB_OFFLINE", "ALIA_NEMO_PREPARED", "MY_FLAG")} == {
        "HF_HOME": "/gpfs/hf", "HF_HUB_OFFLINE": "1", "ALIA_NEMO_PREPARED": "/p", "MY_FLAG": "1"}  # fmt: skip
    assert not {"HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "HOME"} & set(env)
    # A source checkout goes in front of the cluster's own PYTHONPATH (Ray expands ${PYTHONPATH} on the node).
    assert env["PYTHONPATH"] == f"{Path(__file__).resolve().parents[2]}{os.pathsep}${{PYTHONPATH}}"
    for bad in ("HF_TOKEN=x", "WANDB_API_KEY=x", "DB_PASSWORD=x", "SSH_KEY=x"):
        with pytest.raises(ConfigError, match="looks like a secret"):
            runtime_env([bad], environ)
    with pytest.raises(ConfigError, match="use NAME=VALUE"):
        runtime_env(["no-equals"], environ)


def test_job_address_forms(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert job_address("10.0.0.1") == "http://10.0.0.1:8265"
    assert job_address("10.0.0.1:9000") == "http://10.0.0.1:9000"
    assert job_address("https://head:443") == "https://head:443"
    with pytest.raises(ConfigError, match="--address"):
        job_address(None)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head with token auth in its own network namespace; yields a runner for commands inside it."""
    if os.geteuid() != 0 or not shutil.which("nsenter"):
        pytest.skip("needs root and nsenter for a network namespace")
    root = tmp_path_factory.mktemp("rayhead")
    ns = f"alia-ray-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
    token = root / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")  # fmt: skip
    prefix = ["nsenter", f"--net=/run/netns/{ns}"]
    temp = f"/tmp/rs{os.getpid()}"
    head = subprocess.Popen(
        [*prefix, "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--port=6380",
         "--dashboard-host=127.0.0.1", "--dashboard-port=8265", "--num-cpus=2", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip

    def run(args, timeout=600):
        return subprocess.run([*prefix, *args], env=env, capture_output=True, text=True, timeout=timeout)

    # The job API (dashboard) comes up after the GCS, slower on a cold machine: wait for it, not `ray status`.
    probe = [sys.executable, "-c", JOB_API_PROBE, "http://127.0.0.1:8265/api/version"]
    try:
        for _ in range(180):
            if run(probe, timeout=30).returncode == 0:
                break
            assert head.poll() is None, "ray head exited"
            time.sleep(1)
        else:
            pytest.fail("Ray's job API did not come up in 180 s")
        yield run
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns])
        shutil.rmtree(temp, ignore_errors=True)


CLI = [sys.executable, "-m", "alia_nemo.cli"]
ADDR = ["--address", "127.0.0.1:8265"]


@pytest.mark.slow
def test_submit_wait_runs_the_job_and_overrides_never_reach_a_shell(ray_head, tmp_path):
    canary = tmp_path / "pwned"
    out = tmp_path / "run"
    override = f'run.output_dir="{out}/$(touch {canary})"'
    proc = ray_head([*CLI, "submit", *ADDR, "--wait", "stage.max_steps=2", override])
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.strip().splitlines()[0]
    assert job_id.startswith("raysubmit_") and "SUCCEEDED" in proc.stderr
    assert not canary.exists()  # the $(...) stayed text: it named a directory instead of running
    assert (out / f"$(touch {canary})" / "final" / "model.safetensors").is_file()
    status = json.loads(ray_head([*CLI, "jobs", "status", job_id, *ADDR]).stdout)
    assert status["status"] == "SUCCEEDED" and status["argv"] == ["train", "stage.max_steps=2", override]
    logs = ray_head([*CLI, "jobs", "logs", job_id, *ADDR]).stdout
    assert "[alia-nemo] done: 2 steps" in logs


@pytest.mark.slow
def test_failed_and_stopped_jobs_give_their_exit_codes(ray_head, tmp_path):
    failed = ray_head([*CLI, "submit", *ADDR, "--wait", "stage.lr=-1"])
    assert failed.returncode == 1 and "FAILED" in failed.stderr
    job_id = ray_head([*CLI, "submit", *ADDR, "stage.epochs=100000", f"run.output_dir={tmp_path}"]).stdout.strip()
    time.sleep(5)
    stop = ray_head([*CLI, "jobs", "stop", job_id, *ADDR])
    assert stop.returncode == 0 and "stop requested" in stop.stdout

    env_before = os.environ.copy()
    waited = ray_head(
        [sys.executable, "-c", f"from alia_nemo.launch import submit; print(submit.wait({job_id!r}, '127.0.0.1:8265'))"]
    )
    assert waited.stdout.strip() == "STOPPED"
    assert os.environ == env_before


@pytest.mark.slow
def test_submitted_prepare_tokenises_on_the_cluster_and_writes_what_a_local_prepare_writes(ray_head, tmp_path):
    proc = ray_head([*CLI, "submit", *ADDR, "--wait", "--run", "prepare", "data.workers=2",
                     f"data.prepared_root={tmp_path}/cluster"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.strip().splitlines()[0]
    logs = ray_head([*CLI, "jobs", "logs", job_id, *ADDR]).stdout
    assert "checking and tokenising on 2 Ray actor(s) on 127.0.0.1:6380" in logs, logs[-2000:]
    local = subprocess.run([*CLI, "prepare", "data.workers=1", f"data.prepared_root={tmp_path}/local"],
                           capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})  # fmt: skip
    assert local.returncode == 0, local.stderr[-2000:]

    def shards(root):
        (built,) = [d for d in Path(root).iterdir() if (d / "manifest.json").is_file()]
        return built.name, {p.name: p.read_bytes() for p in sorted(built.glob("*.parquet"))}

    assert shards(tmp_path / "cluster") == shards(tmp_path / "local")  # same key, same bytes


def test_submit_without_a_cluster_explains(tmp_path, monkeypatch, capsys):
    from alia_nemo.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["submit", "stage.max_steps=1"]) == 2
    assert "no Ray cluster to submit to" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["jobs", "status", "raysubmit_42"], ["jobs", "logs", "raysubmit_42"],
                                  ["jobs", "stop", "raysubmit_42"]])  # fmt: skip
def test_jobs_without_an_address_speak_of_the_job(argv, monkeypatch, capsys):
    from alia_nemo.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("alia-nemo jobs: error: no Ray job API address to reach job raysubmit_42: pass --address "
                          "http://HEAD:8265 or set RAY_ADDRESS")  # fmt: skip
    assert "submit" in err.split("(")[-1] and "no Ray cluster to submit to" not in err
