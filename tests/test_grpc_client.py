"""gRPC end to end with a real grpcio client (HTTP/2 with prior knowledge to the proxy) and real
grpcio servers as stable and canary (`protocol: h2`): unary and server streaming, header routing by
metadata, a 90/10 split counted per upstream, a canary answering UNAVAILABLE rolled back on its own
while stable answers OK, and grpc-timeout."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import grpc
import pytest
from conftest import config_text, free_port, wait_for
from support.grpc_service import EchoServer

from proxy.control.app import ProxyApp
from proxy.dataplane.legs import base

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif("h2" not in getattr(base, "ALPN_SUPPORTED", ()), reason="needs the HTTP/2 client leg"),
]

SPLIT_ROUTES = (
    "  - name: beta\n    match: {headers: {x-canary: {exact: always}}}\n    to: canary\n"
    "  - name: default\n    split: {stable: 90, canary: 10}\n"
)


def h2_config(stable: str, canary: str, extra: str = "", routes: str | None = None) -> str:
    text = config_text(stable, canary, extra, routes)
    for v in ("v1", "v2"):
        text = text.replace(f"version: {v}}}", f"version: {v}, protocol: h2}}")
    return text


@pytest.fixture
def grpc_servers() -> Iterator[Callable[..., EchoServer]]:
    started: list[EchoServer] = []

    def start(name: str, fail: bool = False) -> EchoServer:
        server = EchoServer(name, fail)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class Client:
    """A grpcio channel to the proxy; calls run in a thread (the proxy runs on this loop)."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    async def say(self, message: bytes, metadata: tuple[tuple[str, str], ...] = (), timeout: float = 10) -> bytes:
        call = self.channel.unary_unary("/echo.Echo/Say")
        result: bytes = await asyncio.to_thread(call, message, metadata=metadata, timeout=timeout)
        return result

    async def many(self, message: bytes) -> list[bytes]:
        call = self.channel.unary_stream("/echo.Echo/Many")
        return await asyncio.to_thread(lambda: list(call(message, timeout=10)))

    async def slow(self, timeout: float) -> Any:
        call = self.channel.unary_unary("/echo.Echo/Slow")
        return await asyncio.to_thread(call, b"", timeout=timeout)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def clients() -> Iterator[Callable[[int], Client]]:
    made: list[Client] = []

    def make(port: int) -> Client:
        made.append(Client(port))
        return made[-1]

    yield make
    for c in made:
        c.close()


async def test_unary_and_server_streaming(proxy_factory, grpc_servers, clients) -> None:
    stable = grpc_servers("stable")
    app: ProxyApp = await proxy_factory(h2_config(stable.url, stable.url))
    client = clients(app.plane.bound_port)
    assert await client.say(b"hello") == b"stable:hello"
    assert await client.many(b"x") == [b"stable:0", b"stable:1", b"stable:2"]
    assert app.stats.grpc["stable"][0] == 2


async def test_metadata_routing_and_a_90_10_split(proxy_factory, grpc_servers, clients) -> None:
    stable, canary = grpc_servers("stable"), grpc_servers("canary")
    app = await proxy_factory(h2_config(stable.url, canary.url, routes=SPLIT_ROUTES))
    client = clients(app.plane.bound_port)
    for _ in range(5):
        assert await client.say(b"m", (("x-canary", "always"),)) == b"canary:m"
    n = 200
    replies = await asyncio.gather(*(client.say(b"s") for _ in range(n)))
    seen = Counter(r.split(b":")[0] for r in replies)
    # 10% of 200 is 20 (sd 4.2): outside 6..40 the split is not applied per call.
    assert 6 <= seen[b"canary"] <= 40 and seen[b"stable"] == n - seen[b"canary"], seen
    counts = {(rc.route, rc.upstream): sum(rc.by_class) for rc in app.stats.route_counts.values()}
    assert counts[("default", "canary")] == seen[b"canary"] and counts[("default", "stable")] == seen[b"stable"]


async def test_canary_answering_unavailable_is_rolled_back(proxy_factory, grpc_servers, clients) -> None:
    stable, canary = grpc_servers("stable"), grpc_servers("canary", fail=True)
    rollout = (
        "rollout:\n  canary: canary\n  baseline: stable\n  interval: 1s\n  window: 30s\n  min_requests: 20\n"
        "  fast_fail: {consecutive_errors: 0}\n"
    )
    app = await proxy_factory(h2_config(stable.url, canary.url, rollout, routes=SPLIT_ROUTES))
    client = clients(app.plane.bound_port)
    assert app.admin is not None

    async def one() -> str:
        try:
            assert await client.say(b"r") == b"stable:r"
            return "OK"
        except grpc.RpcError as exc:
            return str(exc.code().name)

    async def rolled_back() -> bool:
        results = Counter(await asyncio.gather(*(one() for _ in range(20))))
        assert set(results) <= {"OK", "UNAVAILABLE"}, results
        return bool((await status(app))["rollout"]["phase"] == "rolled_back")

    await wait_for(rolled_back, 30, "the canary rolled back on grpc-status UNAVAILABLE")
    before = canary.calls
    assert Counter(await asyncio.gather(*(one() for _ in range(30)))) == {"OK": 30}
    assert canary.calls == before
    assert (await status(app))["rollout"]["canary_weight"] == 0


async def test_grpc_timeout_gives_deadline_exceeded_promptly(proxy_factory, grpc_servers, clients) -> None:
    stable = grpc_servers("stable")
    app = await proxy_factory(h2_config(stable.url, stable.url))
    client = clients(app.plane.bound_port)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        await client.slow(timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 2.0
    await wait_for(lambda: _ended(stable, t0), 3, "the upstream call cancelled")


async def _ended(server: EchoServer, t0: float) -> bool:
    return bool(server.slow_ended) and server.slow_ended[0] - t0 < 2.0


async def status(app: ProxyApp) -> Any:
    assert app.admin is not None
    url = f"http://127.0.0.1:{app.admin.bound_port}/status"
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return json.loads(await r.text())


async def test_own_errors_reach_grpc_clients_as_grpc_statuses(proxy_factory, clients) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    routes = "  - name: svc\n    match: {path_prefix: /echo.Echo/}\n    to: stable\n"
    app = await proxy_factory(h2_config(dead, dead, routes=routes))
    client = clients(app.plane.bound_port)
    with pytest.raises(grpc.RpcError) as info:
        await client.say(b"x")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # upstream unreachable
    assert "502" in (info.value.details() or "")
    call = client.channel.unary_unary("/other.Svc/Do")
    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(call, b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # no route
