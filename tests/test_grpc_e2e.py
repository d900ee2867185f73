"""gRPC end to end with real grpcio servers as stable and canary (`protocol: h2` upstreams).

The calls are made as HTTP/1.1 requests carrying gRPC frames (as gRPC-web-ish clients and HTTP/1.1
tooling do): the proxy speaks HTTP/2 to the grpcio servers and relays their trailers as chunked
trailers. Header routing by metadata, a 90/10 split, grpc-status as an analysis error (a canary
answering UNAVAILABLE is rolled back on its own), deadlines, metrics.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from conftest import config_text, wait_for
from support.grpc_service import EchoServer, http1_call, unframe

from proxy.control.app import ProxyApp

pytestmark = pytest.mark.timeout(90)

SPLIT_ROUTES = (
    "  - name: beta\n    match: {headers: {x-canary: {exact: always}}}\n    to: canary\n"
    "  - name: default\n    split: {stable: 90, canary: 10}\n"
)


class Reply:
    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes, trailers: dict[bytes, bytes]) -> None:
        self.status = status
        self.headers = headers
        self.messages = unframe(body)
        self.trailers = trailers

    @property
    def grpc_status(self) -> bytes | None:
        """From the trailers, or from the head of a trailers-only response."""
        return self.trailers.get(b"grpc-status", self.headers.get(b"grpc-status"))


async def call(port: int, method: str, message: bytes = b"hi", metadata: dict[str, str] | None = None) -> Reply:
    """One gRPC call over a fresh HTTP/1.1 connection to the proxy."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(http1_call(method, message, metadata))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head[:-4].split(b"\r\n")
        headers = {n.strip().lower(): v.strip() for n, _, v in (line.partition(b":") for line in lines[1:])}
        status = int(lines[0].split()[1])
        body, trailers = b"", {}
        if headers.get(b"transfer-encoding") == b"chunked":
            while size := int(await asyncio.wait_for(reader.readuntil(b"\r\n"), 10), 16):
                body += (await reader.readexactly(size + 2))[:-2]
            while (line := await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)) != b"\r\n":
                name, _, value = line.partition(b":")
                trailers[name.strip().lower()] = value.strip()
        elif b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
        return Reply(status, headers, body, trailers)
    finally:
        writer.close()


@pytest.fixture
def grpc_servers() -> AsyncIterator[Callable[..., EchoServer]]:
    started: list[EchoServer] = []

    def start(name: str, fail: bool = False) -> EchoServer:
        server = EchoServer(name, fail)
        started.append(server)
        return server

    yield start  # type: ignore[misc]
    for server in started:
        server.stop()


def h2_config(stable: str, canary: str, extra: str = "", routes: str | None = None) -> str:
    text = config_text(stable, canary, extra, routes)
    for v in ("v1", "v2"):
        text = text.replace(f"version: {v}}}", f"version: {v}, protocol: h2}}")
    return text


async def admin_get(app: ProxyApp, path: str) -> tuple[int, str]:
    assert app.admin is not None
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{app.admin.bound_port}{path}") as r:
        return r.status, await r.text()


async def test_unary_and_server_streaming_through_the_proxy(proxy_factory, grpc_servers) -> None:
    stable = grpc_servers("stable")
    app = await proxy_factory(h2_config(stable.url, stable.url))
    port = app.plane.bound_port
    reply = await call(port, "Say", b"hello")
    assert reply.status == 200 and reply.headers[b"content-type"].startswith(b"application/grpc")
    assert reply.messages == [b"stable:hello"]
    assert reply.trailers[b"grpc-status"] == b"0"
    reply = await call(port, "Many")
    assert reply.messages == [b"stable:0", b"stable:1", b"stable:2"] and reply.grpc_status == b"0"
    # Unknown method: the server's own UNIMPLEMENTED comes back untouched (trailers-only).
    reply = await call(port, "Nope")
    assert reply.status == 200 and reply.grpc_status == b"12"


