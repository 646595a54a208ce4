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
# System tools of the deployment tests (tests/test_deploy_*.py): promtool (Debian's prometheus
# package), and podman, runc and debootstrap for the real container test. Installed only when this
# runs as root with apt-get (CI); elsewhere those tests skip and say why.
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
for tool in podman runc debootstrap; do
  PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> installing ${need[*]} with apt-get"
  apt_log=$(mktemp)
  # with the recommended packages: podman's (fuse-overlayfs, catatonit, ...) are what it was tested with
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } >"$apt_log" 2>&1; then
    echo "warning: apt-get could not install ${need[*]}; the tests needing them will skip (log: $apt_log)"
  else
    rm -f "$apt_log"
  fi
fi
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
