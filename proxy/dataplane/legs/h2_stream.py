"""Client leg (HTTP/2), one stream: one request on the same exchange as an HTTP/1.1 request.

A stream is what the exchange (:class:`proxy.dataplane.context.ClientSide`) and the upstream legs
(:class:`proxy.dataplane.legs.base.ClientLeg`) talk to, exactly as they talk to an HTTP/1.1
connection: the exchange routes, retries and records. Its response side is
:class:`.h2_respond.H2Responder`.

Flow control from the client (README, "HTTP/2"): request body bytes are acknowledged (our receive
window reopened) only once the upstream transport took them and its write buffer is not full, so a
slow upstream stops the client instead of filling our memory.
"""

from __future__ import annotations

import contextlib
import logging
from typing import cast

from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError

from proxy.analysis.stats import KIND_PROTOCOL, KIND_RESET, KIND_TIMEOUT
from proxy.dataplane import exchange, recording
from proxy.dataplane.legs.base import P_CONNECT, UpstreamLeg
from proxy.dataplane.legs.h2_request import Header, trailer_lines
from proxy.dataplane.legs.h2_respond import HOLD_WINDOW, H2Responder
from proxy.dataplane.legs.http1_upstream import UpstreamConnection

log = logging.getLogger("canary_proxy.http")


class H2Stream(H2Responder):
    """One HTTP/2 stream: the client side of one exchange (request body in, failures decided by
    the exchange); its response side is :class:`.h2_respond.H2Responder`."""

    # -- from the client (called by the connection) ---------------------------------------------

    def on_data(self, data: bytes, flow: int) -> None:
        """A DATA frame of the request body (`flow`: the bytes it counts against our window)."""
        req = self.current
        if req is None or req.complete or req.discard:
            self.ack(flow)  # answered already: read and dropped
            return
        self.last_in = self.plane.clock.now
        req.body_bytes += len(data)
        if req.max_body is not None and req.body_bytes > req.max_body:
            self.ack(flow)
            self.refuse(413)
            return
        if req.mirror is not None:
            self.plane.mirrors.body(req, data)
        up = self.upstream
        if up is not None and up.transport is not None:
            up.send_body(req, data)
        else:
            req.body.append(data)
        self.unacked += flow
        if not self.paused and up is not None:
            self.ack(0)

    def on_trailers(self, headers: list[Header]) -> None:
        req = self.current
        if req is not None and req.te is not None:
            req.trailers = trailer_lines(headers) or None

    def on_end(self) -> None:
        """END_STREAM from the client: the request is complete."""
        req = self.current
        if req is None or req.complete:
            return
        req.complete = True
        if req.mirror is not None:
            self.plane.mirrors.complete(req)
        up = self.upstream
        if up is not None and up.transport is not None and not req.discard:
            up.send_end(req)

    def ack(self, flow: int) -> None:
        """Reopen our receive window for `flow` bytes and whatever was held back."""
        n = self.unacked + flow
        self.unacked = 0
        if n and not self.closed:
            self.conn.h2.acknowledge_received_data(n, self.sid)
            self.conn.schedule_flush()

    def refuse(self, status: int) -> None:
        """An error found in the request itself (413): answer it, or reset a started response."""
        req = self.current
        if req is None:
            return
        up, self.upstream = self.upstream, None
        if up is not None:
            up.client = None
            up.abort()
        req.error = status
        if req.status:
            self.abort()
        else:
            self.respond_error(req, status)

    # -- ClientSide (the exchange) ---------------------------------------------------------------

    def upstream_ready(self, leg: UpstreamLeg) -> None:
        """An upstream connection is ours: send the head and whatever body is buffered."""
        conn = cast(UpstreamConnection, leg)
        req = self.current
        t = conn.transport
        if req is None or self.closed or t is None:
            return
        self.upstream = conn
        conn.client = self
        req.attempts += 1
        conn.send_request(req)
        if self.hold:
            t.pause_reading()
        self.resume_reading_for(P_CONNECT)

    def pause_reading_for(self, reason: int) -> None:
        self.paused |= reason

    def resume_reading_for(self, reason: int) -> None:
        self.paused &= ~reason
        if not self.paused and self.unacked and self.upstream is not None:
            self.ack(0)

    def is_idle(self) -> bool:
        return self.current is None

    def on_timeout(self, now: float) -> None:
        """Checked by the connection once a second: the request body's and the client's window's
        deadlines (an HTTP/1.1 connection has its own; a stream shares its connection's)."""
        req = self.current
        if req is None or self.closed:
            return
        if not req.complete and not req.discard and now - self.last_in > self.timeouts.client_body:
            if not req.status:
                up, self.upstream = self.upstream, None
                if up is not None:
                    up.client = None
                    up.abort()
                req.error = 408
                self.respond_error(req, 408)
            else:
                self.abort()
        elif self.hold & HOLD_WINDOW and now - self.held_at > self.timeouts.send:
            self.abort()  # the client stopped opening its window: like a send timeout

    def check_gone(self) -> None:
        pass  # the connection's business

    def flush_queued(self) -> None:
        self.queued = False
        self.conn.schedule_flush()

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        """Truncate: RST_STREAM (the client sees a failed stream, never a fake complete one)."""
        if not self.closed:
            with contextlib.suppress(ProtocolError):  # closed on the library's side already
                self.conn.h2.reset_stream(self.sid, ErrorCodes.INTERNAL_ERROR)
            self.conn.schedule_flush()
        self.lost()

    def lost(self) -> None:
        """The stream is gone (reset by either side, or the connection closed): stop the upstream
        work too (like nginx and Envoy) and record the request as aborted."""
        if self.closed:
            return
        self.closed = True
        self.out.clear()
        self.out_bytes = 0
        up, self.upstream = self.upstream, None
        if up is not None:
            up.client = None
            up.abort()
        req = self.current
        if req is not None:
            self.current = None
            req.status = req.status or 499
            recording.finish(self.plane, req, aborted=True)
        self.conn.stream_done(self)

    # -- failures the upstream leg reports (decided by the exchange) ------------------------------

    def upstream_lost(self, leg: UpstreamLeg, exc: Exception | None, transport: object) -> None:
        conn = cast(UpstreamConnection, leg)
        req = self.current
        if req is None or self.upstream is not conn:
            return
        if conn.until_close and exc is None:
            self.response_complete(conn, False)  # a body framed by connection close ended normally
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
        exchange.fail(self.plane, self, req, KIND_PROTOCOL, 502)

    def upstream_timed_out(self, leg: UpstreamLeg) -> None:
        req = self.current
        leg.client = None
        leg.abort()
        if req is None or self.upstream is not leg:
            return
        self.upstream = None
        exchange.fail(self.plane, self, req, KIND_TIMEOUT, 504)
