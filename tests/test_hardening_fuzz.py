"""Property-based: arbitrary mixes of well-formed requests and garbage, cut at arbitrary points, fed
to the real listener over a real socket. For every example:

* the upstream (raw, logging every byte) sees exactly the well-formed requests that came before the
  first garbage, in order, with their bodies: never more, never a piece of garbage;
* the client gets one 200 per such request, then a 4xx and a close if garbage followed;
* nothing raises inside the proxy, and client connections, upstream connections and file
  descriptors return to their baseline (at most: objects of earlier tests may still be collected).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Awaitable, Callable
from typing import Any

from conftest import LoggingUpstream, RawClient, config_text, fd_count, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.control.app import ProxyApp

ProxyFactory = Callable[..., Awaitable[ProxyApp]]
LogFactory = Callable[[], Awaitable[LoggingUpstream]]

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
VALUE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ;=,/.", max_size=30).map(str.strip)


@st.composite
def valid_request(draw: st.DrawFn) -> tuple[str, bytes, bytes]:
    """(kind, body, bytes without the path: `{path}` is filled in later)."""
    kind = draw(st.sampled_from(["get", "length", "chunked"]))
    headers = b"".join(
        b"X-%s: %s\r\n" % (n.encode(), v.encode()) for n, v in draw(st.lists(st.tuples(TOKEN, VALUE), max_size=4))
    )
    if kind == "get":
        return kind, b"", b"GET {path} HTTP/1.1\r\nHost: h\r\n" + headers + b"\r\n"
    body = draw(st.binary(max_size=300))
    head = b"POST {path} HTTP/1.1\r\nHost: h\r\n" + headers
    if kind == "length":
        return kind, body, head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return kind, body, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"


# Garbage that is malformed whatever surrounds it (it always starts at a message boundary).
GARBAGE = st.one_of(
    st.binary(max_size=200).map(lambda b: b"\x01" + b),  # not a method
    st.just(b"GET /g HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n"),
    st.just(b"GET /g HTTP/1.1\r\nHost: h\r\nX: a\nY: b\r\n\r\n"),
    st.just(b"POST /g HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    st.just(b"POST /g HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
    st.just(b"GET /g HTTP/1.1\r\nHost: h\r\nHost: x\r\n\r\n"),
    st.just(b"GET /g HTTP/1.1\r\n\r\n"),
    st.just(b"GET /g HTTP/1.1\r\nTransfer_Encoding: chunked\r\nHost: h\r\n\r\n"),
)
SEGMENTS = st.lists(st.one_of(valid_request(), GARBAGE), min_size=1, max_size=6)


class Harness:
    """One proxy and one logging upstream, shared by every example of a test."""

    def __init__(self, app: ProxyApp, up: LoggingUpstream) -> None:
        self.app = app
        self.up = up
        self.errors: list[dict[str, Any]] = []
        self.base_fds = 0
        self.n = 0


async def send_in_pieces(client: RawClient, data: bytes, splits: list[int]) -> None:
    """Write `data` cut at `splits` (taken modulo its length), letting the proxy read each piece on
    its own. The proxy may close early (after an error response): what is left is not sent."""
    cuts = sorted({s % (len(data) + 1) for s in splits})
    try:
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            if b > a:
                client.writer.write(data[a:b])
                await client.writer.drain()
                await asyncio.sleep(0.001)
    except ConnectionError:
        pass


async def run_example(h: Harness, segments: list[Any], splits: list[int]) -> None:
    plane = h.app.plane
    assert plane is not None
    up = h.up
    before = len(up.requests)
    data = b""
    expected: list[tuple[bytes, bytes]] = []
    garbage = False
    for seg in segments:
        if isinstance(seg, bytes):
            data += seg
            garbage = True
            continue
        _kind, body, raw = seg
        h.n += 1
        path = b"/ok-%d" % h.n
        data += raw.replace(b"{path}", path, 1)
        if not garbage:
            expected.append((path, body))
    client = await RawClient.connect(plane.bound_port)
    try:
        await send_in_pieces(client, data, splits)
        for path, _ in expected:
            resp = await client.response()
            assert resp.status == 200 and resp.body == path, resp.raw
        if garbage:
            resp = await client.response()
            assert 400 <= resp.status < 600 and resp.get("connection") == [b"close"], resp.raw
            assert await client.at_eof() == b""
    finally:
        client.close()
    await wait_until(lambda: not plane.clients, what="client connections released")
    seen = [(r.url, r.body) for r in up.requests[before:]]
    assert seen == expected
    assert up.parse_errors == 0 and up.partial == 0
    assert b"/g " not in up.raw
    assert h.errors == []
    assert plane.stats.in_flight == 0
    await wait_until(
        lambda: fd_count() <= h.base_fds + len(plane.upstream_conns) + up.open,
        what=f"fds back to baseline {h.base_fds} + pooled upstream connections",
    )


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(segments=SEGMENTS, splits=st.lists(st.integers(0, 10_000), max_size=8))
async def test_mixed_valid_and_garbage_never_forwards_more_than_was_well_formed(
    segments: list[Any], splits: list[int], fuzz: Harness
) -> None:
    await run_example(fuzz, segments, splits)


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.binary(min_size=1, max_size=2000), splits=st.lists(st.integers(0, 10_000), max_size=8))
async def test_arbitrary_bytes_never_crash_or_leak(data: bytes, splits: list[int], fuzz: Harness) -> None:
    """Pure noise (sometimes after a valid head): answered or dropped, never forwarded as a request
    unless it is one, never a crash, never a leak."""
    plane = fuzz.app.plane
    assert plane is not None
    before = len(fuzz.up.requests)
    client = await RawClient.connect(plane.bound_port)
    try:
        await send_in_pieces(client, data, splits)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            await asyncio.wait_for(client.reader.read(65536), 0.05)
    finally:
        client.close()
    await wait_until(lambda: not plane.clients, what="client connections released")
    assert fuzz.errors == []
    assert plane.stats.in_flight == 0
    # Random bytes can only be a request if they contain a request line and a blank line.
    if b" HTTP/1." not in data or b"\r\n\r\n" not in data:
        assert len(fuzz.up.requests) == before
    assert fuzz.up.parse_errors == 0
    await wait_until(
        lambda: fd_count() <= fuzz.base_fds + len(plane.upstream_conns) + fuzz.up.open, what="fds back to baseline"
    )


# A fixture at the bottom keeps the property tests above readable.
import pytest  # noqa: E402


@pytest.fixture
async def fuzz(logging_upstream: LogFactory, proxy_factory: ProxyFactory) -> Harness:
    up = await logging_upstream()
    app = await proxy_factory(config_text(up.url, up.url, extra="timeouts: {client_header: 2s}\n"))
    h = Harness(app, up)
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: h.errors.append(ctx))
    gc.collect()  # sockets earlier tests left to the garbage collector must not close mid-test
    h.base_fds = fd_count()
    return h
