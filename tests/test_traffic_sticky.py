"""Issued sticky cookie: a visitor without an id gets one and stays on its side from the first response.

Real clients: httpx with its cookie jar (a browser's behaviour), raw keep-alive connections for the
many-visitors counts.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from conftest import RawClient, Upstream, config_text

from proxy.control.app import ProxyApp
from proxy.routing.router import BUCKETS, sticky_bucket

ProxyFactory = Callable[..., Awaitable[ProxyApp]]
COOKIE = "cp_id"
ISSUE = "{max_age: 30d, secure: true, http_only: true, same_site: lax, path: /}"


def routes(canary: float, issue: str = ISSUE) -> str:
    return (
        "  - name: web\n"
        f"    split: {{stable: {100 - canary:g}, canary: {canary:g}}}\n"
        f"    sticky: {{cookie: {COOKIE}, issue: {issue}}}\n"
    )


async def start(
    proxy_factory: ProxyFactory,
    upstream_factory: Callable[..., Awaitable[Upstream]],
    canary: float,
    issue: str = ISSUE,
) -> tuple[ProxyApp, Upstream, Upstream]:
    stable = await upstream_factory("stable")
    canary_up = await upstream_factory("canary")
    app = await proxy_factory(config_text(stable.url, canary_up.url, routes=routes(canary, issue)))
    return app, stable, canary_up


async def test_browser_without_cookie_stays_on_one_side_for_100_requests(
    proxy_factory: ProxyFactory, upstream_factory: Callable[..., Awaitable[Upstream]]
) -> None:
    # Plain http here: a cookie jar (like a browser) never sends a `Secure` cookie over it.
    app, _, _ = await start(proxy_factory, upstream_factory, 50, "{max_age: 1h, secure: false}")
    base = f"http://127.0.0.1:{app.plane.bound_port}"  # type: ignore[union-attr]
    sides: Counter[str] = Counter()
    for visitor in range(20):
        async with httpx.AsyncClient(base_url=base) as browser:  # a fresh cookie jar: a new visitor
            first = await browser.get("/")
            assert first.status_code == 200
            header = first.headers["set-cookie"]
            value = browser.cookies.get(COOKIE)
            assert value is not None and len(value) >= 16, header
            seen = {first.headers["x-upstream"]}
            for _ in range(99):
                r = await browser.get("/page")
                assert r.status_code == 200
                assert "set-cookie" not in r.headers  # the id is issued once
                seen.add(r.headers["x-upstream"])
            assert len(seen) == 1, f"visitor {visitor} saw {seen}"
            assert seen == {"canary" if sticky_bucket(value.encode()) >= BUCKETS // 2 else "stable"}
            sides[seen.pop()] += 1
    assert set(sides) == {"stable", "canary"}  # 20 visitors at 50%: both sides (fails with p = 2^-19)


async def test_set_cookie_attributes(
    proxy_factory: ProxyFactory,
    upstream_factory: Callable[..., Awaitable[Upstream]],
    raw_client: Callable[[int], Awaitable[RawClient]],
) -> None:
    app, _, _ = await start(proxy_factory, upstream_factory, 10)
    client = await raw_client(app.plane.bound_port)  # type: ignore[union-attr]
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n")
    (cookie,) = resp.get("set-cookie")
    m = re.fullmatch(rb"cp_id=([A-Za-z0-9_-]{22}); Path=/; Max-Age=2592000; Secure; HttpOnly; SameSite=Lax", cookie)
    assert m is not None, cookie
    # 128 bits: two visitors never share an id (and ids are not sequential).
    other = await client.request(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n")
    assert other.one("set-cookie") != cookie


async def test_malformed_or_oversized_cookie_is_replaced(
    proxy_factory: ProxyFactory,
    upstream_factory: Callable[..., Awaitable[Upstream]],
    raw_client: Callable[[int], Awaitable[RawClient]],
) -> None:
    app, _, _ = await start(proxy_factory, upstream_factory, 50)
    client = await raw_client(app.plane.bound_port)  # type: ignore[union-attr]
    for bad in (b"short", b"x" * 65, b"has space" * 3, b"\xff" * 20, b"a.b.c.d.e.f.g.h.i.j.k", b""):
        resp = await client.request(b"GET / HTTP/1.1\r\nHost: shop\r\nCookie: cp_id=" + bad + b"\r\n\r\n")
        issued = resp.one("set-cookie")
        assert issued is not None and issued.startswith(b"cp_id="), (bad, resp.raw[:200])
        assert bad not in issued.split(b";")[0][6:] or not bad
    # A well-formed id is trusted: routed by its bucket, nothing issued.
    good = b"A" * 22
    want = "canary" if sticky_bucket(good) >= BUCKETS // 2 else "stable"
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: shop\r\nCookie: other=1; cp_id=" + good + b"\r\n\r\n")
    assert resp.one("set-cookie") is None
    assert resp.one("x-upstream") == want.encode()


async def test_fresh_visitor_share_matches_weight_and_ramping_only_moves_towards_canary(
    proxy_factory: ProxyFactory,
    upstream_factory: Callable[..., Awaitable[Upstream]],
    tmp_path: Path,
    raw_client: Callable[[int], Awaitable[RawClient]],
) -> None:
    app, stable, canary = await start(proxy_factory, upstream_factory, 20)
    port = app.plane.bound_port  # type: ignore[union-attr]
    clients = [await raw_client(port) for _ in range(4)]
    visitors: dict[bytes, str] = {}
    n = 5000
    for i in range(0, n, 50):  # pipelined batches of 50 fresh visitors (no cookie) per connection
        client = clients[(i // 50) % len(clients)]
        await client.send(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n" * 50)
        for _ in range(50):
            resp = await client.response()
            cookie = resp.one("set-cookie")
            assert cookie is not None
            visitors[cookie.split(b";")[0][len(COOKIE) + 1 :]] = (resp.one("x-upstream") or b"").decode()
    assert len(visitors) == n  # every id distinct
    share = sum(1 for side in visitors.values() if side == "canary") / n
    sd = math.sqrt(0.2 * 0.8 / n)
    assert abs(share - 0.2) < 4.5 * sd, share  # 4.5 sigma: about 1 in 150,000 false failures

    # Ramp 20% -> 50%: every visitor keeps its cookie; canary visitors stay, some stable ones move.
    app.config.source_path and Path(app.config.source_path).write_text(
        config_text(stable.url, canary.url, routes=routes(50))
    )
    ok, msg = await app.reload("test")
    assert ok, msg
    moved = 0
    ids = list(visitors)[:1000]
    client = clients[0]
    for i in range(0, len(ids), 50):
        batch = ids[i : i + 50]
        await client.send(b"".join(b"GET / HTTP/1.1\r\nHost: shop\r\nCookie: cp_id=" + v + b"\r\n\r\n" for v in batch))
        for v in batch:
            resp = await client.response()
            assert resp.one("set-cookie") is None  # our id: kept
            side = (resp.one("x-upstream") or b"").decode()
            if visitors[v] == "canary":
                assert side == "canary", "a canary visitor moved back to stable"
            elif side == "canary":
                moved += 1
    stayed_stable = sum(1 for v in ids if visitors[v] == "stable")
    assert 0.25 * stayed_stable < moved < 0.5 * stayed_stable  # expected 3/8 of stable visitors move


async def test_issue_applies_only_to_the_issuing_route_and_not_to_proxy_errors(
    proxy_factory: ProxyFactory,
    upstream_factory: Callable[..., Awaitable[Upstream]],
    raw_client: Callable[[int], Awaitable[RawClient]],
) -> None:
    stable = await upstream_factory("stable")
    text = config_text(
        stable.url,
        "http://127.0.0.1:1",  # nothing listens: the canary fails with 502
        routes="  - name: beta\n    match: {headers: {x-canary: always}}\n    to: canary\n" + routes(0),
    )
    app = await proxy_factory(text)
    client = await raw_client(app.plane.bound_port)  # type: ignore[union-attr]
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: a\r\nx-canary: always\r\n\r\n")
    assert resp.status == 502 and resp.one("set-cookie") is None
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert resp.status == 200 and resp.one("set-cookie") is not None
