"""Malformed and dangerous requests get a 4xx/5xx from the proxy itself and never reach an upstream.

Each case first sends a valid request on the same connection so a pooled upstream connection is
ready: a proxy that forwarded eagerly would be caught by the recording upstream."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from conftest import RawClient, Upstream, config_text

from proxy.control.app import ProxyApp

ProxyFactory = Callable[..., Awaitable[ProxyApp]]

H = b"Host: h\r\n"
POST = b"POST / HTTP/1.1\r\n" + H
TE = b"Transfer-Encoding: chunked\r\n"
LIMITS = "limits: {max_header_size: 4KiB, max_headers: 20, max_url_length: 1KiB}\n"

CASES: list[tuple[str, bytes, int]] = [
    ("cl-and-te", POST + b"Content-Length: 5\r\n" + TE + b"\r\n0\r\n\r\n", 400),
    ("te-and-cl", POST + TE + b"Content-Length: 5\r\n\r\n0\r\n\r\n", 400),
    ("duplicate-cl", POST + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400),
    ("cl-list", POST + b"Content-Length: 1, 1\r\n\r\nx", 400),
    ("cl-sign", POST + b"Content-Length: +1\r\n\r\nx", 400),
    ("cl-negative", POST + b"Content-Length: -1\r\n\r\nx", 400),
    ("bad-chunk-size", POST + TE + b"\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-overflow", POST + TE + b"\r\n" + b"f" * 20 + b"\r\n", 400),
    ("chunk-missing-crlf", POST + TE + b"\r\n3\r\nabcX0\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-Folded: a\r\n b\r\n\r\n", 400),
    ("obs-fold-tab", b"GET / HTTP/1.1\r\n" + H + b"X-Folded: a\r\n\tb\r\n\r\n", 400),
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    ("cr-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", 400),
    ("lf-only", b"GET / HTTP/1.1\n" + b"Host: h\n\n", 400),
    ("bare-lf-in-header", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\nX-B: b\r\n\r\n", 400),
    ("nul-in-name", b"GET / HTTP/1.1\r\n" + H + b"X\x00A: a\r\n\r\n", 400),
    ("oversized-header", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 5000 + b"\r\n\r\n", 431),
    ("too-many-headers", b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(25)) + b"\r\n", 431),
    ("oversized-url", b"GET /" + b"u" * 2000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("absolute-form-other-host", b"GET http://evil.test/x HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("absolute-form-no-host", b"GET http://h/x HTTP/1.1\r\n\r\n", 400),
    ("authority-form", b"GET h:80 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("connect", b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n", 405),
    ("http10-chunked", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("unknown-te", POST + b"Transfer-Encoding: gzip\r\n\r\n", 501),
    ("te-gzip-chunked", POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    ("duplicate-te", POST + TE + TE + b"\r\n0\r\n\r\n", 400),
    ("missing-host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("duplicate-host", b"GET / HTTP/1.1\r\nHost: h\r\nhost: other\r\n\r\n", 400),
    ("http2-version", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("bad-version", b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400),
    ("unknown-method", b"FROB / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("space-in-target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("control-in-target", b"GET /\x7f HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("expect-other", POST + b"Expect: something\r\nContent-Length: 0\r\n\r\n", 417),
    ("via-loop", b"GET / HTTP/1.1\r\n" + H + b"Via: 1.1 OURS\r\n\r\n", 508),  # OURS: our pseudonym
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
]  # fmt: skip


@pytest.mark.parametrize(("request_bytes", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_malformed_request_is_refused_and_never_forwarded(
    request_bytes: bytes,
    status: int,
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_factory: ProxyFactory,
) -> None:
    stable = await upstream_factory("stable")
    app = await proxy_factory(config_text(stable.url, stable.url, extra=LIMITS))
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    ok = await client.request(b"GET /warm HTTP/1.1\r\nHost: h\r\n\r\n")
    assert ok.status == 200
    await client.send(request_bytes.replace(b"OURS", app.plane.via))
    resp = await client.response()
    rest = await client.at_eof()  # the connection is closed after the error
    client.close()
    assert resp.status == status, resp.raw
    assert resp.get("connection") == [b"close"]
    assert resp.body.startswith(str(status).encode())
    assert rest == b""
    assert [s["path"] for s in stable.seen] == ["/warm"]
    assert app.plane.stats.rejected == 1


async def test_malformed_request_after_pipelined_good_one(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    """The good request is answered first, then the error, in order; nothing after it is read."""
    stable = await upstream_factory("stable")
    app = await proxy_factory(config_text(stable.url, stable.url))
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    await client.send(
        b"POST /good HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /bad HTTP/1.1\r\nHost: h\r\nHost: h2\r\n\r\n"
        b"GET /never HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    good = await client.response()
    bad = await client.response()
    rest = await client.at_eof()
    client.close()
    assert good.status == 200 and good.body == b"stable POST /good 3\n"
    assert bad.status == 400 and rest == b""
    assert [s["path"] for s in stable.seen] == ["/good"]


async def test_smuggling_attempt_does_not_reach_upstream(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    """Classic CL.TE: if the proxy used Content-Length and the upstream chunked, `/admin` would be
    smuggled. The proxy refuses the ambiguous request outright."""
    stable = await upstream_factory("stable")
    app = await proxy_factory(config_text(stable.url, stable.url))
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    await client.send(
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: h\r\nX: x"
    )
    resp = await client.response()
    await client.at_eof()
    client.close()
    assert resp.status == 400
    assert stable.seen == []


async def test_absolute_form_for_own_host_is_accepted(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    stable = await upstream_factory("stable")
    app = await proxy_factory(config_text(stable.url, stable.url))
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    resp = await client.request(b"GET http://H:8080/x?y=1 HTTP/1.1\r\nHost: h:8080\r\n\r\n")
    client.close()
    assert resp.status == 200 and resp.body == b"stable GET /x?y=1 0\n"
    assert stable.seen[0]["path"] == "/x?y=1"
