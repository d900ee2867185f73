"""Client leg, the byte layer: the transport, write batching, backpressure and closing, and the
binding of the upstream connection the exchange hands over (whose reads backpressure governs).

Response bytes produced while a read is handled are collected and written in one call at the end
(of the read, or of the loop iteration for small reads); request bytes for the upstream likewise.
Reading pauses for as long as any reason in the `paused` bitmask holds (see legs.base.P_*).
:class:`.http1_respond.ClientResponder` and :class:`.http1_client.ClientConnection` build on it.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from proxy.dataplane.legs.base import P_CONNECT, ClientLeg, UpstreamLeg
from proxy.dataplane.legs.http1_buffers import read_view
from proxy.dataplane.legs.http1_upstream import UpstreamConnection
from proxy.dataplane.request import Request

if TYPE_CHECKING:
    from proxy.config.model import Timeouts
    from proxy.dataplane.context import PlaneContext

# What the client deadline means.
D_NONE, D_HEADER, D_IDLE, D_BODY, D_LINGER = range(5)
# Reads smaller than this have their writes batched to the end of the loop iteration.
BATCH_BELOW = 16384
# After an error response: how long we keep reading (and discarding) before the final close.
LINGER = 2.0
# A response that ends before its request body has fully arrived keeps the client connection (the
# rest of the body is read and dropped, like nginx's discarded body) when at most this much is left.
DISCARD_MAX = 1 << 20


class ClientIO(asyncio.BufferedProtocol):
    """One client connection's transport and buffers (all of the client leg's state lives here)."""

    def __init__(self, plane: PlaneContext) -> None:
        self.plane = plane
        self.timeouts: Timeouts = plane.snapshot.config.timeouts
        # Limits and names the header callback needs, read from the request's snapshot once.
        self.max_headers = 0
        self.max_header_size = 0
        self.route_headers: frozenset[bytes] = frozenset()
        self.transport: asyncio.Transport | None = None
        self.peer = b""
        self.req: Request | None = None  # being parsed
        self.current: Request | None = None  # being proxied
        self.queue: deque[Request] = deque()
        self.upstream: UpstreamConnection | None = None
        self.paused = 0
        self.dead = False  # parser stopped (error or upgrade); no more requests on this connection
        self.closed = False
        self.tunnel: UpstreamConnection | None = None
        self.early: list[bytes] = []  # bytes after an Upgrade request, before the 101
        self.deadline = 0.0
        self.dkind = D_NONE
        self.write_blocked_at = 0.0
        self.served = 0
        # Response bytes produced while the upstream's data is parsed, written in one call after.
        self.wbuf: list[bytes] = []
        self.queued = False  # in the data plane's end-of-iteration flush list
        self.deferred = 0  # bytes read since `wbuf` was last written (see flush_later)
        # Where the current response's head sits in `wbuf` while it is still unsent: an upstream
        # error found later in the same read can then become a clean 502 instead of a truncation.
        self.head_buf: list[bytes] | None = None
        self.head_at = 0
        # Request bytes produced while the client's data is parsed (see data_received).
        self.feeding = False
        self.ubuf: list[bytes] = []
        self.ubuf_t: asyncio.Transport | None = None
        # Upgrade requests: llhttp (as httptools drives it) skips the body of a request carrying
        # Upgrade and hands every later byte over as "upgrade data". We frame such a body ourselves
        # so it streams at once (an upstream may ignore the upgrade, RFC 9110 7.8).
        self.upgrading: Request | None = None  # the request llhttp is about to report as an upgrade
        self.ubody_left = 0  # Content-Length bytes still due; -1: chunked (see `ubody_parser`)
        self.ubody_parser: httptools.HttpRequestParser | None = None
        self.tunnel_req: Request | None = None  # a 101's request: logged when the tunnel ends
        # The connection's first bytes are checked once for the HTTP/2 preface (h2c with prior
        # knowledge); `first` holds a read too short to tell (at most 23 bytes).
        self.fresh = True
        self.first = b""

    def upstream_ready(self, leg: UpstreamLeg) -> None:
        """The exchange hands over an upstream connection: bind it (reading it waits while this
        client cannot take more) and have the upstream leg send the request."""
        conn = cast(UpstreamConnection, leg)
        req = self.current
        t = conn.transport
        if req is None or self.closed or t is None:
            return
        self.upstream = conn
        conn.client = cast(ClientLeg, self)  # this object is a whole client leg (http1_respond's subclass)
        if self.write_blocked_at:
            t.pause_reading()  # the client still cannot take more: resume_writing() lets this one in
        req.attempts += 1
        conn.send_request(req)
        self.resume_reading_for(P_CONNECT)

    def pause_writing(self) -> None:
        self.write_blocked_at = self.plane.clock.read()
        up = self.upstream or self.tunnel
        if up is not None and up.transport is not None:
            up.transport.pause_reading()
            if up.started and not up.tunnel:
                up.deadline = 0.0  # a slow client is the send timeout's business, not the upstream's

    def resume_writing(self) -> None:
        self.write_blocked_at = 0.0
        up = self.upstream or self.tunnel
        if up is not None and up.transport is not None:
            up.transport.resume_reading()
            if up.started and not up.tunnel:
                up.deadline = self.plane.clock.read() + self.timeouts.response

    def get_buffer(self, sizehint: int) -> memoryview:
        """Read at most what the upstream's write buffer still has room for (see read_view)."""
        up = self.upstream or self.tunnel
        t = up.transport if up is not None else None
        return read_view(t.get_write_buffer_size() if t is not None else 0)

    def up_write(self, t: asyncio.Transport, data: bytes) -> None:
        """Write towards the upstream (deferred to the end of the read being parsed, if any)."""
        if not self.feeding:
            if self.ubuf:
                self.flush_upstream()  # keep the order
            t.write(data)
            return
        if self.ubuf_t is not t:
            self.flush_upstream()
            self.ubuf_t = t
        self.ubuf.append(data)

    def flush_upstream_later(self) -> None:
        """Write this read's upstream bytes at the end of the loop iteration (see flush_later)."""
        if not self.queued:
            self.queued = True
            self.plane.queue_flush(self)

    def flush_upstream(self) -> None:
        t, self.ubuf_t = self.ubuf_t, None
        buf, self.ubuf = self.ubuf, []
        if buf and t is not None and not t.is_closing():
            t.write(buf[0] if len(buf) == 1 else b"".join(buf))

    def flush_later(self, read_size: int) -> None:
        """Write what the response produced during this read at the end of the loop iteration,
        together with every other connection's writes: the peers (client, upstream) are then woken
        in one burst rather than one at a time while we are still parsing, which costs the kernel
        far less (a wake-up of an idle CPU is an inter-processor interrupt). Large reads are
        written at once: they are streams, where memory and backpressure matter more."""
        if read_size >= BATCH_BELOW:
            self.flush()
        elif self.wbuf:
            # libuv reads a socket up to 32 times per wake-up: deferred small reads of a stream
            # would pile up unwritten, never reaching the write buffer's high-water mark that
            # pauses the upstream (a slow reader then held hundreds of KiB). Enough is written now.
            self.deferred += read_size
            if self.deferred >= BATCH_BELOW:
                self.flush()
            elif not self.queued:
                self.queued = True
                self.plane.queue_flush(self)

    def flush_queued(self) -> None:
        """Called once per loop iteration by the data plane for connections that deferred writes."""
        self.queued = False
        if self.ubuf:
            self.flush_upstream()
        if self.wbuf:
            self.flush()

    def flush(self) -> None:
        """Write what the response produced during this read, in one call."""
        wbuf = self.wbuf
        self.deferred = 0
        if wbuf:
            self.wbuf = []
            self.head_buf = None  # the head is on its way: nothing to take back (nor to keep alive)
            t = self.transport
            if t is not None:
                t.write(wbuf[0] if len(wbuf) == 1 else b"".join(wbuf))

    def tunnel_write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            if self.tunnel_req is not None:
                self.tunnel_req.sent += len(data)

    def pause_reading_for(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def resume_reading_for(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.transport is not None:
                self.transport.resume_reading()

    def check_gone(self) -> None:
        """Reading is paused (pipelining, backpressure, connecting), so a FIN or RST from the client
        goes unseen: peek at the socket (called by the sweeper, never per request)."""
        t = self.transport
        sock = t.get_extra_info("socket") if t is not None else None
        if sock is None:
            return
        probe = socket.socket(sock.family, sock.type, fileno=sock.fileno())
        try:
            data = probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return  # nothing to read: still there
        except OSError:
            data = b""  # reset
        finally:
            probe.detach()
        if not data:
            self.abort()  # gone: connection_lost() aborts its upstream work too

    def linger(self) -> None:
        """Close after an error response, gently: half-close, then read and discard what the client
        is still sending until it closes or LINGER passes. Closing with unread input makes the
        kernel send a RST, and the client could lose the error response we just wrote."""
        self.dead = True
        self.flush()
        t = self.transport
        if t is None or not t.can_write_eof():
            self.close()
            return
        t.write_eof()
        self.paused = 0
        t.resume_reading()  # data_received() drops everything: the parser is dead
        self.deadline = self.plane.clock.read() + LINGER
        self.dkind = D_LINGER

    def close(self) -> None:
        self.dead = True
        self.flush()
        if self.transport is not None:
            self.transport.close()
        self.plane.tunnels.discard(self)

    def abort(self) -> None:
        """Close without flushing: the client sees a truncated response, never a fake complete one."""
        self.dead = True
        self.flush()
        if self.transport is not None:
            self.transport.abort()