async def test_metadata_header_routing_and_a_90_10_split(proxy_factory, grpc_servers) -> None:
    stable, canary = grpc_servers("stable"), grpc_servers("canary")
    app = await proxy_factory(h2_config(stable.url, canary.url, routes=SPLIT_ROUTES))
    port = app.plane.bound_port
    for _ in range(5):
        reply = await call(port, "Say", b"x", {"x-canary": "always"})
        assert reply.messages == [b"canary:x"] and reply.grpc_status == b"0"
    assert canary.metadata[-1]["x-canary"] == "always"
    n = 300
    replies = await asyncio.gather(*(call(port, "Say", b"s") for _ in range(n)))
    seen = Counter(r.messages[0].split(b":")[0] for r in replies)
    assert all(r.grpc_status == b"0" for r in replies)
    # 10% of 300 is 30 (sd 5.2): far outside 12..55 would mean the split is not applied.
    assert 12 <= seen[b"canary"] <= 55 and seen[b"stable"] == n - seen[b"canary"], seen
    counts = {(rc.route, rc.upstream): sum(rc.by_class) for rc in app.stats.route_counts.values()}
    assert counts[("default", "canary")] == seen[b"canary"]
    assert counts[("default", "stable")] == seen[b"stable"]


async def test_canary_answering_unavailable_is_rolled_back_on_its_own(proxy_factory, grpc_servers) -> None:
    stable, canary = grpc_servers("stable"), grpc_servers("canary", fail=True)
    rollout = (
        "rollout:\n  canary: canary\n  baseline: stable\n  interval: 1s\n  window: 30s\n  min_requests: 20\n"
        "  fast_fail: {consecutive_errors: 0}\n"
    )
    app = await proxy_factory(h2_config(stable.url, canary.url, rollout, routes=SPLIT_ROUTES))
    port = app.plane.bound_port

    async def rolled_back() -> bool:
        replies = await asyncio.gather(*(call(port, "Say", b"r") for _ in range(20)))
        for r in replies:
            assert r.status == 200
            assert r.grpc_status in (b"0", b"14")
            assert (r.grpc_status == b"0") == (r.messages == [b"stable:r"])  # stable OK, canary UNAVAILABLE
        _, text = await admin_get(app, "/status")
        return bool(json.loads(text)["rollout"]["phase"] == "rolled_back")

    await wait_for(rolled_back, 30, "the canary rolled back on grpc-status UNAVAILABLE")
    assert canary.calls >= 1
    # Rolled back: weight 0, every call (even by the canary's header route) is answered by stable, OK.
    calls_before = canary.calls
    replies = await asyncio.gather(*(call(port, "Say", b"after") for _ in range(30)))
    assert {(r.grpc_status, tuple(r.messages)) for r in replies} == {(b"0", (b"stable:after",))}
    assert canary.calls == calls_before
    _, text = await admin_get(app, "/status")
    doc = json.loads(text)
    assert doc["rollout"]["canary_weight"] == 0 and "error rate" in doc["rollout"]["reason"], doc["rollout"]
    status, metrics = await admin_get(app, "/metrics")
    assert status == 200
    line = 'canary_proxy_grpc_responses_total{code_class="server_error",grpc_status="UNAVAILABLE",upstream="canary"}'
    assert line in metrics, [m for m in metrics.splitlines() if "grpc" in m]
    assert 'canary_proxy_grpc_responses_total{code_class="ok",grpc_status="OK",upstream="stable"}' in metrics
    assert 'canary_proxy_upstream_weight{route="default",upstream="canary"} 0.0' in metrics


async def test_grpc_timeout_answers_deadline_exceeded_promptly(proxy_factory, grpc_servers) -> None:
    stable = grpc_servers("stable")
    app = await proxy_factory(h2_config(stable.url, stable.url))
    t0 = time.monotonic()
    reply = await call(app.plane.bound_port, "Slow", metadata={"grpc-timeout": "300m"})
    took = time.monotonic() - t0
    assert reply.status == 200 and reply.grpc_status == b"4", (reply.headers, reply.trailers)
    assert took < 2.0, took
