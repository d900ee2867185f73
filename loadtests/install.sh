#!/usr/bin/env bash
# Install what the bench drives and measures with, from Debian, when missing.
# nginx-light: the upstream server and the reference proxy; wrk: load generator;
# curl: streamed transfers; util-linux: taskset for CPU pinning.
set -euo pipefail

missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v wrk >/dev/null || missing+=(wrk)
command -v curl >/dev/null || missing+=(curl)
command -v taskset >/dev/null || missing+=(util-linux)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "loadtests/install.sh: need root to install: ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${missing[@]}"
# The package starts a system nginx on port 80 on some images; the bench runs its own instances.
if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
    systemctl stop nginx || true
fi
