"""Client leg (HTTP/2), one stream's response side: the upstream leg's response head, body and
trailers (:class:`proxy.dataplane.legs.base.ClientLeg` calls) become HEADERS, DATA and trailing
HEADERS; the proxy's own answers (404, 502, 503, 504, 413...) carry the same headers as HTTP/1.1's.

Flow control towards the client (README, "HTTP/2"): DATA is sent within the client's window; at
most :data:`~.h2_limits.STREAM_BUFFER` bytes wait per stream, beyond that the upstream connection's
reading pauses until a WINDOW_UPDATE (or the connection's write buffer draining) lets more through.
"""

from __future__ import annotations

from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Protocol, cast

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from hpack import NeverIndexedHeaderTuple

from proxy.dataplane import forwarding_h2, recording
from proxy.dataplane.legs import http1_headers as H
from proxy.dataplane.legs.base import UpstreamLeg
from proxy.dataplane.legs.grpc_answers import grpc_error_fields
from proxy.dataplane.legs.h2_limits import STREAM_BUFFER
from proxy.dataplane.legs.h2_request import Header, response_fields
from proxy.dataplane.legs.http1_upstream import UpstreamConnection
from proxy.dataplane.request import Request

if TYPE_CHECKING:
    import asyncio

    from proxy.config.model import Timeouts
    from proxy.dataplane.context import PlaneContext

# Why the upstream connection's reading is held (bitmask): the client's window is exhausted and
# STREAM_BUFFER bytes wait, or the client connection's write buffer is full.
HOLD_WINDOW, HOLD_CONNECTION = 1, 2


def body_sent(req: Request) -> bool:
    """The whole request body arrived (its END_STREAM may still be on its way after the last byte
    a Content-Length announced: the upstream connection stays reusable, the stream is not reset)."""
    return req.complete or (req.te is None and 0 <= req.clen <= req.body_bytes)


class StreamOwner(Protocol):
    """What a stream needs of its HTTP/2 connection (:class:`.h2_client.H2ClientConnection`)."""

    plane: PlaneContext
    h2: H2Connection
    transport: asyncio.Transport | None
    blocked: bool  # the connection's write buffer is full

    def schedule_flush(self) -> None: ...

    def stream_done(self, stream: H2Responder) -> None: ...


