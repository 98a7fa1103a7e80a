"""Submit stages to a running Ray cluster through Ray's job API (what ``ray job submit`` does), safely.

The job's entrypoint is a fixed string (``python -m alia_nemo.launch.job_entry``); the user's command and
overrides travel as a JSON list in the job's runtime environment and are handed to our CLI as an
argument list, so no shell ever re-parses them (an override like ``run.output_dir=$(rm -rf ~)`` stays a
literal string). Only an allowlist of environment variables is forwarded (caches, offline flags, our
data locations); an ``--env`` pair whose name or value looks like a secret is refused, never forwarded,
printed or saved: Ray keeps a job's runtime environment in its job table and shows it in the dashboard and
``ray job`` output, so a secret there is readable by everyone who can reach the cluster.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from alia_nemo.errors import ConfigError

ARGV_VAR = "ALIA_NEMO_JOB_ARGV"
ENTRYPOINT = "python -m alia_nemo.launch.job_entry"
# Environment forwarded to the job as is (when set here): caches, offline switches, our data roots.
FORWARDED = (
    "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
    "ALIA_NEMO_CACHE", "ALIA_NEMO_PREPARED", "ALIA_NEMO_INTERNAL_DATA", "ALIA_NEMO_CPT_DATA", "TORCH_HOME",
)  # fmt: skip
# Secret-looking names, judged by the name's words (split at "_"), so TOKENIZERS_PARALLELISM or PYTHONPATH pass
# while DB_PASS, MYSQL_PWD, GH_PAT and HF_TOKEN do not.
SECRET_WORDS = frozenset(
    ("PASS", "PASSWD", "PASSWORD", "PASSWORDS", "PASSPHRASE", "PWD", "PGPASS", "SECRET", "SECRETS", "TOKEN", "TOKENS",
     "KEY", "KEYS", "APIKEY", "CREDENTIAL", "CREDENTIALS", "CREDS", "CRED", "AUTH", "PAT", "WEBHOOK", "WEBHOOKS",
     "PRIVATE", "COOKIE", "COOKIES", "SESSION", "DSN", "SAS", "SIGNATURE", "BEARER", "OTP")
)  # fmt: skip
# Fragments that mean a secret wherever they sit in a name (GITHUBTOKEN, MYAPIKEY, DBPASSWORD, ...).
SECRET_FRAGMENT = re.compile(
    r"PASSW|PASSPHRASE|SECRET|TOKEN(?!IZ)|CREDENTIAL|APIKEY|API_KEY|PRIVATE_?KEY|WEBHOOK|CONNECTION_?STRING|"
    r"CONN_?STR|COOKIE|ACCESS_?KEY",
    re.IGNORECASE,
)
# URLs/URIs of services that carry their credentials in the URL by convention (DATABASE_URL, REDIS_URL...).
SECRET_URL_NAME = re.compile(
    r"(^|_)(DATABASE|DB|REDIS|MONGO|MONGODB|POSTGRES|POSTGRESQL|PG|MYSQL|AMQP|RABBITMQ|BROKER|CACHE_REDIS|SQLALCHEMY"
    r"(_DATABASE)?)_(URL|URI)$",
    re.IGNORECASE,
)
# A name ending in these names a file or directory (HF_TOKEN_PATH, RAY_AUTH_TOKEN_PATH), not the secret itself:
# allowed when its value is a path, which is how a secret should travel (a file only its owner can read).
POINTER_SUFFIX = ("_PATH", "_FILE", "_DIR")
_START = r"(?<![\w/.-])"  # a token starts the value or follows a separator, not inside a path or a word
SECRET_VALUE = (
    (re.compile(_START + r"hf_[A-Za-z0-9]{20,}"), "a Hugging Face token"),
    (re.compile(_START + r"(gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"), "a GitHub token"),
    (re.compile(_START + r"glpat-[A-Za-z0-9_-]{16,}"), "a GitLab token"),
    (re.compile(_START + r"sk-[A-Za-z0-9_-]{16,}"), "an API secret key (sk-...)"),
    (re.compile(_START + r"xox[abposr]-[A-Za-z0-9-]{8,}"), "a Slack token"),
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{30,}"), "a Google API key"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "a JSON web token"),
    (re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY"), "a private key"),
    (re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@"), "a URL with a password (user:password@)"),
    (
        re.compile(r"[?&](access_token|token|api_?key|key|sig|signature|password|secret|auth)=[^&\s]", re.IGNORECASE),
        "a URL with credentials in its query",
    ),
    (
        re.compile(r"https://(hooks\.slack\.com/services|discord(app)?\.com/api/webhooks)/", re.IGNORECASE),
        "a webhook URL",
    ),
    (
        re.compile(r"(AccountKey|SharedAccessKey|SharedAccessSignature|Password|Pwd)=[^;\s]", re.IGNORECASE),
        "a connection string with a key or password",
    ),
    (re.compile(r"^(Bearer|Basic|Token)\s+\S{8,}", re.IGNORECASE), "an authorization header value"),
)
SECRET_ADVICE = (
    "it would be stored in Ray's job table and shown in its dashboard and logs, so it was not forwarded (the value "
    "is not shown). Give secrets to the job through the cluster itself: export them in the Ray nodes' environment "
    "before `ray start` (the SLURM launcher's environment, or the cluster's secret mechanism, e.g. a Kubernetes "
    "Secret), or keep the secret in a file only you can read and forward its path (e.g. --env "
    "HF_TOKEN_PATH=/home/you/.hf_token)"
)
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
COMMANDS = ("train", "pipeline", "prepare", "compile", "show")
DASHBOARD_PORT = 8265


def _entropy(text: str) -> float:
    """Shannon entropy in bits per character."""
    counts = {c: text.count(c) for c in set(text)}
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _looks_random(value: str) -> bool:
    """True for a long token-like run (random API keys, base64 secrets), false for paths, ids, words and hashes.

    Random keys mix upper case, lower case and digits and switch between them at nearly every character; paths,
    hub ids (``BSC-LT/ALIA-40b``) and names switch rarely. Pure hex (commit ids, checksums, UUIDs) is allowed: it is
    what ordinary ids look like, and hex secrets usually come under a secret-looking name.
    """
    runs = re.findall(r"[A-Za-z0-9+=_-]{24,}", value)  # "/" and "." split paths and host names
    if re.fullmatch(r"[A-Za-z0-9+][A-Za-z0-9+/]{23,}={0,2}", value):
        runs.append(value)  # base64 (with "/" inside) that is not an absolute path: judged whole
    for run in runs:
        core = run.strip("=")
        if re.fullmatch(r"[0-9a-fA-F-]+", core):
            continue
        classes = ["u" if c.isupper() else "l" if c.islower() else "d" if c.isdigit() else "" for c in core]
        classes = [c for c in classes if c]
        kinds = set(classes)
        # Digits are required: CamelCase names switch case often too, but carry no digits.
        mixed = kinds == {"u", "l", "d"} or (
            "d" in kinds and len(kinds) == 2 and classes.count("d") >= 0.2 * len(classes)
        )
        switches = sum(a != b for a, b in itertools.pairwise(classes))
        if len(classes) >= 20 and mixed and switches >= 0.4 * len(classes) and _entropy(core) >= 4.0:
            return True
    return False


def secret_reason(name: str, value: str) -> str | None:
    """Why ``NAME=VALUE`` looks like a secret (never quoting the value), or None when it looks ordinary."""
    for pattern, what in SECRET_VALUE:
        if pattern.search(value):
            return f"by its value, which looks like {what}"
    if _looks_random(value):
        return "by its value, which looks like a random key or token (a long high-entropy string)"
    upper = name.upper()
    pointer = upper.endswith(POINTER_SUFFIX) and re.match(r"(/|~|\./|\.\./|[A-Za-z]:\\)", value) is not None
    if pointer:
        return None  # a path to a secret file (HF_TOKEN_PATH=/home/me/.hf_token) is how a secret should travel
    if SECRET_URL_NAME.search(upper):
        return "by its name: such service URLs carry their credentials by convention"
    words = set(upper.split("_"))
    if words & SECRET_WORDS or SECRET_FRAGMENT.search(upper):
        return "by its name"
    return None


def job_address(address: str | None, job_id: str | None = None) -> str:
    """The job API's URL from ``--address``, else ``RAY_ADDRESS``: host[:port] or an http(s) URL.

    ``job_id`` names the job a ``jobs`` command asks about, so its error speaks of that job, not of submitting.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        if job_id:
            raise ConfigError(
                f"no Ray job API address to reach job {job_id}: pass --address http://HEAD:8265 or set RAY_ADDRESS "
                "(the head's dashboard / job API address the job was submitted to)"
            )
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
    for i, pair in enumerate(extra or [], 1):
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            # Not echoed: a pasted token without its NAME= would otherwise land in the terminal and logs.
            raise ConfigError(f"--env argument {i} (not shown): use NAME=VALUE, NAME of letters, digits and _")
        reason = secret_reason(key, value)
        if reason:
            raise ConfigError(f"--env {key}: looks like a secret ({reason}); {SECRET_ADVICE}")
        env[key] = value
    import alia_nemo

    package_root = str(Path(alia_nemo.__file__).resolve().parent.parent)
    if "site-packages" not in package_root:  # a source checkout on a shared filesystem
        # Prepended, not replacing: the cluster's own PYTHONPATH (NeMo-RL's source, say) must stay. Ray expands
        # ${VAR} in runtime-env variables from the node's environment (to nothing when unset).
        env["PYTHONPATH"] = f"{package_root}{os.pathsep}${{PYTHONPATH}}"
    return {"env_vars": env}


