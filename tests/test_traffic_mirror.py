"""Request mirroring: the mirror upstream gets copies, the user only ever sees the primary.

Real servers on both sides (aiohttp, raw sockets that hang or reset), real clients (httpx, raw).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from aiohttp import web
from conftest import RawClient, RawUpstream, Upstream, config_text, wait_until

from proxy.control.app import ProxyApp
from proxy.control.metrics import make_registry, render

ProxyFactory = Callable[..., Awaitable[ProxyApp]]
UpstreamFactory = Callable[..., Awaitable[Upstream]]


def mirror_routes(mirror: str, split: str = "{stable: 100, canary: 0}") -> str:
    return f"  - name: web\n    split: {split}\n    mirror: {mirror}\n"


async def recording_mirror(upstream_factory: UpstreamFactory, name: str = "canary") -> tuple[Upstream, list[Any]]:
    bodies: list[Any] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        bodies.append((request.method, request.path_qs, request.headers, body))
        return web.Response(status=500, text="the mirror's own answer\n")  # never reaches the user

    up = await upstream_factory(name, handler=handler)
    return up, bodies


def plane_of(app: ProxyApp) -> Any:
    assert app.plane is not None
    return app.plane


async def test_mirror_sees_copies_user_sees_primary(
    proxy_factory: ProxyFactory, upstream_factory: UpstreamFactory
) -> None:
    stable = await upstream_factory("stable")
    mirror, copies = await recording_mirror(upstream_factory)
    app = await proxy_factory(config_text(stable.url, mirror.url, routes=mirror_routes("{to: canary, percent: 100}")))
    base = f"http://127.0.0.1:{plane_of(app).bound_port}"
    async with httpx.AsyncClient(base_url=base) as client:
        r = await client.post("/orders?id=7", content=b"x" * 5000, headers={"X-Trace": "abc", "Host": "shop.example"})
        assert r.status_code == 200 and r.text.startswith("stable POST /orders?id=7 5000")
        r = await client.get("/")
        assert r.status_code == 200 and r.text.startswith("stable GET")

        async def chunks() -> Any:
            for _ in range(4):
                yield b"y" * 1000

        r = await client.put("/upload", content=chunks())  # chunked request body
        assert r.status_code == 200 and r.text.startswith("stable PUT /upload 4000")
    await wait_until(lambda: len(copies) == 3, what="three mirrored copies")
    by_path = {c[1]: c for c in copies}
    method, _, headers, body = by_path["/orders?id=7"]
    assert method == "POST" and body == b"x" * 5000
    assert headers["X-Trace"] == "abc" and headers["Host"] == "shop.example"
    assert headers["X-Canary-Proxy-Mirror"] == "1"
    assert "X-Request-Id" in headers and "X-Forwarded-For" in headers
    assert by_path["/"][0] == "GET" and by_path["/"][3] == b""
    assert by_path["/upload"][3] == b"y" * 4000
    text = render(make_registry(app, process=False)).decode()
    assert 'canary_proxy_mirror_requests_total{code_class="5xx",route="web",upstream="canary"} 3.0' in text
    assert 'canary_proxy_mirror_request_duration_seconds_count{upstream="canary"} 3.0' in text
    assert 'canary_proxy_mirror_skipped_total{reason="body_too_large",route="web",upstream="canary"} 0.0' in text
    promtool = shutil.which("promtool")
    if promtool is not None:
        done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr
    # Not analysed: the mirror's 500s are not the canary's evidence.
    assert app.stats.upstreams["canary"].window.stats(time.time(), 60).requests == 0


async def test_percent_and_max_body(proxy_factory: ProxyFactory, upstream_factory: UpstreamFactory) -> None:
    stable = await upstream_factory("stable")
    mirror, copies = await recording_mirror(upstream_factory)
    routes = mirror_routes("{to: canary, percent: 10, max_body: 1KiB}")
    app = await proxy_factory(config_text(stable.url, mirror.url, routes=routes))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{plane_of(app).bound_port}") as client:
        for _ in range(1000):
            assert (await client.get("/")).status_code == 200
        await wait_until(lambda: plane_of(app).mirrors.pending == 0, what="mirrors done")
        n = len(copies)
        assert 60 <= n <= 140, n  # 10% of 1000: mean 100, sd 9.5
        for _ in range(200):  # bodies over max_body are never mirrored, and are counted
            assert (await client.post("/big", content=b"z" * 2000)).status_code == 200
    await wait_until(lambda: plane_of(app).mirrors.pending == 0, what="mirrors done")
    assert all(c[1] != "/big" for c in copies)
    ms = app.stats.mirrors[("web", "canary")]
    assert 0 < ms.skipped[0] < 200  # about 10% of the 200 were chosen, then skipped as too large


async def hanging(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(65536)
    await asyncio.sleep(60)  # never answers


async def resetting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1)
    writer.transport.abort()


async def test_hanging_or_resetting_mirror_costs_the_user_nothing(
    proxy_factory: ProxyFactory,
    upstream_factory: UpstreamFactory,
    raw_upstream: Callable[[Any], Awaitable[RawUpstream]],
) -> None:
    stable = await upstream_factory("stable")
    hang = await raw_upstream(hanging)
    reset = await raw_upstream(resetting)
    routes = (
        "  - name: plain\n    match: {path_prefix: /plain}\n    to: stable\n"
        "  - name: hang\n    match: {headers: {x-m: hang}}\n    to: stable\n    mirror: {to: canary}\n"
        "  - name: reset\n    match: {headers: {x-m: reset}}\n    to: stable\n    mirror: {to: other}\n"
        "  - name: web\n    to: stable\n"
    )
    text = config_text(stable.url, hang.url, routes=routes).replace(
        "routes:", f"  other: {{endpoints: [{reset.url}]}}\nroutes:"
    )
    app = await proxy_factory(text)
    base = f"http://127.0.0.1:{plane_of(app).bound_port}"
    times: dict[str, list[float]] = {"none": [], "hang": [], "reset": []}
    async with httpx.AsyncClient(base_url=base) as client:
        # Interleaved, so that whatever else the machine does hits the three kinds alike.
        for i in range(150):
            kinds = ["none", "hang", "reset"]
            for kind in kinds[i % 3 :] + kinds[: i % 3]:
                headers = {"x-m": kind} if kind != "none" else {}
                t = time.perf_counter()
                r = await client.post("/x", content=b"p" * 2000, headers=headers)
                times[kind].append(time.perf_counter() - t)
                assert r.status_code == 200 and r.text.startswith("stable POST /x 2000")
    assert hang.accepted > 0
    await wait_until(lambda: app.stats.mirrors[("reset", "other")].by_class[6] >= 150, what="150 reset mirrors")
    med = statistics.median
    baseline, hung, resets = times["none"], times["hang"], times["reset"]
    print(f"median ms: no mirror {med(baseline) * 1e3:.2f}, hung {med(hung) * 1e3:.2f}, reset {med(resets) * 1e3:.2f}")
    # Noise, not an SLA: a mirror that cost the user a round trip would be far above this.
    assert med(hung) < med(baseline) * 3 + 0.005
    assert med(resets) < med(baseline) * 3 + 0.005
    assert max(hung) < 5.0  # nobody waited for the hung mirror (it never answers; the timeout is 30 s)
    assert plane_of(app).mirrors.pending <= plane_of(app).mirrors.max_in_flight


async def test_memory_bounded_with_many_large_uploads(
    proxy_factory: ProxyFactory,
    upstream_factory: UpstreamFactory,
    raw_upstream: Callable[[Any], Awaitable[RawUpstream]],
) -> None:
    stable = await upstream_factory("stable")
    hang = await raw_upstream(hanging)
    routes = "  - name: web\n    to: stable\n    mirror: {to: canary, max_body: 1MiB}\n"
    app = await proxy_factory(config_text(stable.url, hang.url, routes=routes))
    mirrors = plane_of(app).mirrors
    mirrors.max_in_flight = 8
    rss0 = _rss()
    peak = 0
    body = os.urandom(900 * 1024)  # under max_body: each admitted copy is buffered whole
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{plane_of(app).bound_port}", timeout=30) as client:

        async def upload() -> None:
            nonlocal peak
            r = await client.post("/up", content=body)
            assert r.status_code == 200
            peak = max(peak, mirrors.pending)

        for _ in range(8):
            await asyncio.gather(*(upload() for _ in range(8)))
        big = os.urandom(3 * 1024 * 1024)  # over max_body: streamed to the primary, no copy kept
        for _ in range(8):
            r = await client.post("/big", content=big)
            assert r.status_code == 200 and r.text.startswith("stable POST /big 3145728")
    assert peak <= 8
    ms = app.stats.mirrors[("web", "canary")]
    assert ms.skipped[1] >= 64 - 8  # overloaded: the hung mirror holds its 8 slots
    growth = _rss() - rss0
    print(f"RSS growth {growth / 2**20:.1f} MiB after 64 x 900 KiB + 8 x 3 MiB uploads with a hung mirror")
    assert growth < 64 * 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_analyze_feeds_the_canary_evidence_and_rollback_stops_mirroring(
    proxy_factory: ProxyFactory, upstream_factory: UpstreamFactory, raw_client: Callable[[int], Awaitable[RawClient]]
) -> None:
    stable = await upstream_factory("stable")
    mirror, copies = await recording_mirror(upstream_factory)  # answers 500 to everything
    rollout = (
        "rollout:\n  canary: canary\n  baseline: stable\n  min_requests: 20\n  fast_fail: {consecutive_errors: 10}\n"
    )
    routes = mirror_routes("{to: canary, percent: 100, analyze: true}")
    app = await proxy_factory(config_text(stable.url, mirror.url, extra=rollout, routes=routes))
    client = await raw_client(plane_of(app).bound_port)
    for _ in range(30):
        resp = await client.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert resp.status == 200 and resp.one("x-upstream") == b"stable"
        if app.controller is not None and app.controller.state.phase == "rolled_back":
            break
    assert app.controller is not None
    await wait_until(lambda: app.controller.state.phase == "rolled_back", what="dark-launched canary rolled back")  # type: ignore[union-attr]
    await wait_until(lambda: plane_of(app).mirrors.pending == 0, what="mirrors done")
    sent = len(copies)
    for _ in range(20):
        resp = await client.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert resp.status == 200
    await asyncio.sleep(0)
    assert plane_of(app).mirrors.pending == 0 and len(copies) == sent  # rolled back: no more copies


async def test_observe_mode_keeps_mirroring_after_a_would_be_rollback(
    proxy_factory: ProxyFactory, upstream_factory: UpstreamFactory, raw_client: Callable[[int], Awaitable[RawClient]]
) -> None:
    """`mode: observe` never changes traffic: a dark launch judged in observe mode keeps getting its
    copies after the analysis says it would have rolled back."""
    stable = await upstream_factory("stable")
    mirror, copies = await recording_mirror(upstream_factory)  # answers 500 to everything
    rollout = (
        "rollout:\n  canary: canary\n  baseline: stable\n  min_requests: 20\n  mode: observe\n"
        "  fast_fail: {consecutive_errors: 10}\n"
    )
    routes = mirror_routes("{to: canary, percent: 100, analyze: true}")
    app = await proxy_factory(config_text(stable.url, mirror.url, extra=rollout, routes=routes))
    client = await raw_client(plane_of(app).bound_port)
    assert app.controller is not None
    for _ in range(30):
        resp = await client.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert resp.status == 200 and resp.one("x-upstream") == b"stable"
    await wait_until(lambda: app.controller.state.phase == "rolled_back", what="observe-mode would-be rollback")  # type: ignore[union-attr]
    await wait_until(lambda: plane_of(app).mirrors.pending == 0, what="mirrors done")
    sent = len(copies)
    for _ in range(10):
        resp = await client.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert resp.status == 200 and resp.one("x-upstream") == b"stable"
    await wait_until(lambda: len(copies) >= sent + 10, what="copies still sent in observe mode")


async def test_mirror_reuses_its_own_connections_and_handles_head(
    proxy_factory: ProxyFactory, upstream_factory: UpstreamFactory, logging_upstream: Callable[[], Awaitable[Any]]
) -> None:
    stable = await upstream_factory("stable")
    mirror = await logging_upstream()
    app = await proxy_factory(config_text(stable.url, mirror.url, routes=mirror_routes("{to: canary}")))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{plane_of(app).bound_port}") as client:
        for i in range(50):
            method = "HEAD" if i % 10 == 0 else "GET"
            r = await client.request(method, f"/n{i}")
            assert r.status_code == 200
            await wait_until(lambda i=i: len(mirror.requests) == i + 1, what=f"copy {i}")  # type: ignore[misc]
    assert [r.url for r in mirror.requests] == [f"/n{i}".encode() for i in range(50)]
    assert mirror.parse_errors == 0
    # Keep-alive in the mirror's own pool: a new connection only after each HEAD (never reused).
    assert len(mirror.connections) <= 6, len(mirror.connections)
    ms = app.stats.mirrors[("web", "canary")]
    assert ms.by_class[2] == 50


def test_worker_counters_carry_the_mirror_figures() -> None:
    """`--workers N`: a follower's mirror counters reach the leader's /metrics."""
    from proxy.analysis.stats import Stats
    from proxy.control.workers import counters_snapshot, merged_stats

    buckets = (0.01, 0.1, 1.0)
    leader, follower = Stats(), Stats()
    leader.mirror_for("web", "canary", buckets).observe(200, 0.005)
    ms = follower.mirror_for("web", "canary", buckets)
    ms.observe(503, 0.5)
    ms.observe(0, 2.0)
    ms.skipped[0] += 2
    merged = merged_stats(leader, [counters_snapshot(follower)]).mirrors[("web", "canary")]
    assert merged.by_class == [0, 0, 1, 0, 0, 1, 1]
    assert merged.skipped == [2, 0]
    assert merged.duration_counts == [1, 0, 1, 1]
    assert merged.duration_sum == 2.505


async def test_hung_copy_times_out_and_a_stale_pooled_connection_is_retried(
    proxy_factory: ProxyFactory,
    upstream_factory: UpstreamFactory,
    raw_upstream: Callable[[Any], Awaitable[RawUpstream]],
) -> None:
    stable = await upstream_factory("stable")
    hang = await raw_upstream(hanging)

    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # keep-alive, as far as it says
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next copy on this connection: reset, unanswered
        writer.transport.abort()

    flaky = await raw_upstream(one_per_connection)
    routes = (
        "  - name: hang\n    match: {headers: {x-m: hang}}\n    to: stable\n    mirror: {to: canary}\n"
        "  - name: web\n    to: stable\n    mirror: {to: other}\n"
    )
    text = config_text(stable.url, hang.url, routes=routes, extra="timeouts: {response: 300ms}\n")
    text = text.replace("routes:", f"  other: {{endpoints: [{flaky.url}]}}\nroutes:")
    app = await proxy_factory(text)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{plane_of(app).bound_port}") as client:
        for _ in range(5):
            assert (await client.get("/", headers={"x-m": "hang"})).status_code == 200
        for i in range(10):
            assert (await client.get(f"/f{i}")).status_code == 200
            await wait_until(lambda i=i: app.stats.mirrors[("web", "other")].by_class[2] == i + 1, what=f"copy {i}")  # type: ignore[misc]
    hung = app.stats.mirrors[("hang", "canary")]
    await wait_until(lambda: hung.by_class[6] == 5, what="5 hung copies given up after timeouts.response")
    assert app.stats.mirrors[("web", "other")].by_class[6] == 0  # every stale connection was retried
    assert flaky.accepted >= 10  # one connection per copy: each reuse met a reset, then a fresh one
    await wait_until(lambda: plane_of(app).mirrors.pending == 0, what="no mirror left")
