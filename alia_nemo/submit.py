"""Submit stages to a running Ray cluster through Ray's job API (what ``ray job submit`` does), safely.

The job's entrypoint is a fixed string (``python -m alia_nemo.job_entry``); the user's command and
overrides travel as a JSON list in the job's runtime environment and are handed to our CLI as an
argument list, so no shell ever re-parses them (an override like ``run.output_dir=$(rm -rf ~)`` stays a
literal string). Only an allowlist of environment variables is forwarded (caches, offline flags, our
data locations); anything that looks like a secret is refused, never forwarded, printed or saved.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from alia_nemo.config_schema import ConfigError

ARGV_VAR = "ALIA_NEMO_JOB_ARGV"
ENTRYPOINT = "python -m alia_nemo.job_entry"
# Environment forwarded to the job as is (when set here): caches, offline switches, our data roots.
FORWARDED = (
    "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
    "ALIA_NEMO_CACHE", "ALIA_NEMO_PREPARED", "ALIA_NEMO_INTERNAL_DATA", "ALIA_NEMO_CPT_DATA", "TORCH_HOME",
)  # fmt: skip
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|CREDENTIAL|PRIVATE|(^|_)KEY$", re.IGNORECASE)
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
COMMANDS = ("train", "pipeline", "prepare", "compile", "show")
DASHBOARD_PORT = 8265


def job_address(address: str | None) -> str:
    """The job API's URL from ``--address``, else ``RAY_ADDRESS``: host[:port] or an http(s) URL."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError(
            "no Ray cluster to submit to: pass --address http://HEAD:8265 or set RAY_ADDRESS "
            "(the head's dashboard / job API address)"
        )
    if "://" not in address:
        host, _, port = address.partition(":")
        address = f"http://{host}:{port or DASHBOARD_PORT}"
    return address


def runtime_env(extra: list[str] | None = None, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The job's runtime environment: forwarded allowlist + ``--env`` pairs + our package on PYTHONPATH."""
    environ = dict(os.environ if environ is None else environ)
    env = {k: environ[k] for k in FORWARDED if k in environ}
    for pair in extra or []:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"--env {pair!r}: use NAME=VALUE")
        if SECRET_NAME.search(key):
            raise ConfigError(
                f"--env {key}: looks like a secret; it would be stored in Ray's job table and logs. Put it in the "
                "cluster's own environment (or a file readable only by you) instead"
            )
        env[key] = value
    import alia_nemo

    package_root = str(Path(alia_nemo.__file__).resolve().parent.parent)
    if "site-packages" not in package_root:  # a source checkout on a shared filesystem
        # Prepended, not replacing: the cluster's own PYTHONPATH (NeMo-RL's source, say) must stay. Ray expands
        # ${VAR} in runtime-env variables from the node's environment (to nothing when unset).
        env["PYTHONPATH"] = f"{package_root}{os.pathsep}${{PYTHONPATH}}"
    return {"env_vars": env}


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    url = job_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as exc:  # connection refused, auth, version mismatch: all mean "not usable"
        raise ConfigError(
            f"can not reach Ray's job API at {url}: {exc}. Is the cluster up (ray status) and is this the "
            "dashboard port? With token auth, RAY_AUTH_TOKEN_PATH must point at the cluster's token."
        ) from None


def submit(command: str, overrides: list[str], address: str | None = None, env: list[str] | None = None) -> str:
    """Submit ``alia-nemo COMMAND OVERRIDES...`` as a Ray job; return its id."""
    if command not in COMMANDS:
        raise ConfigError(f"alia-nemo submit runs one of {COMMANDS}, not {command!r}")
    renv = runtime_env(env)
    renv["env_vars"][ARGV_VAR] = json.dumps([command, *overrides])
    return _client(address).submit_job(entrypoint=ENTRYPOINT, runtime_env=renv)


def follow(job_id: str, address: str | None = None) -> None:
    """Stream the job's driver log to stdout until it ends."""
    import asyncio

    client = _client(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def wait(job_id: str, address: str | None = None, poll_s: float = 2.0) -> str:
    """Block until the job is finished; return its final status name."""
    client = _client(address)
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in EXIT_CODES:
            return status
        time.sleep(poll_s)


def status(job_id: str, address: str | None = None) -> dict[str, Any]:
    """The job's status, message, times and entrypoint arguments."""
    info = _client(address).get_job_info(job_id)
    env = (info.runtime_env or {}).get("env_vars", {})
    return {
        "job_id": job_id,
        "status": str(info.status.value),
        "message": info.message,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "argv": json.loads(env.get(ARGV_VAR, "[]")),
    }


def logs(job_id: str, address: str | None = None) -> str:
    return _client(address).get_job_logs(job_id)


def stop(job_id: str, address: str | None = None) -> bool:
    return bool(_client(address).stop_job(job_id))
