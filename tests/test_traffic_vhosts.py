"""Virtual hosts (`match.host`): several names and a wildcard, each reaching its own routes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from conftest import ROOT, RawClient, Upstream, config_text

from proxy.control.app import ProxyApp
from proxy.routing.router import normalise_host

ProxyFactory = Callable[..., Awaitable[ProxyApp]]

ROUTES = """\
  - name: shop-beta
    match: {host: ["shop.example.com", "*.shop.example.com"], headers: {x-canary: always}}
    to: canary
  - name: shop
    match: {host: ["shop.example.com", "*.shop.example.com"]}
    to: stable
  - name: api
    match: {host: API.example.com}
    to: canary
  - name: ip
    match: {host: ["127.0.0.2", "[::1]", "[2001:DB8:0:0::1]"]}
    to: canary
  - name: other
    to: other
"""


async def test_hosts_and_wildcards_reach_their_routes(
    proxy_factory: ProxyFactory, upstream_factory: Callable[..., Awaitable[Upstream]]
) -> None:
    stable = await upstream_factory("stable")
    canary = await upstream_factory("canary")
    other = await upstream_factory("other")
    text = config_text(stable.url, canary.url, routes=ROUTES).replace(
        "routes:", f"  other: {{endpoints: [{other.url}]}}\nroutes:"
    )
    app = await proxy_factory(text)
    assert app.plane is not None
    cases = {
        "shop.example.com": "stable",
        "SHOP.Example.COM:8443": "stable",  # case-insensitive, port ignored
        "shop.example.com.": "stable",  # trailing dot
        "www.shop.example.com": "stable",  # wildcard: a subdomain
        "a.b.shop.example.com": "stable",  # and deeper
        "evilshop.example.com": "other",  # not a subdomain
        "example.com": "other",
        "api.example.com": "canary",
        "api.example.com:80": "canary",
        "www.api.example.com": "other",  # an exact name has no subdomains
        "127.0.0.2:8080": "canary",
        "[::1]:8080": "canary",
        "[0:0:0:0:0:0:0:1]": "canary",  # IPv6 literals compare as addresses, not as text
        "[2001:db8::1]:8443": "canary",
        "[2001:db8::2]": "other",
        "nothing.test": "other",
    }
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.plane.bound_port}") as client:
        for host, want in cases.items():
            r = await client.get("/", headers={"Host": host})
            assert r.headers["x-upstream"] == want, host
        r = await client.get("/", headers={"Host": "x.shop.example.com", "x-canary": "always"})
        assert r.headers["x-upstream"] == "canary"


async def test_absolute_form_and_http10(
    proxy_factory: ProxyFactory,
    upstream_factory: Callable[..., Awaitable[Upstream]],
    raw_client: Callable[[int], Awaitable[RawClient]],
) -> None:
    stable = await upstream_factory("stable")
    canary = await upstream_factory("canary")
    routes = "  - name: api\n    match: {host: api.example.com}\n    to: canary\n  - name: d\n    to: stable\n"
    app = await proxy_factory(config_text(stable.url, canary.url, routes=routes))
    assert app.plane is not None
    client = await raw_client(app.plane.bound_port)
    resp = await client.request(b"GET http://api.example.com/x HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
    assert resp.one("x-upstream") == b"canary"
    client = await raw_client(app.plane.bound_port)
    resp = await client.request(b"GET /x HTTP/1.0\r\n\r\n")  # no Host at all: no host rule matches
    assert resp.one("x-upstream") == b"stable"


def test_normalise_host() -> None:
    assert normalise_host(b"Shop.Example.com:443") == b"shop.example.com"
    assert normalise_host(b"[::1]:80") == b"[::1]"
    assert normalise_host(b"[0:0::0:1]:80") == b"[::1]" and normalise_host(b"[2001:DB8::1]") == b"[2001:db8::1]"
    assert normalise_host(b"[not-an-address]") == b"[not-an-address]"  # never matches a (valid) pattern
    assert normalise_host(b"example.com.") == b"example.com"
    assert normalise_host(b"") is None and normalise_host(None) is None


def test_validate_warns_about_routes_host_rules_shadow(tmp_path: Path) -> None:
    routes = (
        "  - name: all-shop\n    match: {host: ['*.shop.example.com', shop.example.com]}\n    to: stable\n"
        "  - name: www\n    match: {host: www.shop.example.com, path_prefix: /api}\n    to: canary\n"
        "  - name: api\n    match: {host: api.example.com, headers: {x-a: b}}\n    to: canary\n"
        "  - name: api-beta\n    match: {host: api.example.com}\n    to: canary\n"
        "  - name: rest\n    to: stable\n"
    )
    path = tmp_path / "c.yaml"
    path.write_text(config_text("http://127.0.0.1:1", "http://127.0.0.1:2", routes=routes))
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "validate", "-c", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, done.stderr  # api-beta is broader than api: both can match
    assert 'routes[1] ("www"): can never match: routes[0] ("all-shop")' in warnings[0]
    assert "host in *.shop.example.com, shop.example.com" in done.stdout
