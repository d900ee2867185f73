"""The HTTP/2 client leg without sockets: the request mapping (pseudo-headers, cookie crumbs,
limits), the flood counter, the hand-off from the HTTP/1.1 leg (preface split across reads), and
the connection's answers driven by a real h2 client state machine over a fake transport."""

from __future__ import annotations

from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ResponseReceived, StreamEnded
from support.fakes import plane_context, snapshot

from proxy.dataplane.legs.h2_client import PREFACE, H2ClientConnection
from proxy.dataplane.legs.h2_limits import Counter
from proxy.dataplane.legs.h2_request import build, response_fields, trailer_lines
from proxy.dataplane.legs.http1_client import ClientConnection
from proxy.dataplane.legs.http1_request import Reject
from proxy.dataplane.request import Request

CONFIG = """
listen: 127.0.0.1:0
access_log: false
upstreams:
  stable: {endpoints: [http://10.0.0.1:80]}
routes:
  - name: api
    match: {headers: {x-canary: {exact: always}}, path_prefix: /api}
    to: stable
"""


Fields = list[tuple[bytes, bytes]]


def hdrs(
    path: bytes = b"/", method: bytes = b"GET", authority: bytes = b"shop.test", *extra: tuple[bytes, bytes]
) -> Fields:
    return [(b":method", method), (b":scheme", b"http"), (b":path", path), (b":authority", authority), *extra]


def built(headers: list[tuple[bytes, bytes]], ended: bool = True, route: frozenset[bytes] = frozenset()) -> Request:
    snap, _, _ = snapshot()
    req = Request(snap)
    build(req, headers, ended, b"canary-proxy", route)
    return req


def test_pseudo_headers_map_like_an_http1_head() -> None:
    req = built(hdrs(b"/a/b?x=1", b"POST", b"Shop.Test:8443", (b"content-length", b"5")), ended=False)
    assert (req.method, req.target, req.path, req.query) == (b"POST", b"/a/b?x=1", b"/a/b", b"x=1")
    assert req.host == b"Shop.Test:8443" and req.lines[0] == b"Host: Shop.Test:8443\r\n"
    assert req.clen == 5 and req.te is None


def test_body_of_unknown_length_goes_chunked_and_trailers_pass() -> None:
    req = built(hdrs(b"/up", b"POST"), ended=False)
    assert req.te == b"chunked" and req.clen == -1
    assert built(hdrs()).te is None  # END_STREAM on HEADERS: no body
    lines = trailer_lines([(b"grpc-status", b"0"), (b"content-length", b"9"), (b":path", b"/x")])
    assert lines == [b"grpc-status: 0\r\n"]


def test_cookie_crumbs_join_and_route_headers_see_them() -> None:
    route = frozenset({b"cookie", b"x-canary"})
    fields = hdrs(b"/", b"GET", b"h", (b"cookie", b"a=1"), (b"x-canary", b"always"), (b"cookie", b"b=2"))
    req = built(fields, route=route)
    assert req.rhdrs[b"cookie"] == b"a=1; b=2" and req.rhdrs[b"x-canary"] == b"always"
    assert [ln for ln in req.lines if ln.startswith(b"cookie")] == [b"cookie: a=1; b=2\r\n"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (hdrs(b"/", b"GET", b"h", *[(b"x-%d" % i, b"v") for i in range(120)]), 431),  # max_headers 100
        (hdrs(b"/", b"GET", b"h", (b"x-big", b"v" * 40_000)), 431),  # max_header_size 32 KiB
        (hdrs(b"/" + b"a" * 9000), 414),  # max_url_length 8 KiB
        (hdrs(b"/", b"GET", b"a.test", (b"host", b"b.test")), 400),  # Host naming another entity
        (hdrs(b"/", b"CONNECT"), 405),
        ([(b":method", b"GET"), (b":authority", b"h")], 400),  # no :path
        (hdrs(b"/", b"GET", b"h", (b"content-length", b"x")), 400),
        (hdrs(b"/", b"POST", b"h", (b"content-length", b"3")), 400),  # ended, yet a length announced
    ],
)
def test_refused_requests(headers: list[tuple[bytes, bytes]], status: int) -> None:
    with pytest.raises(Reject) as exc:
        built(headers)
    assert exc.value.status == status


def test_response_fields_are_lower_case_without_connection_specific_ones() -> None:
    lines = [b"Content-Type: text/plain\r\n", b"Keep-Alive: 5\r\n", b"X-A: b: c\r\n", b"Set-Cookie: k=v\r\n"]
    assert response_fields(lines) == [(b"content-type", b"text/plain"), (b"x-a", b"b: c"), (b"set-cookie", b"k=v")]


def test_counter_counts_in_windows() -> None:
    c = Counter(3, period=10.0)
    assert [c.hit(100.0 + i) for i in range(4)] == [False, False, False, True]
    assert not c.hit(111.0)  # a new window


