#!/usr/bin/env bash
# Builds everything and runs every test: Rust (format, lints, unit, integration,
# conformance vectors, doctests including the README's Rust example, tests on
# real Redis servers), then the Python and Node bindings. Installs what it needs
# (rustfmt/clippy, redis-server via apt, a Python venv, npm packages); run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
step() { printf '\n==> %s\n' "$*"; }

for tool in cargo python3 node npm; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found on PATH (need Rust, Python 3 and Node)" >&2; exit 1; }
done
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  step "installing rustfmt and clippy"
  rustup component add rustfmt clippy
fi

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1 \
  || ! command -v openssl >/dev/null 2>&1; then
  # The suites start their own throwaway servers (scripts/redis_harness.py) on
  # free loopback ports; they never use a Redis already running on 6379.
  # openssl makes the throwaway CA of the TLS (rediss://) test.
  step "installing redis-server and openssl"
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server openssl
  else
    echo "error: redis-server or openssl not found; install them (Debian: sudo apt-get install redis-server openssl)" >&2
    exit 1
  fi
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (workspace, all targets, warnings are errors)"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo doc (core API docs, warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --quiet -p ratewarden --no-deps

step "cargo test (core, CLI, vectors, doctests)"
cargo test --workspace --quiet

# The engine suites once more, unchanged, on a standalone Redis and on a
# 3-master Redis Cluster (throwaway servers on free ports, stopped on exit).
engine_suites=(--test rate --test quota --test reservations --test delegation
  --test priority --test flows --test bad_input --test range --test settle
  --test coordination --test pool --test pricing --test model --test tools --test reload)
servers=$(python3 scripts/redis_harness.py start --cluster)
servers_dir=$(printf '%s' "$servers" | python3 -c 'import json,sys; print(json.load(sys.stdin)["dir"])')
trap 'python3 scripts/redis_harness.py stop "$servers_dir"' EXIT
for target in url cluster_url; do
  backend=$(printf '%s' "$servers" | python3 -c "import json,sys; print(json.load(sys.stdin)['$target'])")
  step "engine suites on $backend"
  RATEWARDEN_TEST_BACKEND="$backend" cargo test --quiet -p ratewarden "${engine_suites[@]}"
done
# Once more with every decision through decide.lua: rate-only checks and
# acquires normally take the lean rate.lua, so this pins decide.lua's rate
# formulas to the same expectations.
url=$(printf '%s' "$servers" | python3 -c "import json,sys; print(json.load(sys.stdin)['url'])")
step "engine suites on $url through decide.lua only"
RATEWARDEN_TEST_SCRIPT=decide RATEWARDEN_TEST_BACKEND="$url" cargo test --quiet -p ratewarden "${engine_suites[@]}"
python3 scripts/redis_harness.py stop "$servers_dir"
trap - EXIT

step "Python and Node bindings"
scripts/test-bindings.sh

printf '\nall tests passed in %ss\n' "$((SECONDS - start))"
