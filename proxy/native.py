"""Which hot path runs: the mypyc-compiled modules, or the same code as pure Python.

The data plane is plain, strictly typed Python. Building the wheel (`pip install .`, `pip wheel .`,
`make setup`, the Dockerfile) compiles the modules in :data:`MODULES` to C extensions with mypyc
when a C compiler is there (see `setup.py`); they run the same code about 1.4x faster end to end.
Without a compiler, with `CANARY_PROXY_PURE=1` at build time, or from an editable install, the
modules stay pure Python: the behaviour is identical, only slower.

Nothing is decided at import time and nothing is redirected: Python imports what is installed.
:func:`state` only reports it, from where the hot modules were loaded from. `CANARY_PROXY_PURE=1`
at run time makes the test suite import the sources (`proxy/`) instead of the installed package.

This module must stay importable without mypy and cheap to import: it runs on every start.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os

# The per-request path: parsing, routing, dispatch, recording. Only these are compiled.
MODULES = (
    "proxy.dataplane.legs.http1_buffers",
    "proxy.dataplane.legs.http1_headers",
    "proxy.dataplane.request",
    "proxy.dataplane.legs.http1_client",
    "proxy.dataplane.legs.http1_io",
    "proxy.dataplane.legs.http1_respond",
    "proxy.dataplane.legs.http1_request",
    "proxy.dataplane.legs.http1_upstream",
    # HTTP/2 towards clients (the h2 library itself stays pure Python).
    "proxy.dataplane.legs.h2_limits",
    "proxy.dataplane.legs.h2_request",
    "proxy.dataplane.legs.h2_respond",
    "proxy.dataplane.legs.h2_stream",
    "proxy.dataplane.legs.h2_client",
    # HTTP/2 upstreams: their classes extend the compiled UpstreamConnection and EndpointPool.
    "proxy.dataplane.legs.h2_upstream_stream",
    "proxy.dataplane.legs.h2_upstream",
    "proxy.dataplane.h2_pool",
    "proxy.dataplane.plane",
    "proxy.dataplane.forwarding",
    "proxy.dataplane.exchange",
    "proxy.dataplane.recording",
    "proxy.dataplane.context",
    "proxy.dataplane.clock",
    "proxy.dataplane.deadlines",
    "proxy.dataplane.pools",
    "proxy.dataplane.balancer",
    "proxy.dataplane.legs.base",
    "proxy.routing.router",
    "proxy.analysis.stats",
    "proxy.analysis.window",
    "proxy.dataplane.snapshot",
    "proxy.config.model",
)
PURE_ENV = "CANARY_PROXY_PURE"
COMPILED = "compiled (mypyc)"


def compiled_modules() -> list[str]:
    """The hot modules that this process loads from C extensions (imports them if needed)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    found = []
    for name in MODULES:
        origin = getattr(importlib.import_module(name), "__file__", None) or ""
        if origin.endswith(suffixes):
            found.append(name)
    return found


def state() -> str:
    """How the hot path runs in this process: `compiled (mypyc)` or `pure (why)`."""
    n = len(compiled_modules())
    if n == len(MODULES):
        return COMPILED
    if n:
        return f"mixed ({n} of {len(MODULES)} modules compiled: reinstall)"
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return f"pure ({PURE_ENV} set)"
    return "pure (not compiled: no C compiler at install time, or an editable install)"
