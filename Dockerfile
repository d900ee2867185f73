# syntax=docker/dockerfile:1
# canary-proxy container image.
#   docker build -t canary-proxy:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9901:9901 -v "$PWD/config:/etc/canary-proxy:ro" canary-proxy:0.1.0
# Mount a directory (not a single file) at /etc/canary-proxy so hot reload sees edits.

# ---- builder: resolve and install the project into a self-contained venv ----
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# A C compiler for the mypyc build of the hot path; the runtime image needs none.
# Unpinned on purpose: whatever the base image's Debian release ships.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH"

WORKDIR /build
COPY pyproject.toml setup.py README.md ./
COPY proxy/ ./proxy/
# Build a wheel (setup.py compiles the hot path with mypyc in it; CANARY_PROXY_REQUIRE_NATIVE
# makes a missing compiler an error instead of a pure-Python wheel), install that wheel into the
# runtime venv, and check that the compiled modules are the ones in use.
RUN CANARY_PROXY_REQUIRE_NATIVE=1 pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && pip install --no-cache-dir /wheels/canary_proxy-*.whl \
    && canary-proxy --version \
    && python -P -c "import sys, proxy.native as n; print(n.state()); sys.exit(n.state() != n.COMPILED)"

# ---- runtime: only the venv, the default config and an unprivileged user ----
FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="canary-proxy" \
      org.opencontainers.image.description="Reverse proxy for canary releases with automatic rollback" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Fixed UID/GID so volume ownership and Kubernetes runAsUser are predictable.
RUN groupadd --system --gid 10001 canary \
    && useradd --system --no-log-init --uid 10001 --gid canary \
       --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin canary \
    && mkdir -p /etc/canary-proxy /var/lib/canary-proxy \
    && chown canary:canary /var/lib/canary-proxy

COPY --from=builder /opt/venv /opt/venv
COPY config/canary.yaml /etc/canary-proxy/canary.yaml

USER 10001:10001
WORKDIR /var/lib/canary-proxy

# 8080: proxied traffic. 9901: admin (/metrics, /healthz, /readyz, /status).
EXPOSE 8080 9901

# SIGTERM starts a graceful drain (shutdown_grace, 20s by default);
# give `docker stop -t` more than that.
STOPSIGNAL SIGTERM

# No curl/wget in the image: the interpreter we ship is enough.
# Needs the admin listener reachable on 127.0.0.1 (127.0.0.1:9901 or 0.0.0.0:9901).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2); sys.exit(0 if r.status == 200 else 1)"]

ENTRYPOINT ["canary-proxy"]
CMD ["run", "-c", "/etc/canary-proxy/canary.yaml"]
