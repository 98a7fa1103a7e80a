"""`submit --env`: secret-looking names and values are refused (named, never echoed, with the way to pass secrets);
ordinary settings and everything the project forwards itself still go through."""

from __future__ import annotations

import pytest

from alia_nemo.cli import main
from alia_nemo.errors import ConfigError
from alia_nemo.launch.submit import FORWARDED, runtime_env, secret_reason

# Built at run time so that no secret scanner flags this file; each is shaped like the real thing.
SECRET_VALUES = {
    "hugging face": "hf_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZaBcDeFgH",
    "github classic": "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
    "github oauth": "gho_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
    "github fine-grained": "github_pat_" + "11ABCDEFG0abcdefghij_KLMNOPQRSTuvwxyz0123456789",
    "openai-style": "sk-" + "proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv",
    "slack": "xoxb-" + "1234567890-0987654321-AbCdEfGhIjKl",
    "aws key id": "AKIA" + "IOSFODNN7EXAMPLE",
    "jwt": "eyJ" + "hbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "pem": "-----BEGIN " + "OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----",
    "rsa pem": "-----BEGIN " + "RSA PRIVATE KEY-----",
    "url with password": "postgresql://alice:" + "S3cretPw@db.internal:5432/app",
    "url with token query": "https://storage.example.com/bucket/obj?sig=" + "abcdef0123",
    "slack webhook": "https://hooks.slack.com/services/" + "T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
    "azure connection": "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=" + "q8Z+w==;EndpointSuffix=x",
    "random base62": "Zx8" + "Qm2Lp7Rv4Tn9Wk3Yb6Hc1Jd5Fg0Ns2Ae7",
    "random base64": "k3J9" + "+aPq2/Zr8WmX1vB6nT4yH0cLs7dQ=",
}
SECRET_NAMES = [
    "DB_PASS", "MYSQL_PWD", "PGPASS", "DATABASE_URL", "GH_PAT", "SLACK_WEBHOOK_URL", "AZURE_STORAGE_CONNECTION_STRING",
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID", "SSH_KEY", "DB_PASSWORD", "SMTP_PASSWD", "GITHUBTOKEN", "MYAPIKEY", "OPENAI_API_KEY",
    "SENTRY_DSN", "REDIS_URL", "MONGODB_URI", "BASIC_AUTH", "GOOGLE_APPLICATION_CREDENTIALS", "GPG_PRIVATE",
    "SESSION_COOKIE", "DJANGO_SECRET_KEY", "JWT_SIGNING_KEY", "NPM_TOKEN",
]  # fmt: skip
ORDINARY = {
    "HF_HOME": "/gpfs/projects/bsc88/hf",
    "MODEL_ID": "BSC-LT/ALIA-40b",
    "MAX_JOBS": "12345",
    "TOKENIZERS_PARALLELISM": "false",
    "CUDA_VISIBLE_DEVICES": "0,1,2,3",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "NCCL_DEBUG": "INFO",
    "OMP_NUM_THREADS": "8",
    "HF_ENDPOINT": "https://huggingface.co",
    "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
    "WANDB_MODE": "offline",
    "OUTPUT": "/gpfs/scratch/bsc88/outputs/ALIA-40b-instruct-2512-Q8/checkpoints/checkpoint-1000",
    "RELATIVE": "outputs/ALIA40b/run3/step1000/final",
    "GIT_REV": "3f9a2c1d0b8e7f6a5c4d3e2f1a0b9c8d7e6f5a4b",  # commit ids and digests are hex: ordinary
    "RUN_ID": "550e8400-e29b-41d4-a716-446655440000",
    "EXPERIMENT": "MyVeryLongExperimentNameForTheRun",
    "HF_TOKEN_PATH": "/home/me/.cache/huggingface/token",  # the path to a secret, the way to pass one
    "RAY_AUTH_TOKEN_PATH": "/gpfs/logs/alia/ray-token",
}


def test_the_issue_names_and_more_are_refused_naming_the_variable():
    for name in SECRET_NAMES:
        with pytest.raises(ConfigError, match=rf"--env {name}: looks like a secret \(by its name") as err:
            runtime_env([f"{name}=innocent-looking"], {})
        assert "innocent-looking" not in str(err.value)


@pytest.mark.parametrize("kind", sorted(SECRET_VALUES))
def test_secret_looking_values_are_refused_without_echoing_them(kind):
    value = SECRET_VALUES[kind]
    with pytest.raises(ConfigError, match=r"--env MY_SETTING: looks like a secret \(by its value") as err:
        runtime_env([f"MY_SETTING={value}"], {})
    message = str(err.value)
    assert value not in message and value.splitlines()[0][:12] not in message
    # The fix is in the message: the cluster's own environment / secret mechanism, or a path to a file.
    assert "Ray nodes' environment" in message and "secret mechanism" in message and "HF_TOKEN_PATH" in message
    assert "\n" not in message


def test_ordinary_settings_and_the_forwarded_allowlist_pass():
    env = runtime_env([f"{k}={v}" for k, v in ORDINARY.items()], {})["env_vars"]
    assert {k: env[k] for k in ORDINARY} == ORDINARY
    for name in FORWARDED:  # what the project forwards itself must also work through --env
        assert secret_reason(name, "/gpfs/cache") is None, name
        assert secret_reason(name, "1") is None, name


def test_a_secret_file_pointer_still_needs_a_path_and_a_harmless_value():
    assert secret_reason("HF_TOKEN_PATH", "/home/me/.hf_token") is None
    assert secret_reason("HF_TOKEN_PATH", "not-a-path") == "by its name"
    assert "Hugging Face token" in (secret_reason("HF_TOKEN_PATH", SECRET_VALUES["hugging face"]) or "")


def test_a_malformed_pair_is_not_echoed():
    token = SECRET_VALUES["hugging face"]
    with pytest.raises(ConfigError, match=r"--env argument 2 \(not shown\): use NAME=VALUE") as err:
        runtime_env(["OK=1", token], {})
    assert token not in str(err.value)


def test_cli_exits_2_with_one_line_and_no_value(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    value = SECRET_VALUES["url with password"]
    assert main(["submit", "--env", f"DATABASE_URL={value}", "stage.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alia-nemo submit: error: --env DATABASE_URL: looks like a secret")
    assert value not in err and "S3cretPw" not in err and len(err.strip().splitlines()) == 1
