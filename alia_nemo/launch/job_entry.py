"""Entrypoint of jobs sent by ``alia-nemo submit``: run the CLI on the argument list from the environment.

The arguments arrive as JSON in ``ALIA_NEMO_JOB_ARGV`` and go to :func:`alia_nemo.cli.main` as a list:
no shell parses them.
"""

from __future__ import annotations

import json
import os
import sys

from alia_nemo.launch.submit import ARGV_VAR


def main() -> int:
    raw = os.environ.get(ARGV_VAR)
    if not raw:
        print(
            f"alia_nemo.launch.job_entry: {ARGV_VAR} is not set; submit jobs with `alia-nemo submit`", file=sys.stderr
        )
        return 2
    argv = json.loads(raw)
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        print(f"alia_nemo.launch.job_entry: {ARGV_VAR} must be a JSON list of strings", file=sys.stderr)
        return 2
    from alia_nemo.cli import main as cli_main

    print(f"[alia-nemo] job argv: {argv}", flush=True)
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
