#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install seqserve into it with
# everything needed to export, serve, benchmark and test. Safe to run again: it only installs
# what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating virtual environment .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.seqserve-installed
# Reinstall when the project's declared dependencies change.
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "==> .venv is up to date"
  exit 0
fi
echo "==> installing torch (CPU) and seqserve[server,export,dev] into .venv"
$VPY -m pip install -q --upgrade pip
# torch first, pinned, so the project's torch range is already satisfied and no CUDA build is pulled.
$VPY -m pip install -q "torch==2.13.0"
$VPY -m pip install -q -e ".[server,export,bench,dev]"
echo "$want" > "$stamp"
echo "==> environment ready"