def _client(address: str | None, job_id: str | None = None):
    from ray.job_submission import JobSubmissionClient

    url = job_address(address, job_id)
    try:
        return JobSubmissionClient(url)
    except Exception as exc:  # connection refused, auth, version mismatch: all mean "not usable"
        raise ConfigError(
            f"can not reach Ray's job API at {url}: {exc}. Is the cluster up (ray status) and is this the "
            "dashboard port? With token auth, RAY_AUTH_TOKEN_PATH must point at the cluster's token."
        ) from None


AGENT_RETRIES = 6  # about a minute in all


def submit(command: str, overrides: list[str], address: str | None = None, env: list[str] | None = None) -> str:
    """Submit ``alia-nemo COMMAND OVERRIDES...`` as a Ray job; return its id."""
    if command not in COMMANDS:
        raise ConfigError(f"alia-nemo submit runs one of {COMMANDS}, not {command!r}")
    renv = runtime_env(env)
    renv["env_vars"][ARGV_VAR] = json.dumps([command, *overrides])
    client = _client(address)
    delay = 1.0
    for attempt in range(AGENT_RETRIES + 1):
        try:
            return client.submit_job(entrypoint=ENTRYPOINT, runtime_env=renv)
        except RuntimeError as exc:  # the job API's HTTP errors
            # A head that has just started answers 500 "No available agent" until its dashboard agent is up.
            if "No available agent" in str(exc) and attempt < AGENT_RETRIES:
                print(f"[alia-nemo] the job API has no agent yet; retrying in {delay:.0f} s", file=sys.stderr)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            raise ConfigError(f"Ray's job API at {job_address(address)} refused the job: {exc}") from None
    raise AssertionError("unreachable")


