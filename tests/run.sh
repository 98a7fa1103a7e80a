#!/usr/bin/env bash
# The test command (README, .ci/run): the suite in .venv, then the `nemo_rl`-marked tests in the NeMo-RL CPU
# harness (real NeMo-RL v0.7.0, see tests/nemo_rl/harness.sh), where they run instead of being skipped.
# Arguments go to both pytest runs (e.g. -x, -k NAME). Needs .venv (README's set-up) and ../shared/nemo-rl-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
status=0
.venv/bin/python -m pytest -m "not nemo_rl" "$@" || status=$?
tests/nemo_rl/harness.sh python -m pytest -m nemo_rl "$@" || status=$?
exit "$status"
