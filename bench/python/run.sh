#!/usr/bin/env bash
# Python benchmarks beside limits and slowapi (see bench/README.md).
# Usage: bench/python/run.sh [guard] [memory] [redis] [asgi]   (default: all)
# Builds the extension in release mode into .venv-bench (its own venv, so the test
# venv keeps its debug build), starts its own Redis, installs autocannon in bench/.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v redis-server >/dev/null || {
  [[ $(id -u) -eq 0 ]] || { echo "error: redis-server missing (apt-get install redis-server)" >&2; exit 1; }
  apt-get update -qq && apt-get install -y -qq redis-server
}
[[ -x .venv-bench/bin/python ]] || python3 -m venv .venv-bench
export VIRTUAL_ENV="$PWD/.venv-bench" PIP_DISABLE_PIP_VERSION_CHECK=1
.venv-bench/bin/python -m pip install -q 'maturin>=1.9.4,<2' 'limits[redis]==5.8.*' 'slowapi==0.1.*' \
  'starlette>=0.37' 'uvicorn>=0.30' 'redis>=5'
.venv-bench/bin/maturin develop --release -q
(cd bench && npm install --no-audit --no-fund --silent)
.venv-bench/bin/python bench/python/bench.py "$@"
