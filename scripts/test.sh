#!/usr/bin/env bash
# Install fedretain with its tested pins into .venv and run the whole test suite.
# `scripts/test.sh --lint [pytest args]` first runs the static checks (ruff, mypy, import contracts:
# scripts/lint.py) and stops if they fail; CI (.ci/run) does this.
# pytest's exit code 5 ("no tests collected") is turned into a failure: a suite that ran nothing must not pass.
set -uo pipefail
cd "$(dirname "$0")/.."
lint=0
if [ "${1:-}" = "--lint" ]; then lint=1; shift; fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt -e '.[test]' || exit 1
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
if [ "$lint" -eq 1 ]; then
    python scripts/lint.py || { echo "static checks failed: not running the suite" >&2; exit 1; }
fi
python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
