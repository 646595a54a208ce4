#!/usr/bin/env bash
# Set up .venv (if needed), run the static checks (scripts/lint.sh) and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
exec .venv/bin/pytest -q --durations=15 "$@"
