#!/usr/bin/env bash
# Runs every test: unit, openraft conformance, and end-to-end tests over real node processes on
# loopback. Installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
# The SSH tests drive a real sshd and ssh-keygen on loopback (never started as a service).
if [ ! -x /usr/sbin/sshd ] || ! command -v ssh-keygen >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: openssh-server and openssh-client are missing; install them (as root)" >&2
    exit 1
  fi
  # Keep the package from starting a system-wide sshd.
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends openssh-server openssh-client >/dev/null ||
    { apt-get update >/dev/null && apt-get install -y --no-install-recommends openssh-server openssh-client >/dev/null; }
  if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
exec cargo nextest run --workspace --no-fail-fast "$@"