class H2Responder:
    """One stream's response side: what the upstream leg reports becomes HEADERS, DATA and
    trailing HEADERS within the client's window (the request side is :class:`.h2_stream.H2Stream`)."""

    def __init__(self, conn: StreamOwner, sid: int, req: Request, peer: bytes) -> None:
        self.conn = conn
        self.plane = conn.plane
        self.sid = sid
        self.peer = peer
        self.current: Request | None = req
        config = req.snapshot.config
        self.timeouts: Timeouts = config.timeouts
        self.max_headers = config.limits.max_headers
        self.max_header_size = config.limits.max_header_size
        self.transport = conn.transport  # the upstream leg bounds its reads by this write buffer
        self.closed = False
        self.queued = False
        self.deadline = 0.0
        self.dkind = 0
        self.paused = 0  # legs.base.P_* reasons our receive window stays shut
        self.write_blocked_at = 0.0
        self.upstream: UpstreamConnection | None = None
        self.unacked = 0  # request body bytes received but not yet acknowledged to the client
        self.out: deque[bytes] = deque()  # response bytes waiting for the client's window
        self.out_bytes = 0
        self.ending = False  # the response is complete: end the stream once `out` is sent
        self.fin = False  # END_STREAM sent
        self.trailers: list[Header] | None = None
        self.hold = 0  # HOLD_* reasons the upstream's reading is paused
        self.held_at = 0.0
        self.last_in = self.plane.clock.now  # the request body's last progress (client_body timeout)

    # -- answers ---------------------------------------------------------------------------------

    def respond_error(self, req: Request, status: int) -> None:
        """Answer `req` with a proxy-generated error (404/413/502/503/504...), as HTTP/1.1 does."""
        req.status = status
        if req.reqid is None:
            req.reqid = self.plane.new_request_id()
        if status >= 400 and forwarding_h2.is_grpc(req.lines):
            # A gRPC client reads grpc-status: a trailers-only answer (README, "gRPC").
            grpc = [(b":status", b"200"), *grpc_error_fields(status), *self._our_fields(req, False)]
            req.sent = 0
            if self.send_headers(grpc, True):
                self.fin = True
            self.ending = True
            self.pump()
            return
        body = b"%d %s\n" % (status, HTTPStatus(status).phrase.encode())
        fields = [
            (b":status", b"%d" % status),
            (b"date", H.http_date()),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            *self._our_fields(req, False),
        ]
        head_only = req.method == b"HEAD"
        req.sent = 0 if head_only else len(body)
        if self.send_headers(fields, head_only):
            self.fin = head_only
            if not head_only:
                self.out.append(body)
                self.out_bytes += len(body)
        self.ending = True
        self.pump()

    def send_headers(self, fields: list[Header], end: bool) -> bool:
        """A HEADERS frame on this stream; False when the stream is gone (reset by the client in
        the same read that opened it, say), which then ends like a lost stream."""
        if self.closed:
            return False
        try:
            self.conn.h2.send_headers(self.sid, fields, end_stream=end)
        except ProtocolError:
            self.lost()
            return False
        return True

    def lost(self) -> None:
        """The stream is gone (see :meth:`.h2_stream.H2Stream.lost`)."""
        raise NotImplementedError

    def _our_fields(self, req: Request, upstream_reqid: bool) -> list[Header]:
        fields = []
        via = self.plane.via_line  # `Via: 1.1 NAME\r\n`, or b"" when Via is off
        if via:
            fields.append((b"via", via[5:-2]))
        if not upstream_reqid and req.reqid is not None:
            fields.append(NeverIndexedHeaderTuple(b"x-request-id", req.reqid))  # unique: not worth indexing
        if req.set_cookie is not None:
            fields.append(NeverIndexedHeaderTuple(b"set-cookie", req.set_cookie))
        return fields

    # -- ClientLeg (the upstream leg) -----------------------------------------------------------

    def tunnel_write(self, data: bytes) -> None:
        pass  # never: HTTP/2 streams carry no Upgrade

    def up_write(self, t: asyncio.Transport, data: bytes) -> None:
        t.write(data)

    def flush_later(self, read_size: int) -> None:
        self.conn.schedule_flush()

    def response_interim(self, status: int, reason: bytes, lines: list[bytes]) -> None:
        self.send_headers([(b":status", b"%d" % status), *response_fields(lines)], False)

    def response_head(self, leg: UpstreamLeg, status: int) -> None:
        conn = cast(UpstreamConnection, leg)
        req = self.current
        if req is None or self.closed:
            return
        if not 200 <= status <= 599:  # 101 cannot happen without an Upgrade request
            self.upstream_protocol_error(conn, f"status {status} out of range")
            return
        req.status = status
        fields = [(b":status", b"%d" % status), *response_fields(conn.filtered_lines())]
        fields += self._our_fields(req, conn.has_reqid)
        if conn.trailer is not None and conn.chunked:
            fields.append((b"trailer", conn.trailer))
        # A trailers-only answer (gRPC: grpc-status in the head) ends the stream with its head too.
        bodyless = req.method == b"HEAD" or status == 204 or status == 304 or conn.ended_with_head
        if not self.send_headers(fields, bodyless):
            return
        if bodyless:
            self.ending = self.fin = True
        if not conn.chunked and not conn.has_length and not bodyless:
            conn.until_close = True
        if req.method == b"HEAD":
            # llhttp would wait for a HEAD response's announced body: finish here, parse afresh.
            keep = conn.head_keep_alive()
            conn.reset_parser()
            self.response_complete(conn, keep)

    def response_body(self, body: bytes) -> None:
        req = self.current
        if req is None or self.closed or self.ending:
            return
        req.sent += len(body)
        self.out.append(body)
        self.out_bytes += len(body)
        self.pump()

    def response_complete(self, leg: UpstreamLeg, upstream_keep_alive: bool) -> None:
        conn = cast(UpstreamConnection, leg)
        req = self.current
        if req is None:
            return
        if conn.trailers:
            self.trailers = response_fields(conn.trailers)
            conn.trailers = None
        self.upstream = None
        conn.client = None
        conn.until_close = False
        if self.hold and conn.transport is not None:
            conn.transport.resume_reading()  # back in the pool: it must see the server's FIN
        self.hold = 0
        pool = req.pool
        if pool is not None:
            pool.release(conn, upstream_keep_alive and body_sent(req), self.timeouts.idle)
        self.ending = True
        self.pump()

    def upstream_protocol_error(self, leg: UpstreamLeg, why: str) -> None:
        """An invalid response (the exchange decides: :class:`.h2_stream.H2Stream`)."""
        raise NotImplementedError

    # -- towards the client ----------------------------------------------------------------------

    def pump(self) -> None:
        """Send what the client's window allows; end the stream once everything is out; hold or
        release the upstream's reading by what still waits."""
        if self.closed:
            return
        h2 = self.conn.h2
        out = self.out
        if out:
            try:
                window = h2.local_flow_control_window(self.sid)
                frame = h2.max_outbound_frame_size
                while out and window > 0:
                    chunk = out[0]
                    n = min(window, frame, len(chunk))
                    if n == len(chunk):
                        out.popleft()
                    else:
                        out[0] = chunk[n:]
                        chunk = chunk[:n]
                    h2.send_data(self.sid, chunk)
                    window -= n
                    self.out_bytes -= n
            except ProtocolError:
                self.lost()
                return
        self.conn.schedule_flush()
        if not out and self.ending:
            self._end()
            return
        self.set_hold(HOLD_WINDOW, self.out_bytes > STREAM_BUFFER)

    def set_hold(self, reason: int, on: bool) -> None:
        """Pause or resume the upstream's reading for `reason` (HOLD_*)."""
        before = self.hold
        self.hold = before | reason if on else before & ~reason
        up = self.upstream
        if up is None or up.transport is None or bool(before) == bool(self.hold):
            return
        if self.hold:
            self.held_at = self.plane.clock.now
            up.transport.pause_reading()
            up.deadline = 0.0  # a slow client is the send timeout's business, not the upstream's
        else:
            up.transport.resume_reading()
            if up.started:
                up.deadline = self.plane.clock.read() + self.timeouts.response

    def _end(self) -> None:
        req = self.current
        h2 = self.conn.h2
        if req is None:
            return
        try:
            if not self.fin:
                self.fin = True
                if self.trailers:
                    h2.send_headers(self.sid, self.trailers, end_stream=True)
                else:
                    h2.end_stream(self.sid)
            self.trailers = None
            if not body_sent(req):
                # Answered before the request body ended: stop the upload (RFC 9113 8.1).
                h2.reset_stream(self.sid, ErrorCodes.NO_ERROR)
        except ProtocolError:
            self.lost()
            return
        self.conn.schedule_flush()
        self.closed = True
        self.current = None
        if self.unacked:
            h2.acknowledge_received_data(self.unacked, self.sid)
            self.unacked = 0
        recording.finish(self.plane, req, aborted=False)
        self.conn.stream_done(self)
