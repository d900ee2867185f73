"""Client leg, the response side: stream the upstream's response back with the right framing,
return the connection to its pool, answer errors, tunnel; then the next pipelined request.

The decisions (routing, retries, failures, recording) are the exchange's
(:mod:`proxy.dataplane.exchange`); this class only turns them into HTTP/1.1 on the client's
connection.
"""

from __future__ import annotations

import logging
from typing import cast

import httptools

from proxy.analysis.stats import KIND_PROTOCOL, KIND_RESET, KIND_TIMEOUT
from proxy.dataplane import exchange, forwarding_h2, recording
from proxy.dataplane.legs import http1_headers as H
from proxy.dataplane.legs.base import P_CONNECT, P_PIPELINE, P_TUNNEL, P_UPLOAD, UpstreamLeg
from proxy.dataplane.legs.grpc_answers import grpc_error_response
from proxy.dataplane.legs.http1_io import (
    D_BODY,
    D_HEADER,
    D_IDLE,
    D_LINGER,
    D_NONE,
    DISCARD_MAX,
    ClientIO,
)
from proxy.dataplane.legs.http1_upstream import UpstreamConnection
from proxy.dataplane.request import F_CHUNKED, F_CLOSE, F_LENGTH, F_NONE, Request

log = logging.getLogger("canary_proxy.http")


