"""The embedded Ray of the local engine listens on loopback only, and what answers there without Ray's token.

``alia_nemo.engines.local._init_ray`` lists the listeners and why; these tests measure them on real runs: every
TCP socket in LISTEN state of every process of a training run (the driver and its whole process tree: GCS,
raylet, agents, autoscaler monitor, dashboard head, Ray Train's actors and the training workers), sampled while it
runs, must be bound to a loopback address; the only ones that answer an HTTP request without the token serve
Prometheus metrics; the GCS refuses a driver with a wrong token.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time

import psutil
import pytest

from alia_nemo.config.compose import load_config

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "alia_nemo.cli"]
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
# Ray's daemons, asked over HTTP whether they answer without the token (never the training workers: an HTTP request
# to the torch rendezvous store could disturb the run).
DAEMONS = ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "autoscaler monitor",
           "dashboard head")  # fmt: skip


def kind(proc: psutil.Process, driver: int) -> str:
    """What a process of the run is: driver, gcs_server, raylet, monitor, dashboard head or ``ray::<actor>``."""
    if proc.pid == driver:
        return "driver"
    cmd = proc.cmdline()
    text = " ".join(cmd)
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0].split(".")[0]  # ray::RayTrainWorker.train_fn -> ray::RayTrainWorker
    for name, marker in (("gcs_server", "/gcs_server"), ("raylet", "/raylet "), ("autoscaler monitor", "monitor.py"),
                         ("dashboard head", "dashboard.py")):  # fmt: skip
        if marker in text + " ":
            return name
    return proc.name()


def http_answer(port: int) -> str:
    """What a plain HTTP GET / on 127.0.0.1:``port`` gets: ``<status> <first bytes>``, or ``not HTTP``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return f"{resp.status} {resp.read(16)!r}"
    except (http.client.HTTPException, ConnectionError, OSError):
        return "not HTTP"
    finally:
        conn.close()


def sample_listeners(proc: subprocess.Popen, seen: dict, answers: dict) -> None:
    """Record every listening TCP socket of ``proc``'s process tree (and probe new daemon ports) until it exits."""
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for p in tree:
            try:
                what = kind(p, proc.pid)
                listening = [c.laddr for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
            except psutil.Error:  # ended meanwhile
                continue
            for addr in listening:
                seen.setdefault((what, addr.ip, addr.port), p.pid)
                if what in DAEMONS and (what, addr.port) not in answers:
                    answers[(what, addr.port)] = http_answer(addr.port)
        time.sleep(0.2)


def test_embedded_training_run_listens_on_loopback_only(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    argv = [*CLI, "train", f"run.output_dir={out}", "engine.num_workers=2", "engine.torch_threads=1", "stage.epochs=1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen: dict[tuple[str, str, int], int] = {}
    answers: dict[tuple[str, int], str] = {}
    try:
        sample_listeners(proc, seen, answers)
        output = proc.communicate(timeout=900)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    report = "\n".join(f"{what:28} {ip}:{port}" for what, ip, port in sorted(seen))
    print(report, "\n", answers)  # the facts the README states (pytest -s shows them)
    outside = sorted(key for key in seen if key[1] not in LOOPBACK)
    assert outside == [], f"listening beyond loopback: {outside}\n{report}"
    # The sample saw the whole cluster: the driver, Ray's daemons, and both training workers with their rendezvous.
    kinds = {what for what, _, _ in seen}
    assert {"driver", "gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= kinds, kinds
    workers = {pid for (what, _, _), pid in seen.items() if what == "ray::RayTrainWorker"}
    assert len(workers) == 2, report
    assert any(what == "ray::RayTrainWorker" and ip == "127.0.0.1" for what, ip, _ in seen), report  # TCPStore, gloo
    # Without the token: gRPC ports are not HTTP, the agents' HTTP servers answer 401, and only the metrics servers of
    # the autoscaler monitor and the dashboard head answer at all, with Prometheus text.
    for (what, port), answer in answers.items():
        if answer.startswith("200"):
            assert what in ("autoscaler monitor", "dashboard head") and "# HELP" in answer, (what, port, answer)
        else:
            assert answer in ("not HTTP", "401 b'Unauthorized'") or answer.startswith("401"), (what, port, answer)
    assert {answers[k] for k in answers if k[0] in ("gcs_server", "raylet")} == {"not HTTP"}
    assert all(answers[k].startswith("401") for k in answers if k[0] == "ray::RuntimeEnvAgent")


def test_embedded_gcs_refuses_a_driver_with_a_wrong_token(tmp_path):
    """The engine's own embedded start (``_init_ray``): a driver must present the cluster's token."""
    import ray

    from alia_nemo.engines import local

    assert not ray.is_initialized()
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE") if k in os.environ}
    try:
        assert local._init_ray(load_config([f"run.output_dir={tmp_path}"]))
        address = ray.get_runtime_context().gcs_address
        assert address.startswith("127.0.0.1:")
        assert os.environ.get(local.LOOPBACK_ENV) is None  # the switch was only for the start
        code = f"import ray; ray.init(address={address!r}, log_to_driver=False); print('CONNECTED')"
        # A second driver on this machine: it must look for the node on loopback too (or it resolves 127.0.0.1 to the
        # machine's outward address, where nothing listens).
        env = {**os.environ, "RAY_AUTH_MODE": "token", local.LOOPBACK_ENV: "0"}
        wrong = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_AUTH_TOKEN": "not-the-token"},
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert wrong.returncode != 0 and "CONNECTED" not in wrong.stdout
        assert "token" in (wrong.stdout + wrong.stderr).lower()
        right = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert right.returncode == 0 and "CONNECTED" in right.stdout, right.stderr[-2000:]
    finally:
        ray.shutdown()
        os.environ.update(saved)
