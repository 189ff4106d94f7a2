#!/usr/bin/env bash
# Runs every test: unit, openraft conformance, and end-to-end tests over real node processes on
# loopback. Installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
exec cargo nextest run --workspace --no-fail-fast "$@"
