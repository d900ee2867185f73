"""Upstream leg (HTTP/2), one request: an :class:`H2UpstreamStream` on a shared connection
(:class:`.h2_upstream.H2Upstream`) is what the exchange and the client leg see: the same
upstream-leg face as :class:`.http1_upstream.UpstreamConnection` (it is one), so routing, retries,
the one failure path, timeouts, outlier detection and recording are the exchange's, unchanged.

Flow control: response DATA is acknowledged as it is handed to the client leg, and held back
while the client leg has paused the stream (its write buffer is full): the server's window then
stops it. The request body waits for the server's window, pausing the client while it waits.
A stream the server refused unprocessed (REFUSED_STREAM, or above a GOAWAY's last stream id) is
tried again through the exchange's retry rules, with its body when that was small enough to keep.
"""

from __future__ import annotations

import contextlib
from http import HTTPStatus
from typing import TYPE_CHECKING, cast

import h2.exceptions

from proxy.analysis.stats import KIND_CONNECT
from proxy.config import grpc_codes
from proxy.dataplane import exchange, forwarding, forwarding_h2
from proxy.dataplane.context import ClientSide
from proxy.dataplane.legs.base import P_UPLOAD
from proxy.dataplane.legs.h2_upstream_seams import ERRORS, StreamHost, StreamTransport
from proxy.dataplane.legs.http1_upstream import UpstreamConnection

if TYPE_CHECKING:
    from proxy.dataplane.pools import EndpointPool
    from proxy.dataplane.request import Request

_INTERIM = frozenset(s.value for s in HTTPStatus if 100 <= s.value < 200)
CANCEL = 0x8
REFUSED_STREAM = 0x7
# A request body up to this size is kept until the response starts, so that a stream the server
# refused unprocessed can be sent again; a larger one is streamed and cannot be.
REPLAY_MAX = 65536


