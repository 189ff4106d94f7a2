#!/usr/bin/env bash
# Runs every test: unit, openraft conformance, and end-to-end tests over real node processes on
# loopback. Installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
# Installs Debian packages as root, without letting them start their packaged services.
install_debian() {
  if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: $* missing; install them (as root)" >&2
    exit 1
  fi
  local made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "$@" >/dev/null ||
    { apt-get update >/dev/null && apt-get install -y --no-install-recommends "$@" >/dev/null; }
  if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
}
# The SSH tests drive a real sshd and ssh-keygen on loopback (never started as a service).
if [ ! -x /usr/sbin/sshd ] || ! command -v ssh-keygen >/dev/null 2>&1; then
  install_debian openssh-server openssh-client
fi
# The PostgreSQL tests start their own server on 127.0.0.1 (initdb and pg_ctl, as the postgres
# user when run as root); the package's own cluster is never started.
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  install_debian postgresql
fi
# The interoperability test drives a gRPC client on gRPC core (Python grpcio).
if ! python3 -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
  if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    python3 -m pip install --quiet grpcio grpcio-tools ||
      python3 -m pip install --quiet --break-system-packages grpcio grpcio-tools
  else
    install_debian python3-grpcio python3-grpc-tools
  fi
fi
# The deployment tests check the systemd unit with systemd-analyze and the Kubernetes manifests
# against the Kubernetes schemas (kubernetes-validate, which bundles them, and PyYAML).
if ! command -v systemd-analyze >/dev/null 2>&1; then
  install_debian systemd
fi
if ! python3 -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
  python3 -m pip install --quiet kubernetes-validate pyyaml ||
    python3 -m pip install --quiet --break-system-packages kubernetes-validate pyyaml
fi
exec cargo nextest run --workspace --no-fail-fast "$@"