class FakeTransport:
    """What the client leg uses of a transport; records writes and protocol changes."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.protocol: Any = None
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 5555) if name == "peername" else default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def write(self, data: bytes) -> None:
        self.written += data

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def client() -> H2Connection:
    c = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    c.initiate_connection()
    return c


def test_preface_split_across_reads_hands_over() -> None:
    ctx = plane_context(CONFIG, idle=0)
    leg = ClientConnection(ctx)
    t = FakeTransport()
    leg.connection_made(t)  # type: ignore[arg-type]
    first = client().data_to_send()
    assert first.startswith(PREFACE)
    leg.data_received(first[:5])
    leg.data_received(first[5:11])
    assert t.protocol is None and not t.written  # not decided yet: nothing parsed, nothing sent
    leg.data_received(first[11:])
    assert isinstance(t.protocol, H2ClientConnection)
    assert leg not in ctx.clients and t.protocol in ctx.clients
    assert t.written[3] == 0x4  # the server's SETTINGS frame


def test_http1_is_untouched() -> None:
    ctx = plane_context(CONFIG, idle=0)
    leg = ClientConnection(ctx)
    t = FakeTransport()
    leg.connection_made(t)  # type: ignore[arg-type]
    leg.data_received(b"PRI")  # could still be the preface
    leg.data_received(b"NT / HTTP/1.1\r\nHost: h\r\n\r\n")  # "PRINT": an HTTP/1.1 method after all
    assert t.protocol is None
    leg.flush()
    assert bytes(t.written).startswith(b"HTTP/1.1 ")


def h2_pair() -> tuple[Any, H2ClientConnection, FakeTransport, H2Connection]:
    ctx = plane_context(CONFIG, idle=0)
    conn = H2ClientConnection(ctx, b"192.0.2.7")
    t = FakeTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    c = client()
    conn.data_received(c.data_to_send())
    c.receive_data(bytes(t.written))
    t.written.clear()
    return ctx, conn, t, c


def exchange(conn: H2ClientConnection, t: FakeTransport, c: H2Connection) -> list[Any]:
    conn.data_received(c.data_to_send())
    conn.flush_queued()
    events = c.receive_data(bytes(t.written))
    t.written.clear()
    return events


def test_unrouted_stream_gets_404_with_our_headers() -> None:
    ctx, conn, t, c = h2_pair()
    c.send_headers(1, hdrs(b"/nothing"), end_stream=True)
    events = exchange(conn, t, c)
    (resp,) = [e for e in events if isinstance(e, ResponseReceived)]
    fields = dict(resp.headers)  # type: ignore[arg-type]
    assert fields[b":status"] == b"404" and fields[b"x-request-id"] and fields[b"date"]
    assert fields[b"via"] == b"1.1 canary-proxy"
    assert any(isinstance(e, StreamEnded) and e.stream_id == 1 for e in events)
    assert ctx.stats.in_flight == 0 and not conn.streams


def test_rapid_reset_gets_goaway_enhance_your_calm() -> None:
    ctx, conn, t, c = h2_pair()
    for i in range(300):
        sid = 1 + 2 * i
        c.send_headers(sid, hdrs(b"/nothing"), end_stream=True)  # answered 404 at once; reset anyway
        c.reset_stream(sid, ErrorCodes.CANCEL)
    conn.data_received(c.data_to_send())
    goaways = [payload for ftype, _, payload in frames(bytes(t.written)) if ftype == 0x7]
    assert [int.from_bytes(p[4:8], "big") for p in goaways] == [ErrorCodes.ENHANCE_YOUR_CALM]
    assert t.closed and conn.closed and not conn.streams
    assert ctx.stats.in_flight == 0  # every started exchange was finished (recorded as 499)


def frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream, payload) of each frame in `data`."""
    out = []
    while len(data) >= 9:
        n = int.from_bytes(data[:3], "big")
        out.append((data[3], int.from_bytes(data[5:9], "big"), data[9 : 9 + n]))
        data = data[9 + n :]
    return out


def test_drain_sends_goaway_and_refuses_new_streams() -> None:
    ctx, conn, t, c = h2_pair()
    c.send_headers(1, hdrs(b"/nothing"), end_stream=True)
    exchange(conn, t, c)
    ctx.draining = True
    assert conn.is_idle()
    frames = bytes(t.written)
    assert frames[3] == 0x7 and int.from_bytes(frames[9:13], "big") == 1  # GOAWAY, last stream 1
    t.written.clear()
    c.send_headers(3, hdrs(b"/nothing"), end_stream=True)
    conn.data_received(c.data_to_send())
    conn.flush_queued()
    frames = bytes(t.written)
    assert frames[3] == 0x3 and int.from_bytes(frames[9:13], "big") == ErrorCodes.REFUSED_STREAM
    assert not conn.streams and not conn.closed  # nothing in flight: the drain closes it next


def test_concurrent_streams_key_is_validated_with_its_path() -> None:
    from proxy.config import parse_config
    from proxy.config.errors import ConfigError

    base = CONFIG + "limits:\n  http2_max_concurrent_streams: N\n"
    assert parse_config(base.replace("N", "250")).limits.http2_max_concurrent_streams == 250
    assert parse_config(CONFIG).limits.http2_max_concurrent_streams == 100
    with pytest.raises(ConfigError, match=r"limits\.http2_max_concurrent_streams") as exc:
        parse_config(base.replace("N", "0"))
    assert "line 11" in str(exc.value), exc.value


def test_encoder_table_is_shrunk_with_one_size_update() -> None:
    """Our HPACK table stays small (cheap lookups); RFC 7541 4.2: the first header block announces
    the final size once (the library's own resize to the client's value is folded in)."""
    _, conn, t, c = h2_pair()
    c.send_headers(1, hdrs(b"/nothing"), end_stream=True)
    conn.data_received(c.data_to_send())
    conn.flush_queued()
    (block,) = [p for ftype, _, p in frames(bytes(t.written)) if ftype == 0x1]
    assert block.startswith(b"\x3f\xe1\x07")  # size update to 1024
    assert block[3] & 0xE0 != 0x20  # and no second one
    assert conn.h2.encoder.header_table_size == 1024
