#!/usr/bin/env bash
# Node benchmarks beside rate-limiter-flexible and express-rate-limit (see bench/README.md).
# Usage: bench/node/run.sh [memory] [redis] [express]   (default: all)
# Builds the addon in release mode (replacing a debug build: the test command
# rebuilds its own), starts its own Redis, installs the peers and autocannon in bench/.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v redis-server >/dev/null || {
  [[ $(id -u) -eq 0 ]] || { echo "error: redis-server missing (apt-get install redis-server)" >&2; exit 1; }
  apt-get update -qq && apt-get install -y -qq redis-server
}
(cd bindings-node && npm install --no-audit --no-fund --silent && npm run --silent build >/dev/null)
(cd bench && npm install --no-audit --no-fund --silent)
node bench/node/bench.mjs "$@"
