#!/usr/bin/env bash
# Install the Debian tools the tests and benchmarks use, only when missing.
set -euo pipefail
need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v hey >/dev/null 2>&1 || need+=(hey)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# Fleet mode tests start their own redis-server (Valkey works the same).
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# h2load (HTTP/2 tests and the HTTP/2 loadtest); curl with HTTP/2 comes with Debian's curl.
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
# prlimit (descriptor-limit tests) and mount (a small tmpfs stands in for a full disk).
command -v prlimit >/dev/null 2>&1 || need+=(util-linux)
command -v mount >/dev/null 2>&1 || need+=(mount)
# A C compiler and Python's headers let `make setup` compile the hot path (mypyc).
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need+=(python3-dev)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "system-deps: missing ${need[*]} and not root: install them with apt-get" >&2; exit 1
  fi
fi
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The Debian packages may start their system services; the tests and benchmarks run their own.
for svc in nginx prometheus prometheus-node-exporter redis-server; do
  $SUDO service "$svc" stop >/dev/null 2>&1 || true
done
