"""The proxy's own faults are never blamed on an upstream (issue 12).

The real process runs under `prlimit --nofile`: its descriptors run out while the upstreams are
healthy. The healthy canary must not be ejected, fast-failed or rolled back; the failures show as
`canary_proxy_local_errors_total{kind="descriptors"}`, are logged with their cause and answered 503.
"""

from __future__ import annotations

import asyncio
import errno
import re
import shutil
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from proxy.analysis.faults import local_kind
from tests.conftest import ProxyProcess, Upstream, config_text
from tests.test_e2e_rollback import metrics, sample, status

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)"),
]

ROLLOUT = (
    "rollout:\n  canary: canary\n  baseline: stable\n  steps: [50]\n  interval: 1h\n"
    "  min_requests: 100000\n  fast_fail: {consecutive_errors: 5}\n"
    "outlier_detection: {consecutive_failures: 3}\n"
)


def slow(name: str, delay: float) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(delay)
        return web.Response(text=f"{name} ok\n")

    return handle


async def one_request(port: int, canary: bool) -> int:
    """One request on its own connection (closed after): its status, or 0 when refused/reset."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0
    try:
        extra = b"x-canary: always\r\n" if canary else b""
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + extra + b"\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 20)
        return int(head.split()[1])
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
        return 0
    finally:
        writer.close()


def test_local_kinds() -> None:
    assert local_kind(OSError(errno.EMFILE, "Too many open files")) == "descriptors"
    assert local_kind(OSError(errno.ENFILE, "x")) == "descriptors"
    assert local_kind(OSError(errno.ENOBUFS, "x")) == "buffers"
    assert local_kind(MemoryError()) == "memory"
    assert local_kind(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) is None
    assert local_kind(OSError(errno.ECONNRESET, "reset")) is None
    assert local_kind(TimeoutError()) is None


async def test_descriptor_exhaustion_never_rolls_back_the_healthy_canary(
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_process: Callable[..., ProxyProcess],
) -> None:
    stable = await upstream_factory("stable", handler=slow("stable", 0.5))
    canary = await upstream_factory("canary", handler=slow("canary", 0.5))
    # Only canary requests (x-canary) go to the canary: the stable wave pools stable connections only.
    routes = (
        "  - name: beta\n    match: {headers: {x-canary: {exact: always}}}\n    to: canary\n"
        "  - name: default\n    to: stable\n"
    )
    text = config_text(stable.url, canary.url, ROLLOUT, routes=routes)
    pp = proxy_process(text, prefix=("prlimit", "--nofile=180:180"))
    start_log = "".join(pp.lines)
    assert "descriptor limit too low: RLIMIT_NOFILE is 180" in start_log, start_log
    budget = int(re.search(r"beyond (\d+) are refused", start_log).group(1))  # type: ignore[union-attr]

    # 1. As many stable requests at once as the budget allows: their upstream connections then
    #    stay pooled (idle), holding descriptors. 2. As many canary requests at once need new
    #    upstream connections: the process runs out of descriptors (its own fault, EMFILE on
    #    connect) while the canary is perfectly healthy.
    first = Counter(await asyncio.gather(*(one_request(pp.port, False) for _ in range(budget - 3))))
    assert first == {200: budget - 3}, first
    second = Counter(await asyncio.gather(*(one_request(pp.port, True) for _ in range(budget - 3))))
    assert second[200] > 0, (second, "".join(pp.lines)[-3000:])
    # 3. More new clients at once than the descriptors can carry: refused at accept with 503.
    third = Counter(await asyncio.gather(*(one_request(pp.port, False) for _ in range(budget + 20))))
    assert second[503] + third[503] > 0, (second, third)

    m = await metrics(pp.admin_port)
    local = sample(m, "canary_proxy_local_errors_total", kind="descriptors")
    assert local is not None and local >= second[503] + third[503], (local, second, third)
    for kind in ("connect", "timeout", "reset", "protocol"):
        for upstream in ("stable", "canary"):
            assert not sample(m, "canary_proxy_upstream_errors_total", upstream=upstream, kind=kind), (kind, upstream)
    assert not sample(m, "canary_proxy_upstream_ejections_total", upstream="canary")
    st = await status(pp.admin_port)
    assert st["rollout"]["phase"] == "progressing", st["rollout"]
    assert sample(m, "canary_proxy_rollbacks_total", upstream="canary") == 0.0
    log = "".join(pp.lines)
    # Both defences show, each logged once per burst with its cause.
    assert re.search(r"local resource failure \(descriptors at accept\)", log), log[-3000:]
    if second[503]:  # EMFILE on an upstream connect (timing decides whether accept refuses first)
        assert re.search(r"local resource failure \(descriptors at connect\).*Errno 24", log), log[-3000:]
    assert log.count("local resource failure (descriptors") <= 4, log.count("local resource failure")
