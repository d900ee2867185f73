"""Graceful shutdown of a real `canary-proxy run` process: SIGTERM drains, a second signal exits.

Upstream handlers are held on an event the test releases, so "in flight during the drain" is a
fact the test arranges, not a race it hopes to win.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from conftest import ProxyProcess, Upstream, config_text, wait_running
from support.polling import wait_for

StartUpstream = Callable[..., Awaitable[Upstream]]
StartProcess = Callable[..., ProxyProcess]

IN_FLIGHT = 200
BODY = b"".join(b"%06d\n" % i for i in range(10_000))  # 70 kB, every byte checkable
CHUNKS = 5


class Held:
    """An upstream whose `/slow` requests wait for `release`, then stream BODY in chunks."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/ws":
            return await _echo_ws(request)
        if request.path != "/slow":
            return web.Response(text="fast\n")
        self.arrived += 1
        await asyncio.wait_for(self.release.wait(), 20.0)
        resp = web.StreamResponse(headers={"Content-Length": str(len(BODY))})
        await resp.prepare(request)
        step = len(BODY) // CHUNKS + 1
        for i in range(0, len(BODY), step):
            await resp.write(BODY[i : i + step])
            await asyncio.sleep(0.05)  # still slow after the release: responses finish during the drain
        await resp.write_eof()
        return resp


async def _echo_ws(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_str(msg.data)
    return ws


@pytest.fixture
async def held(upstream_factory: StartUpstream) -> AsyncIterator[tuple[Held, Upstream]]:
    h = Held()
    up = await upstream_factory("stable", h.handle)
    yield h, up
    h.release.set()  # let handlers still waiting end before the upstream is torn down


def start_proxy(proxy_process: StartProcess, up: Upstream, grace: str | None) -> ProxyProcess:
    extra = f"shutdown_grace: {grace}\n" if grace else ""
    pp = proxy_process(config_text(up.url, up.url, extra))
    wait_running(pp)  # a SIGTERM before the handlers exist would just kill it
    return pp


async def exit_code(pp: ProxyProcess, timeout: float) -> int:
    """Wait (without blocking the loop the upstreams run on) for the process to exit."""

    async def gone() -> bool:
        return pp.proc.poll() is not None

    await wait_for(gone, timeout, "the proxy to exit:\n" + "".join(pp.lines[-20:]))
    return pp.proc.returncode


async def readyz(s: aiohttp.ClientSession, pp: ProxyProcess) -> int:
    try:
        async with s.get(f"http://127.0.0.1:{pp.admin_port}/readyz") as r:
            return r.status
    except aiohttp.ClientError:
        return -1


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def fetch(s: aiohttp.ClientSession, url: str) -> tuple[int, str | None, bytes]:
    async with s.get(url) as r:
        return r.status, r.headers.get("Connection"), await r.read()


async def test_sigterm_drains_200_in_flight_requests(proxy_process: StartProcess, held: tuple[Held, Upstream]) -> None:
    h, up = held
    pp = start_proxy(proxy_process, up, "5s")
    base = f"http://127.0.0.1:{pp.port}"

    # An idle keep-alive client: it must be closed, not kept waiting for the grace period.
    reader, writer = await asyncio.open_connection("127.0.0.1", pp.port)
    writer.write(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
    await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))

    connector = aiohttp.TCPConnector(limit=0)  # one connection per request
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as s:
        requests = [asyncio.create_task(fetch(s, f"{base}/slow")) for _ in range(IN_FLIGHT)]

        async def all_arrived() -> bool:
            return h.arrived == IN_FLIGHT

        await wait_for(all_arrived, 15.0, f"{IN_FLIGHT} requests to reach the upstream")
        assert await readyz(s, pp) == 200
        pp.proc.send_signal(signal.SIGTERM)

        async def not_ready() -> bool:
            return await readyz(s, pp) == 503

        async def refusing() -> bool:
            return await refused(pp.port)

        await wait_for(not_ready, 5.0, "/readyz to turn 503")
        await wait_for(refusing, 5.0, "new connections to be refused")
        assert await asyncio.wait_for(reader.read(), 5.0) == b""  # idle keep-alive: closed, no bytes
        assert pp.proc.poll() is None and not any(r.done() for r in requests)

        h.release.set()
        results = await asyncio.gather(*requests)
    assert all(status == 200 for status, _, _ in results)
    assert all(body == BODY for _, _, body in results), "every body arrives whole"
    assert all(conn == "close" for _, conn, _ in results), "responses during the drain close"
    writer.close()
    assert await exit_code(pp, 10.0) == 0
    assert not any("grace period over" in line for line in pp.lines)


async def test_second_signal_exits_at_once(proxy_process: StartProcess, held: tuple[Held, Upstream]) -> None:
    h, up = held
    pp = start_proxy(proxy_process, up, None)  # the default grace: 20 s
    async with aiohttp.ClientSession() as s:
        pending = asyncio.create_task(fetch(s, f"http://127.0.0.1:{pp.port}/slow"))

        async def arrived() -> bool:
            return h.arrived == 1

        async def draining() -> bool:
            return await readyz(s, pp) == 503

        await wait_for(arrived, 5.0, "the request to reach the upstream")
        pp.proc.send_signal(signal.SIGTERM)
        await wait_for(draining, 5.0, "the drain to start")
        assert pp.proc.poll() is None  # the held request keeps the first drain waiting
        pp.proc.send_signal(signal.SIGINT)
        # Far sooner than the 20 s grace, while the request is still held.
        assert await exit_code(pp, 5.0) != 0
        assert not h.release.is_set()
        with pytest.raises(aiohttp.ClientError):
            await pending
    assert any("second stop signal" in line for line in pp.lines)


async def test_grace_period_over_cuts_the_rest_and_exits_0(
    proxy_process: StartProcess, held: tuple[Held, Upstream]
) -> None:
    h, up = held
    pp = start_proxy(proxy_process, up, "1s")
    async with aiohttp.ClientSession() as s:
        pending = asyncio.create_task(fetch(s, f"http://127.0.0.1:{pp.port}/slow"))

        async def arrived() -> bool:
            return h.arrived == 1

        await wait_for(arrived, 5.0, "the request to reach the upstream")
        pp.proc.send_signal(signal.SIGTERM)
        assert await exit_code(pp, 10.0) == 0
        with pytest.raises(aiohttp.ClientError):
            await pending  # cut, never answered with a fake complete response
    assert any("grace period over" in line for line in pp.lines)


async def test_websocket_tunnel_lives_through_the_drain(
    proxy_process: StartProcess, held: tuple[Held, Upstream]
) -> None:
    _, up = held
    pp = start_proxy(proxy_process, up, "10s")
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"http://127.0.0.1:{pp.port}/ws") as ws:
            await ws.send_str("before")
            assert (await ws.receive_str(timeout=5.0)) == "before"
            pp.proc.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                return await readyz(s, pp) == 503

            await wait_for(draining, 5.0, "the drain to start")
            await ws.send_str("during")
            assert (await ws.receive_str(timeout=5.0)) == "during"
            assert pp.proc.poll() is None
        # The client closed the tunnel: nothing is left, so the drain ends well before its grace.
        assert await exit_code(pp, 8.0) == 0
    assert not any("grace period over" in line for line in pp.lines)
