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

step "Python and Node bindings"
scripts/test-bindings.sh

printf '\nall tests passed in %ss\n' "$((SECONDS - start))"