def follow(job_id: str, address: str | None = None) -> None:
    """Stream the job's driver log to stdout until it ends."""
    import asyncio

    client = _client(address, job_id)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def wait(job_id: str, address: str | None = None, poll_s: float = 2.0) -> str:
    """Block until the job is finished; return its final status name."""
    while True:
        status = str(_api(lambda c: c.get_job_status(job_id), address, job_id).value)
        if status in EXIT_CODES:
            return status
        time.sleep(poll_s)


def status(job_id: str, address: str | None = None) -> dict[str, Any]:
    """The job's status, message, times and entrypoint arguments."""
    info = _api(lambda c: c.get_job_info(job_id), address, job_id)
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
    """The job's driver log so far."""
    return _api(lambda c: c.get_job_logs(job_id), address, job_id)


def stop(job_id: str, address: str | None = None) -> bool:
    """Ask Ray to stop the job; False if it had already ended."""
    return bool(_api(lambda c: c.stop_job(job_id), address, job_id))


def _api(call: Any, address: str | None, job_id: str) -> Any:
    """One job API call; its HTTP errors (an unknown job id, say) become one clear error."""
    try:
        return call(_client(address, job_id))
    except RuntimeError as exc:
        raise ConfigError(f"Ray's job API at {job_address(address)}, job {job_id}: {exc}") from None
