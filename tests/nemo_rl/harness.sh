#!/usr/bin/env bash
# Runs a command in the NeMo-RL CPU harness: real NeMo-RL v0.7.0 (../shared/nemo-rl-cpu: its source, the small
# patch that lets its DTensor v1 worker train on gloo/CPU, a Python 3.13 venv with its pinned dependencies) plus
# this project. The shared build is made (or reused) by the harness's own setup.sh and is never modified: this
# project goes into .venv-nemo-rl, a venv of the same Python that sees the harness's packages through a .pth file.
#
# Usage:  tests/nemo_rl/harness.sh python -m pytest -m nemo_rl     (what tests/run.sh and .ci/run do)
#         tests/nemo_rl/harness.sh alia-nemo train recipe=sft-alia-tiny-1n1g-dtensor engine.dtensor_worker=v1 ...
# Environment: ALIA_NEMO_RL_CPU (the harness folder, default ../shared/nemo-rl-cpu next to this checkout),
#              ALIA_NEMO_RL_CPU_DIR (where setup.sh builds, default its own ~/.cache/alia-nemo/nemo-rl-cpu-v0.7.0).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
harness=${ALIA_NEMO_RL_CPU:-$repo/../shared/nemo-rl-cpu}
build=${ALIA_NEMO_RL_CPU_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/alia-nemo/nemo-rl-cpu-v0.7.0}
if [[ ! -x $harness/setup.sh ]]; then
  echo "harness.sh: no NeMo-RL CPU harness at $harness (setup.sh); set ALIA_NEMO_RL_CPU to its folder" >&2
  exit 2
fi

# One build at a time per build folder (setup.sh starts by clearing an unfinished one); its output goes to a log.
mkdir -p "$(dirname "$build")"
if ! flock "$build.lock" "$harness/setup.sh" "$build" > "$build.log" 2>&1; then
  tail -n 40 "$build.log" >&2
  echo "harness.sh: building the NeMo-RL CPU harness failed (whole log: $build.log)" >&2
  exit 1
fi
# shellcheck disable=SC1091
source "$build/env.sh"

venv=$repo/.venv-nemo-rl
if [[ -e $venv && "$(cat "$venv/.harness" 2> /dev/null)" != "$NRL_PY" ]]; then
  if [[ ! -f $venv/.harness ]]; then
    echo "harness.sh: $venv exists and was not made by this script; move it away" >&2
    exit 2
  fi
  rm -rf "$venv"  # ours, made for another harness build
fi
if [[ ! -x $venv/bin/python ]]; then
  "$("$NRL_PY" -c 'import os, sys; print(os.path.realpath(sys.executable))')" -m venv "$venv"
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  harness_site=$("$NRL_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "import site; site.addsitedir('$harness_site')" > "$site/nemo_rl_harness.pth"
  echo "$NRL_PY" > "$venv/.harness"
fi
# Editable, with the harness's packages already satisfying our dependencies (pip adds only what they lack).
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "${repo}[test]" 2> >(grep -v "^WARNING: Location" >&2)

# NeMo-RL from the patched source; its workers start from NEMO_RL_VENV_DIR and get PYTHONPATH from the driver.
export PYTHONPATH=$NRL_CPU_SRC${PYTHONPATH:+:$PYTHONPATH}
export NEMO_RL_VENV_DIR NRL_DISABLE_NUMA_BINDING NRL_SRC NRL_CPU_SRC
export PATH=$venv/bin:$PATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
exec "$@"
