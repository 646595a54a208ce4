#!/usr/bin/env bash
# Static checks: ruff (lint and format), mypy, and the import-linter architecture contracts in
# pyproject.toml. scripts/test.sh runs this first, so CI does too.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin=$root/.venv/bin
echo "==> ruff"
"$bin/ruff" check .
"$bin/ruff" format --check .
# mypy and import-linter read an installed copy: the product's folders are mapped under `seqserve`
# with package-dir, which neither tool follows through an editable install.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin/python" -m pip install -q --no-deps --no-build-isolation --target "$work/site" . >"$work/pip.log" 2>&1 \
  || { cat "$work/pip.log"; exit 1; }
cd "$work"
echo "==> mypy"
mypy=("$bin/mypy" --config-file "$root/pyproject.toml" --python-executable "$bin/python" --cache-dir "$work/.mypy_cache")
MYPYPATH="$work/site" "${mypy[@]}" -p seqserve
MYPYPATH="$work/site" "${mypy[@]}" --strict -p seqserve.client  # the SDK ships py.typed
echo "==> import-linter"
PYTHONPATH="$work/site" "$bin/lint-imports" --no-cache "$root/pyproject.toml"
