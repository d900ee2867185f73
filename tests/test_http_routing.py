"""Routing end to end: requests through the real proxy land on the upstream their route names."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
from conftest import RawClient, Upstream, config_text

from proxy.control.app import ProxyApp
from proxy.routing.router import BUCKETS, sticky_bucket

ProxyFactory = Callable[..., Awaitable[ProxyApp]]

MATCH_ROUTES = """\
  - name: hdr-exact
    match: {headers: {x-exact: {exact: gold}}}
    to: canary
  - name: hdr-prefix
    match: {headers: {x-prefix: {prefix: beta-}}}
    to: canary
  - name: hdr-regex
    match: {headers: {x-regex: {regex: "v[0-9]+"}}}
    to: canary
  - name: hdr-present
    match: {headers: {x-present: {present: true}}}
    to: canary
  - name: cookie
    match: {cookies: {canary: {exact: always}}}
    to: canary
  - name: query
    match: {query: {variant: {exact: new}}}
    to: canary
  - name: path
    match: {path_prefix: /beta}
    to: canary
  - name: default
    to: stable
"""


async def upstreams(factory: Callable[..., Awaitable[Upstream]]) -> tuple[Upstream, Upstream]:
    return await factory("stable"), await factory("canary")


@pytest.mark.parametrize(
    ("target", "headers", "expected"),
    [
        ("/", "X-Exact: gold\r\n", "canary"),
        ("/", "X-Exact: golden\r\n", "stable"),
        ("/", "x-prefix: beta-7\r\n", "canary"),
        ("/", "X-Prefix: alpha-beta-7\r\n", "stable"),
        ("/", "X-Regex: v42\r\n", "canary"),
        ("/", "X-Regex: v42x\r\n", "stable"),  # the whole value must match
        ("/", "X-Present: \r\n", "canary"),
        ("/", "X-Absent: 1\r\n", "stable"),
        ("/", "Cookie: a=1; canary=always; b=2\r\n", "canary"),
        ("/", "Cookie: canary=never\r\n", "stable"),
        ("/", "Cookie: a=1\r\nCookie: canary=always\r\n", "canary"),  # repeated Cookie headers are joined
        ("/x?a=1&variant=new", "", "canary"),
        ("/x?variant=old&variant=new", "", "stable"),  # the first occurrence wins
        ("/x?variant=n%65w", "", "canary"),  # percent-decoded
        ("/beta/page", "", "canary"),
        ("/alpha/beta", "", "stable"),
    ],
)
async def test_match_routes_to_the_named_upstream(
    target: str,
    headers: str,
    expected: str,
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_factory: ProxyFactory,
) -> None:
    stable, canary = await upstreams(upstream_factory)
    app = await proxy_factory(config_text(stable.url, canary.url, routes=MATCH_ROUTES))
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    resp = await client.request(f"GET {target} HTTP/1.1\r\nHost: h\r\n{headers}\r\n".encode())
    client.close()
    assert resp.status == 200
    assert resp.get("x-upstream") == [expected.encode()]
    assert resp.body == f"{expected} GET {target} 0\n".encode()
    assert len((canary if expected == "canary" else stable).seen) == 1


async def test_sticky_split_keeps_each_user_on_one_upstream(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    stable, canary = await upstreams(upstream_factory)
    routes = "  - name: default\n    split: {stable: 95, canary: 5}\n    sticky: {header: x-user-id}\n"
    app = await proxy_factory(config_text(stable.url, canary.url, routes=routes))
    assert app.plane is not None
    # Enough users that both sides get some (checked below with the same hash the proxy uses).
    users = [f"user-{i}" for i in range(400)]
    expected = {u: "stable" if sticky_bucket(u.encode()) < 95 * BUCKETS // 100 else "canary" for u in users}
    users = [u for u in users if expected[u] == "canary"][:5] + [u for u in users if expected[u] == "stable"][:35]
    assert len(users) == 40
    landed: dict[str, set[bytes]] = {u: set() for u in users}
    clients = [await RawClient.connect(app.plane.bound_port) for _ in range(4)]
    for round_ in range(5):  # 5 rounds x 40 users = 200 requests, over different connections
        for i, user in enumerate(users):
            client = clients[(i + round_) % len(clients)]
            resp = await client.request(f"GET /r HTTP/1.1\r\nHost: h\r\nX-User-Id: {user}\r\n\r\n".encode())
            landed[user].update(resp.get("x-upstream"))
    for client in clients:
        client.close()
    assert {u: s for u, s in landed.items() if len(s) != 1} == {}
    assert {u: next(iter(s)).decode() for u, s in landed.items()} == {u: expected[u] for u in users}
    assert len(canary.seen) == 25 and len(stable.seen) == 175


async def test_sticky_cookie_split(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    stable, canary = await upstreams(upstream_factory)
    routes = "  - name: default\n    split: {stable: 50, canary: 50}\n    sticky: {cookie: uid}\n"
    app = await proxy_factory(config_text(stable.url, canary.url, routes=routes))
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
        want = b"stable" if sticky_bucket(user.encode()) < BUCKETS // 2 else b"canary"
        for _ in range(3):
            resp = await client.request(f"GET / HTTP/1.1\r\nHost: h\r\nCookie: x=1; uid={user}\r\n\r\n".encode())
            assert resp.get("x-upstream") == [want], user
    client.close()


async def test_random_split_lands_near_the_weights(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    stable, canary = await upstreams(upstream_factory)
    routes = "  - name: default\n    split: {stable: 70, canary: 30}\n"
    app = await proxy_factory(config_text(stable.url, canary.url, routes=routes))
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    counts: Counter[bytes] = Counter()
    for _ in range(400):
        resp = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        counts.update(resp.get("x-upstream"))
    client.close()
    # Expected 120 canary (sd ~9): bounds of about +-6 sd never flake and still catch a broken split.
    assert sum(counts.values()) == 400
    assert 65 <= counts[b"canary"] <= 175, counts