class ClientResponder(ClientIO):
    """What the exchange and the upstream leg call on a client connection."""

    def start(self, req: Request) -> None:
        """Begin proxying `req` (its head is parsed; its body may still be arriving)."""
        self.current = req
        exchange.begin(self.plane, self, req)

    def response_interim(self, status: int, reason: bytes, lines: list[bytes]) -> None:
        req = self.current
        if req is None or req.version10 or self.transport is None:
            return
        self.wbuf.append(b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, b"".join(lines)))

    def response_head(self, leg: UpstreamLeg, status: int) -> None:
        conn = cast(UpstreamConnection, leg)
        req = self.current
        transport = self.transport
        if req is None or transport is None:
            return
        if not 100 <= status <= 599:  # llhttp takes any three digits; the client must never see them
            self.upstream_protocol_error(conn, f"status {status} out of range")
            return
        req.status = status
        keep = req.keep_alive and not self.plane.draining
        if not req.complete:
            # nginx reads and drops the rest of a body the upstream did not wait for, and keeps
            # the connection; so do we when little is left (and a Content-Length says how much).
            if (req.expect and not req.body_bytes) or req.clen < 0 or req.clen - req.body_bytes > DISCARD_MAX:
                keep = False
            elif status != 101:
                req.discard = True
        if req.upgrade is not None and status != 101 and (self.early or b"close" in (conn.conn_tokens or ())):
            keep = False  # a declined upgrade: bytes sent for the tunnel, or the upstream closes
        lines = conn.filtered_lines()
        extra = self.plane.via_line_for(req.version10)
        if not conn.has_reqid and req.reqid is not None:
            extra += b"X-Request-Id: " + req.reqid + b"\r\n"
        if req.set_cookie is not None:
            extra += b"Set-Cookie: " + req.set_cookie + b"\r\n"
        if status == 101:
            if req.upgrade is None or conn.upgrade is None:
                req.status = 0  # nothing was sent: the client gets a 502
                self.upstream_protocol_error(conn, "101 without an upgrade request and response")
                return
            self.wbuf.append(
                b"HTTP/1.1 101 %s\r\n%sConnection: upgrade\r\nUpgrade: %s\r\n%s\r\n"
                % (conn.reason, b"".join(lines), conn.upgrade, extra)
            )
            self.flush()
            self.begin_tunnel(conn)
            return
        if req.method == b"HEAD" or status == 204 or status == 304:
            req.framing = F_NONE
            if conn.chunked and status != 204 and not req.version10:
                extra += b"Transfer-Encoding: chunked\r\n"  # what a GET would get (RFC 9110 9.3.2)
        elif conn.has_length:
            req.framing = F_LENGTH
        elif not req.version10:
            req.framing = F_CHUNKED
            extra += b"Transfer-Encoding: chunked\r\n"
            if conn.trailer is not None and conn.chunked:
                extra += b"Trailer: " + conn.trailer + b"\r\n"
        else:
            req.framing = F_CLOSE
            keep = False
        if not conn.chunked and not conn.has_length and req.framing != F_NONE:
            conn.until_close = True
        if not keep:
            req.keep_alive = False
            extra += b"Connection: close\r\n"
        elif req.version10:
            extra += b"Connection: keep-alive\r\n"
        self.head_buf, self.head_at = self.wbuf, len(self.wbuf)
        self.wbuf.append(b"".join([H.STATUS_PREFIX[status], conn.reason, b"\r\n", *lines, extra, b"\r\n"]))
        if req.framing == F_NONE and req.method == b"HEAD":
            # llhttp would wait for a HEAD response's announced body: finish here, parse afresh.
            keep_upstream = conn.head_keep_alive()
            conn.reset_parser()
            self.response_complete(conn, keep_upstream)

    def response_body(self, body: bytes) -> None:
        req = self.current
        if req is None:
            return
        req.sent += len(body)
        if req.framing == F_CHUNKED:
            self.wbuf += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self.wbuf.append(body)

    def response_complete(self, leg: UpstreamLeg, upstream_keep_alive: bool) -> None:
        conn = cast(UpstreamConnection, leg)
        req = self.current
        if req is None:
            return
        if req.framing == F_CHUNKED:
            trailers = conn.trailers
            if trailers:
                conn.trailers = None
                self.wbuf.append(b"".join([b"0\r\n", *trailers, b"\r\n"]))
            else:
                self.wbuf.append(b"0\r\n\r\n")
        self.upstream = None
        if conn.client is self:
            conn.client = None
        conn.until_close = False
        pool = req.pool
        if pool is not None:
            pool.release(conn, upstream_keep_alive and req.complete, self.timeouts.idle)
        self.end_exchange(req)

    def end_exchange(self, req: Request) -> None:
        """The response is fully written: record it, then serve the next request or close."""
        self.current = None
        if self.paused & (P_CONNECT | P_UPLOAD):
            # The exchange may end without an upstream ever taking the request (a proxy error).
            self.resume_reading_for(P_CONNECT | P_UPLOAD)
        self.served += 1
        recording.finish(self.plane, req, aborted=False)
        if req.upgrade is not None and self.dead and req.keep_alive and not self.early and not req.error:
            # A declined upgrade (no 101): the connection goes on as plain HTTP/1.1.
            self.dead = False
            self.parser = httptools.HttpRequestParser(self)
            self.resume_reading_for(P_TUNNEL)
        if not req.keep_alive or (self.dead and not self.queue):
            if req.error:
                self.linger()
            else:
                self.close()
            return
        if self.queue:
            self.plane.loop.call_soon(self._next_in_line)
        elif self.req is not None and self.req.discard:  # the rest of this body: read and dropped
            self.resume_reading_for(P_PIPELINE)
        elif self.req is not None:  # the next request's head is partly here: it gets the header timeout
            self.deadline = self.plane.clock.now + self.timeouts.client_header
            self.dkind = D_HEADER
            self.resume_reading_for(P_PIPELINE)
        else:
            self.deadline = self.plane.clock.now + self.timeouts.idle
            self.dkind = D_IDLE
            self.resume_reading_for(P_PIPELINE)

    def _next_in_line(self) -> None:
        if self.closed or self.current is not None or not self.queue:
            return
        req = self.queue.popleft()
        if not self.queue:
            self.resume_reading_for(P_PIPELINE)
        self.start(req)

    def respond_error(self, req: Request, status: int) -> None:
        """Answer `req` with a proxy-generated error response."""
        req.status = status
        transport = self.transport
        self.flush()
        if transport is not None:
            close = not req.keep_alive or (status >= 500 and req.body_bytes > 0) or not req.complete
            if close:
                req.keep_alive = False
            if req.reqid is None:
                req.reqid = self.plane.new_request_id()
            head_only = req.method == b"HEAD"
            if status >= 400 and forwarding_h2.is_grpc(req.lines):  # gRPC clients read grpc-status
                transport.write(grpc_error_response(status, close, req.reqid, self.plane.via_line))
                req.sent = 0
            else:
                transport.write(H.error_response(status, close, req.reqid, self.plane.via_line, head_only))
                req.sent = 0 if head_only else H.error_body_size(status)
        self.end_exchange(req)

    def upstream_lost(self, leg: UpstreamLeg, exc: Exception | None, transport: object) -> None:
        conn = cast(UpstreamConnection, leg)
        req = self.current
        if self.tunnel is conn:
            # Flush what the upstream sent (a WebSocket close frame, say), then close gently: a
            # full close with unread client data would reset the connection and lose it.
            self.tunnel = None
            self.plane.tunnels.discard(self)
            self.linger()
            return
        if req is None or self.upstream is not conn:
            return
        if conn.until_close and exc is None:
            self.response_complete(conn, False)  # a body framed by connection close ended normally
            self.flush()
            return
        self.upstream = None
        exchange.fail(self.plane, self, req, KIND_RESET, 502, conn.reused)

    def upstream_protocol_error(self, leg: UpstreamLeg, why: str) -> None:
        conn = cast(UpstreamConnection, leg)
        req = self.current
        conn.client = None
        conn.abort()
        if req is None or self.upstream is not conn:
            return
        log.warning("upstream %s:%d sent an invalid response: %s", conn.pool.host, conn.pool.port, why)
        self.upstream = None
        if req.status and self.head_buf is self.wbuf:
            # The head was parsed in this very read and is not sent yet: take it back.
            del self.wbuf[self.head_at :]
            self.head_buf = None
            req.status = req.sent = 0
            req.framing = F_NONE
        exchange.fail(self.plane, self, req, KIND_PROTOCOL, 502)

    def upstream_timed_out(self, leg: UpstreamLeg) -> None:
        """The sweeper found the upstream's response deadline passed."""
        req = self.current
        leg.client = None
        leg.abort()
        if req is None or self.upstream is not leg:
            return
        self.upstream = None
        exchange.fail(self.plane, self, req, KIND_TIMEOUT, 504)

    def is_idle(self) -> bool:
        """Nothing in flight, nothing parsed, no tunnel: closing loses nothing (drain)."""
        return self.current is None and self.req is None and not self.queue and self.tunnel is None

    def start_error(self, req: Request, status: int) -> None:
        req.error = status
        self.start(req)

    def begin_tunnel(self, conn: UpstreamConnection) -> None:
        req = self.current
        self.upstream = None
        self.tunnel = conn
        conn.tunnel = True
        conn.keep_spare()
        conn.deadline = 0.0
        self.dkind = D_NONE
        self.dead = True
        if req is not None:
            self.current = None
            recording.finish(self.plane, req, aborted=False, log=False)
            self.tunnel_req = req  # logged when the tunnel ends, with the bytes sent down it
        t = conn.transport
        if t is not None:
            for chunk in self.early:
                t.write(chunk)
        self.early = []
        self.plane.tunnels.add(self)
        self.paused = 0
        if self.transport is not None:
            self.transport.resume_reading()
        if self.write_blocked_at and t is not None:
            t.pause_reading()

    def on_timeout(self, now: float) -> None:
        """The sweeper found our deadline passed."""
        if self.dkind == D_IDLE:
            self.close()
        elif self.dkind == D_LINGER:
            self.abort()
        elif self.dkind == D_HEADER:
            if self.req is not None and self.req.discard:
                self.close()
            elif self.req is not None and self.current is None:
                self.dead = True
                req, self.req = self.req, None
                req.keep_alive = False
                self.start_error(req, 408)
            elif self.current is None:
                self.close()
        elif self.dkind == D_BODY:
            cur = self.current
            if cur is not None and not cur.status and self.upstream is not None:
                up, self.upstream = self.upstream, None
                up.client = None
                up.abort()
                cur.keep_alive = False
                cur.error = 408
                self.respond_error(cur, 408)
            else:
                self.abort()
        self.dkind = D_NONE