class H2UpstreamStream(UpstreamConnection):
    """One request on an :class:`H2Upstream`, as an upstream leg."""

    def __init__(self, pool: EndpointPool, conn: StreamHost) -> None:
        super().__init__(pool)
        self.conn = conn
        self.sid = 0  # 0: not opened yet (a reserved slot on the connection)
        self.req: Request | None = None
        self.transport = StreamTransport(self.hold, self.release_hold, conn.buffer_size)
        self.pending: list[bytes] = []  # request body waiting for the server's window
        self.end_pending = False
        self.blocked = False  # the client is paused until `pending` is sent
        self.saved: list[bytes] | None = []  # the body sent so far (None: too large to keep)
        self.saved_size = 0
        self.held = False  # the client leg cannot take more: DATA is not acknowledged
        self.unacked = 0
        self.grpc_deadline = 0.0  # the request's grpc-timeout, as a monotonic deadline (0: none)
        self.detached = False

    # -- the request (called by the client leg) ---------------------------------------------------

    def send_request(self, req: Request) -> None:
        """Open the stream: HEADERS, whatever body has arrived, and the end when it is complete."""
        client = self.client
        conn = self.conn
        if client is None or self.detached:
            return
        self.req = req
        if conn.goaway or conn.transport is None:
            conn.ctx.loop.call_soon(self.refused)  # never sent: another connection takes it
            return
        ctx = conn.ctx
        snap = req.snapshot
        trusted = forwarding.is_trusted(client.peer, snap.trusted)
        via = b"%s %s" % (b"1.0" if req.version10 else b"1.1", ctx.via) if ctx.via else b""
        headers, timeout = forwarding_h2.request_headers(
            req, client.peer, trusted, self.pool.endpoint.key.encode(), via, conn.scheme, ctx.scheme
        )
        if timeout > 0.0:
            self.grpc_deadline = req.t0 + timeout
        try:
            self.sid = conn.h2.get_next_available_stream_id()
            conn.h2.send_headers(self.sid, headers)
        except (h2.exceptions.ProtocolError, ValueError, TypeError) as exc:
            client.upstream_protocol_error(self, f"request not sendable over HTTP/2: {exc}")
            return
        conn.opened(self.sid, self)
        ctx.upstream_conns.add(self)
        chunks, req.body = req.body, []
        for chunk in chunks:
            self.send_body(req, chunk)
        if req.complete:
            self.send_end(req)
        else:
            self.deadline = self.grpc_deadline
        conn.want_flush()

    def send_body(self, req: Request, body: bytes) -> None:
        """Pass one piece of the request body on, as far as the server's window allows."""
        if self.client is None or self.detached or not body:
            return
        req.body_forwarded = True
        if self.saved is not None:
            self.saved_size += len(body)
            if self.saved_size > REPLAY_MAX:
                self.saved = None
            else:
                self.saved.append(body)
        self.pending.append(body)
        self.pump()

    def send_end(self, req: Request) -> None:
        """The request is complete: END_STREAM (with its trailers, if any) once the body is out."""
        client = self.client
        if client is None or self.detached:
            return
        self.end_pending = True
        self.pump()
        deadline = self.conn.ctx.clock.now + (req.try_timeout or client.timeouts.response)
        self.deadline = min(deadline, self.grpc_deadline) if self.grpc_deadline else deadline

    def pump(self) -> None:
        """Send what the flow-control windows allow; pause the client while body bytes wait."""
        conn = self.conn
        sid = self.sid
        client = self.client
        if not sid or self.detached or client is None:
            return
        try:
            while self.pending:
                room = min(conn.h2.local_flow_control_window(sid), conn.h2.max_outbound_frame_size)
                if room <= 0:
                    break
                chunk = self.pending[0]
                if len(chunk) > room:
                    self.pending[0] = chunk[room:]
                    chunk = chunk[:room]
                else:
                    self.pending.pop(0)
                conn.h2.send_data(sid, chunk)
            if not self.pending and self.end_pending:
                self.end_pending = False
                req = self.req
                trailers = forwarding_h2.trailer_fields(req.trailers if req is not None else None)
                if trailers:
                    conn.h2.send_headers(sid, trailers, end_stream=True)
                else:
                    conn.h2.end_stream(sid)
        except ERRORS:
            return  # the stream was reset meanwhile: its reset event says what follows
        conn.want_flush()
        if self.pending and not self.blocked:
            self.blocked = True
            client.pause_reading_for(P_UPLOAD)
        elif not self.pending and self.blocked:
            self.blocked = False
            client.resume_reading_for(P_UPLOAD)

    # -- the response (called by the connection) -------------------------------------------------

    def on_response(self, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        client = self.client
        if client is None:
            return
        status = 0
        lines: list[bytes] = []
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 4
            if name[:1] == b":":
                if name == b":status" and value.isdigit():
                    status = int(value)
                continue
            if name == b"content-length":
                self.has_length = True
            elif name == b"x-request-id":
                self.has_reqid = True
            elif name == b"grpc-status":
                self.note_grpc(value)
            lines.append(name + b": " + value + b"\r\n")
        if len(lines) > client.max_headers or size > client.max_header_size:
            client.upstream_protocol_error(self, "response headers over limits.max_headers / max_header_size")
            return
        self.lines = lines
        self.chunked = not self.has_length  # relayed chunked, with trailers, to HTTP/1.1 clients
        self.ended_with_head = ended
        try:
            self.reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            self.reason = b"Unknown"
        self.started = True
        self.touch()
        client.response_head(self, status)

    def on_interim(self, headers: list[tuple[bytes, bytes]]) -> None:
        """A 1xx (100 Continue, 103 Early Hints) is relayed as for HTTP/1.1 upstreams."""
        client = self.client
        if client is None:
            return
        status = 0
        lines = []
        for name, value in headers:
            if name == b":status" and value.isdigit():
                status = int(value)
            elif name[:1] != b":":
                lines.append(name + b": " + value + b"\r\n")
        if 100 <= status < 200:
            client.response_interim(status, HTTPStatus(status).phrase.encode() if status in _INTERIM else b"", lines)

    def on_data(self, data: bytes, flow: int) -> None:
        client = self.client
        if client is None or not self.started:
            self.conn.ack(flow, self.sid)
            return
        self.unacked += flow
        if not self.held:
            self.conn.ack(self.unacked, self.sid)
            self.unacked = 0
        self.touch()
        client.response_body(data)

    def on_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        lines = []
        for name, value in headers:
            if name[:1] == b":":
                continue
            if name == b"grpc-status":
                self.note_grpc(value)
            lines.append(name + b": " + value + b"\r\n")
        self.trailers = lines

    def on_end(self) -> None:
        client = self.client
        if client is not None and self.started:
            client.response_complete(self, True)

    def on_reset(self, code: int) -> None:
        if code == REFUSED_STREAM and not self.started:
            self.refused()
        else:
            self.lost(None)

    def note_grpc(self, value: bytes) -> None:
        req = self.req
        if req is not None:
            req.grpc_status = grpc_codes.parse_status_value(value)

    def touch(self) -> None:
        """The response moves: the response timeout bounds each pause (and grpc-timeout the whole)."""
        client = self.client
        if client is not None:
            deadline = self.conn.ctx.clock.now + client.timeouts.response
            self.deadline = min(deadline, self.grpc_deadline) if self.grpc_deadline else deadline

    def hold(self) -> None:
        self.held = True

    def release_hold(self) -> None:
        self.held = False
        if self.unacked and not self.detached:
            self.conn.ack(self.unacked, self.sid)
            self.unacked = 0
            self.conn.want_flush()

    # -- endings -------------------------------------------------------------------------------------

    def refused(self) -> None:
        """The server never processed this stream: send the request again where the exchange's
        retry rules allow (as if the connection had failed), else fail it like a lost one."""
        client = self.client
        req = self.req
        self.detach()
        self.client = None
        if client is None:
            return
        side = cast(ClientSide, client)
        if req is not None and self.saved is not None and not req.status and side.current is req:
            req.body = [*self.saved, *req.body]
            req.body_forwarded = False
            req.attempts -= 1
            if exchange.retry(self.conn.ctx, side, req, KIND_CONNECT, True):
                return
        client.upstream_lost(self, None, None)

    def lost(self, exc: Exception | None) -> None:
        """The stream or its connection failed: the exchange decides (retry, 502, truncate)."""
        client = self.client
        self.detach()
        self.client = None
        if client is not None:
            client.upstream_lost(self, exc, None)

    def detach(self) -> None:
        """Leave the connection (resetting the stream if it is still open)."""
        if self.detached:
            return
        self.detached = True
        conn = self.conn
        if self.sid:
            conn.forget_stream(self.sid)
            if conn.transport is not None:
                with contextlib.suppress(*ERRORS):
                    state = conn.h2.streams.get(self.sid)
                    if state is not None and not state.closed:
                        conn.h2.reset_stream(self.sid, CANCEL)
                    if self.unacked:
                        conn.h2.acknowledge_received_data(self.unacked, self.sid)
                conn.want_flush()
        self.unacked = 0
        self.pending = []
        transport = self.transport
        if isinstance(transport, StreamTransport):
            transport.closing = True
        self.transport = None
        conn.ctx.upstream_conns.discard(self)
        conn.stream_done()

    def head_keep_alive(self) -> bool:
        return True

    def reset_parser(self) -> None:
        """A HEAD response is complete with its head: the stream's END_STREAM is not waited for."""

    def released(self) -> None:
        self.detach()

    def close(self) -> None:
        self.detach()

    def abort(self) -> None:
        self.detach()
