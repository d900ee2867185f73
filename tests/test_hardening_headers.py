"""Header hygiene against hostile clients: Connection cannot strip framing or our own headers,
X-Forwarded-* trust follows `trusted_proxies`, the access log's `client` is the first untrusted hop,
underscore aliases of our headers are dropped, Via loops are refused, and neither an absolute-form
target nor Host ever chooses the destination."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import LoggingUpstream, RawClient, config_text, wait_until

from proxy.control.app import ProxyApp

ProxyFactory = Callable[..., Awaitable[ProxyApp]]
LogFactory = Callable[[], Awaitable[LoggingUpstream]]


async def one(app: ProxyApp, data: bytes) -> int:
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    try:
        return (await client.request(data)).status
    finally:
        client.close()


async def test_connection_tokens_cannot_strip_framing_host_or_forwarding(
    logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    up = await logging_upstream()
    app = await proxy_factory(config_text(up.url, up.url))
    status = await one(
        app,
        b"POST /p HTTP/1.1\r\nHost: h\r\nConnection: Content-Length, Transfer-Encoding, Host, X-Forwarded-For, "
        b"Via, X-Request-Id, X-Forwarded-Proto, X-Forwarded-Host, X-Drop\r\nX-Drop: d\r\nX-Forwarded-For: 10.9.9.9\r\n"
        b"Content-Length: 5\r\n\r\nhello",
    )
    assert status == 200
    (seen,) = up.requests
    assert seen.body == b"hello" and seen.get("content-length") == [b"5"]
    assert seen.get("host") == [b"h"]
    assert seen.get("x-forwarded-for") == [b"10.9.9.9, 127.0.0.1"]
    assert seen.get("x-forwarded-proto") == [b"http"] and seen.get("x-forwarded-host") == [b"h"]
    assert seen.get("via") == [b"1.1 " + app.plane.via] and len(seen.get("x-request-id")) == 1
    assert seen.get("x-drop") == [] and seen.get("connection") == []


@pytest.mark.parametrize(
    "alias",
    [
        b"X_Forwarded_For",
        b"x_forwarded_proto",
        b"X-Forwarded_Host",
        b"X_Request_Id",
        b"Proxy_Connection",
        b"Keep_Alive",
    ],
)
async def test_underscore_aliases_of_our_headers_are_dropped(
    alias: bytes, logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    """CGI-style upstreams read `X_Forwarded_For` and `X-Forwarded-For` as one variable: a client
    must not get to set it next to ours."""
    up = await logging_upstream()
    app = await proxy_factory(config_text(up.url, up.url))
    assert await one(app, b"GET /u HTTP/1.1\r\nHost: h\r\n%s: 6.6.6.6\r\nX_Other_Thing: kept\r\n\r\n" % alias) == 200
    (seen,) = up.requests
    names = [n.lower() for n, _ in seen.headers]
    assert alias.lower() not in names and b"6.6.6.6" not in b"".join(v for _, v in seen.headers)
    assert seen.get("x_other_thing") == [b"kept"]  # other underscore names pass


async def test_forwarded_proto_and_host_trusted_only_from_trusted_proxies(
    logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    up = await logging_upstream()
    head = b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: public.test\r\n\r\n"
    untrusted = await proxy_factory(config_text(up.url, up.url, extra="trusted_proxies: [10.0.0.0/8]\n"), name="a.yaml")
    trusted = await proxy_factory(config_text(up.url, up.url, extra="trusted_proxies: [127.0.0.1/32]\n"), name="b.yaml")
    assert await one(untrusted, head) == 200 and await one(trusted, head) == 200
    first, second = up.requests
    assert (first.get("x-forwarded-proto"), first.get("x-forwarded-host")) == ([b"http"], [b"h"])
    assert (second.get("x-forwarded-proto"), second.get("x-forwarded-host")) == ([b"https"], [b"public.test"])
    # X-Forwarded-For is appended to either way (the upstream decides how many hops it trusts).
    assert first.get("x-forwarded-for") == second.get("x-forwarded-for") == [b"127.0.0.1"]


@pytest.mark.parametrize(
    ("trusted", "xff", "client"),
    [
        ("[]", None, "127.0.0.1"),  # no trusted proxies: the peer
        ("[]", b"1.2.3.4", "127.0.0.1"),  # an untrusted peer's claim is not believed
        ("[127.0.0.0/8]", b"1.2.3.4", "1.2.3.4"),  # a trusted peer speaks for its client
        ("[127.0.0.0/8, 10.0.0.0/8]", b"1.2.3.4, 10.0.0.7", "1.2.3.4"),  # skip trusted hops from the right
        ("[127.0.0.0/8, 10.0.0.0/8]", b"6.6.6.6, 1.2.3.4, 10.0.0.7", "1.2.3.4"),  # left of it: client-made
        ("[127.0.0.0/8, 10.0.0.0/8]", b"10.0.0.8, 10.0.0.7", "10.0.0.8"),  # all trusted: the left-most
        ("[127.0.0.0/8]", b'bad"json, 1.2.3.4', "1.2.3.4"),
        ("[127.0.0.0/8, 10.0.0.0/8]", b'x"}{, 10.0.0.7', "10.0.0.7"),  # garbage stops the walk
        ("[127.0.0.0/8]", b"2001:DB8::1", "2001:db8::1"),
    ],
)
async def test_access_log_client_is_the_first_untrusted_hop(
    trusted: str,
    xff: bytes | None,
    client: str,
    logging_upstream: LogFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    up = await logging_upstream()
    log_path = tmp_path / "access.log"
    text = config_text(up.url, up.url, extra=f"trusted_proxies: {trusted}\n").replace(
        "access_log: false", f"access_log: {{enabled: true, path: {log_path}}}"
    )
    app = await proxy_factory(text)
    head = b"GET / HTTP/1.1\r\nHost: h\r\n" + (b"X-Forwarded-For: " + xff + b"\r\n" if xff else b"") + b"\r\n"
    assert await one(app, head) == 200
    assert app.plane is not None and app.plane.access_log is not None
    await wait_until(lambda: app.plane is not None and not app.plane.clients, what="request finished")
    app.plane.access_log.flush()
    (line,) = log_path.read_text().splitlines()
    assert json.loads(line)["client"] == client
    # What the upstream is told does not change: the peer is appended to the chain as received.
    expected = b"127.0.0.1" if xff is None else xff + b", 127.0.0.1"
    assert up.requests[0].get("x-forwarded-for") == [expected]


@pytest.mark.parametrize(
    ("via", "status"),
    [
        (b"1.1 OURS", 508),  # OURS: this instance's pseudonym
        (b"1.0 OURS", 508),
        (b"HTTP/1.1 OURS", 508),
        (b"1.1 edge, 1.1 OURS", 508),
        (b"1.1 OURS (comment)", 508),
        (b"1.1 OURS-2", 200),  # another name
        (b"1.1 edge (via OURS)", 200),  # a comment is not a pseudonym
        (b"1.1 edge", 200),
        (b"1.1 canary-proxy", 200),  # another canary-proxy instance (a chain), not us
    ],
)
async def test_via_loop_detection(
    via: bytes, status: int, logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    up = await logging_upstream()
    app = await proxy_factory(config_text(up.url, up.url))
    assert app.plane is not None
    via = via.replace(b"OURS", app.plane.via)
    assert await one(app, b"GET / HTTP/1.1\r\nHost: h\r\nVia: %s\r\n\r\n" % via) == status
    assert len(up.requests) == (1 if status == 200 else 0)


async def test_absolute_form_and_host_never_choose_the_destination(
    logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    stable, canary = await logging_upstream(), await logging_upstream()
    app = await proxy_factory(config_text(stable.url, canary.url))
    target = f"127.0.0.1:{canary.port}".encode()
    # Host, absolute-form authority and X-Forwarded-Host all name the canary: routing ignores them.
    assert await one(app, b"GET http://%s/a HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)) == 200
    assert await one(app, b"GET /b HTTP/1.1\r\nHost: %s\r\nX-Forwarded-Host: %s\r\n\r\n" % (target, target)) == 200
    assert await one(app, b"GET http://%s/c HTTP/1.1\r\nHost: h\r\n\r\n" % target) == 400
    assert stable.urls() == [b"/a", b"/b"] and canary.requests == []
    assert stable.requests[0].get("host") == [target]  # forwarded as origin-form, Host kept
