#!/usr/bin/env bash
# Build the Python and Node bindings (debug) and run their smoke tests.
# Run from the repository root: scripts/test-bindings.sh
set -euo pipefail

cd "$(dirname "$0")/.."
start=$SECONDS
step() { printf '\n==> %s\n' "$*"; }

for tool in cargo python3 node npm; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found on PATH" >&2; exit 1; }
done

# --- Python ------------------------------------------------------------------
if ! .venv/bin/python -c '' 2>/dev/null; then
  step "creating .venv"
  rm -rf .venv
  if ! python3 -m venv .venv; then
    # Debian ships venv/ensurepip separately.
    [[ $(id -u) -eq 0 ]] || { echo "error: python3 -m venv failed; install python3-venv" >&2; exit 1; }
    rm -rf .venv
    apt-get update -qq
    apt-get install -y -qq python3-venv
    python3 -m venv .venv
  fi
fi
export VIRTUAL_ENV="$PWD/.venv" PIP_DISABLE_PIP_VERSION_CHECK=1
py=.venv/bin/python

step "installing maturin, pytest, mypy, ruff, starlette, uvicorn, httpx, openai, anthropic, standardwebhooks, runcycles"
$py -m pip install -q 'maturin>=1.9.4,<2' 'pytest>=8' 'mypy>=1.10' 'ruff>=0.6' \
  'starlette>=0.37' 'uvicorn>=0.30' 'httpx>=0.27' 'openai>=1.40' 'anthropic>=0.40' 'standardwebhooks>=1.1' \
  'runcycles>=0.5.3,<0.6'

step "ruff (lint and format check)"
.venv/bin/ruff check bindings-python/python tests/python tests/fakes examples/python bench/python scripts/redis_harness.py
.venv/bin/ruff format --check bindings-python/python tests/python tests/fakes examples/python bench/python scripts/redis_harness.py

step "maturin develop (debug build of ratewarden._native)"
.venv/bin/maturin develop

step "stubtest ratewarden._native"
$py -m mypy.stubtest ratewarden._native

step "pytest tests/python"
rc=0
$py -m pytest tests/python || rc=$?
if [[ $rc -eq 5 ]]; then echo "error: pytest collected no tests" >&2; fi
[[ $rc -eq 0 ]] || exit "$rc"

# --- Node ----------------------------------------------------------------------
step "npm install + debug build in bindings-node"
(
  cd bindings-node
  # `npm install` (which follows package-lock.json) rather than `npm ci`: the lock
  # lacks optional per-platform packages of @napi-rs/cli's deps that the registry
  # does not serve, and `npm ci` rejects such a lock as out of sync.
  npm install --no-audit --no-fund
  npm run build:debug
)
step "npm install in examples/node (links the package by name, as an application would)"
(cd examples/node && npm install --no-audit --no-fund)

step "node --test tests/node"
node --test tests/node/*.test.mjs tests/node/*.test.cjs

printf '\nbindings OK in %ss\n' "$((SECONDS - start))"
