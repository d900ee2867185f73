"""Client leg: one asyncio.Protocol per client connection, parsing requests with httptools.

A request is parsed, validated, routed (reading the snapshot once), and streamed to an upstream
connection; the response streams back through :mod:`proxy.dataplane.legs.http1_upstream`. Pipelined requests are
queued and answered in order. Reading is paused whenever a peer cannot keep up (backpressure).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from proxy.analysis.stats import KIND_PROTOCOL, KIND_RESET, KIND_TIMEOUT
from proxy.dataplane import exchange
from proxy.dataplane.legs import http1_headers as H
from proxy.dataplane.legs.base import P_CONNECT, P_PIPELINE, P_TUNNEL, P_UPLOAD, UpstreamLeg
from proxy.dataplane.legs.http1_buffers import READ_VIEW, WRITE_HIGH, WRITE_LOW, read_view
from proxy.dataplane.legs.http1_upstream import UpstreamConnection
from proxy.dataplane.request import F_CHUNKED, F_CLOSE, F_LENGTH, F_NONE, Request

if TYPE_CHECKING:
    from proxy.config.model import Timeouts
    from proxy.dataplane.context import PlaneContext

log = logging.getLogger("canary_proxy.http")

# What the client deadline means.
D_NONE, D_HEADER, D_IDLE, D_BODY, D_LINGER = range(5)
# Reads smaller than this have their writes batched to the end of the loop iteration.
BATCH_BELOW = 16384
# After an error response: how long we keep reading (and discarding) before the final close.
LINGER = 2.0
# A response that ends before its request body has fully arrived keeps the client connection (the
# rest of the body is read and dropped, like nginx's discarded body) when at most this much is left.
DISCARD_MAX = 1 << 20


class Reject(Exception):
    """Raised from a parser callback to stop parsing and answer `status`."""

    def __init__(self, status: int) -> None:
        self.status = status


class ClientConnection(asyncio.BufferedProtocol):
    def __init__(self, plane: PlaneContext) -> None:
        self.plane = plane
        self.timeouts: Timeouts = plane.snapshot.config.timeouts
        # Limits and names the header callback needs, read from the request's snapshot once.
        self.max_headers = 0
        self.max_header_size = 0
        self.route_headers: frozenset[bytes] = frozenset()
        self.parser = httptools.HttpRequestParser(self)
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
        # Where the current response's head sits in `wbuf` while it is still unsent: an upstream
        # error found later in the same read can then become a clean 502 instead of a truncation.
        self.head_buf: list[bytes] | None = None
        self.head_at = 0
        # Request bytes produced while the client's data is parsed (see data_received).
        self.feeding = False
        self.ubuf: list[bytes] = []
        self.ubuf_t: asyncio.Transport | None = None
        # Bytes of reads that made no parsing progress (the parser buffers an unfinished header
        # name/value itself and reports it only once complete): bounded by max_header_size.
        self.quiet = 0
        # Upgrade requests: llhttp (as httptools drives it) skips the body of a request carrying
        # Upgrade and hands every later byte over as "upgrade data". We frame such a body ourselves
        # so it streams at once (an upstream may ignore the upgrade, RFC 9110 7.8).
        self.upgrading: Request | None = None  # the request llhttp is about to report as an upgrade
        self.ubody_left = 0  # Content-Length bytes still due; -1: chunked (see `ubody_parser`)
        self.ubody_parser: httptools.HttpRequestParser | None = None
        self.tunnel_req: Request | None = None  # a 101's request: logged when the tunnel ends

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)  # bounded memory per slow reader
        plane = self.plane
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0] if peer else "unknown").encode()
        plane.clients.add(self)
        if plane.draining or not plane.admit():
            transport.write(H.error_response(503, True, plane.new_request_id(), plane.via_line))
            self.close()
            return
        self.deadline = plane.clock.read() + self.timeouts.client_header
        self.dkind = D_HEADER

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.plane.clients.discard(self)
        self.plane.tunnels.discard(self)
        if self.tunnel_req is not None:
            treq, self.tunnel_req = self.tunnel_req, None
            exchange.log_access(self.plane, treq)
        up = self.upstream or self.tunnel
        self.upstream = self.tunnel = None
        if up is not None:
            up.client = None
            up.abort()  # the client went away: stop the upstream work too (like nginx, Envoy)
        req = self.current
        if req is not None:
            self.current = None
            req.status = req.status or 499
            exchange.finish(self.plane, req, aborted=True)
        for waiting in (self.req, *self.queue):
            if waiting is not None and waiting.mirror is not None:
                self.plane.mirrors.drop(waiting)  # never started: its mirror copy goes too
        self.transport = None

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

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(READ_VIEW[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            t = self.tunnel.transport
            if t is not None:
                t.write(data)
            return
        if self.dead:
            if self.current is not None and self.current.upgrade is not None:
                self.early.append(data)
            return
        # One clock read per read: the request's start time and every deadline set while parsing.
        self.plane.clock.read()
        if self.ubuf:
            self.flush_upstream()  # an earlier read's bytes, not yet written: they go first
        req = self.req
        mark = req.nheaders + req.body_bytes + len(req.target) if req is not None else -1
        # Upstream-bound bytes are collected while this read is parsed and written after it, so
        # that nothing of a read that turns out malformed is forwarded (and writes are batched).
        self.feeding = True
        size = len(data)
        read = data
        try:
            while data:
                if self.ubody_left:
                    data = self._feed_upgrade_body(data)
                    continue
                try:
                    self.parser.feed_data(data)
                    data = b""
                except httptools.HttpParserUpgrade as exc:
                    data = self._upgraded(data[exc.args[0] :] if exc.args else b"")
        except Reject as exc:
            self._drop_pending()
            self.bad_request(exc.status)
        except httptools.HttpParserCallbackError as exc:
            self._drop_pending()
            cause = exc.__cause__ or exc.__context__  # httptools chains the callback's exception implicitly
            if isinstance(cause, Reject):
                self.bad_request(cause.status)
            else:
                log.error("request callback failed", exc_info=cause)
                self.bad_request(500 if cause is not None else 400)
        except httptools.HttpParserError:
            self._drop_pending()
            self.bad_request(400)
        finally:
            self.feeding = False
        if self.ubuf:
            if size < BATCH_BELOW:
                self.flush_upstream_later()
            else:
                self.flush_upstream()
        req = self.req
        if req is None or self.dead or req.nheaders + req.body_bytes + len(req.target) != mark:
            self.quiet = 0  # progress (or nothing left to parse)
            if req is not None and not req.t0 and not req.nheaders and not self.dead and req.target:
                self._check_http09(req.target, read)
        else:
            self.quiet += size
            if self.quiet > req.snapshot.config.limits.max_header_size:
                self._drop_pending()
                self.bad_request(400 if req.t0 else 431)  # an endless header, trailer or chunk line

    def _check_http09(self, target: bytes, read: bytes) -> None:
        """A request line that ended without a version is HTTP/0.9, which llhttp would take and
        then wait on for headers until the header timeout: refuse it at once (nginx: 400)."""
        if self.parser.get_http_version() != "0.0":
            return
        tail = target[-64:]
        at = read.rfind(tail)
        if at >= 0 and read[at + len(tail) : at + len(tail) + 1] in (b"\r", b"\n"):
            self._drop_pending()
            self.bad_request(400)

    def _upgraded(self, rest: bytes) -> bytes:
        """llhttp reported an Upgrade request as complete; `rest` is what followed its head.
        Returns the bytes still to be parsed as HTTP (with a fresh parser)."""
        req, self.upgrading = self.upgrading, None
        if self.ubody_left:
            return rest  # its body comes first (see _feed_upgrade_body)
        if req is None:  # cannot happen: on_message_complete saw the upgrade first
            req = self.current
        return self._after_upgrade_request(req, rest)

    def _after_upgrade_request(self, req: Request | None, rest: bytes) -> bytes:
        if req is None or req.upgrade is None or (req.status and req is not self.current):
            # Nothing left to upgrade to (only `h2c`, which we strip): a plain request; go on.
            self.parser = httptools.HttpRequestParser(self)
            return rest
        self.dead = True
        self.pause_reading_for(P_TUNNEL)
        if rest:
            self.early.append(rest)
        return b""

    def _feed_upgrade_body(self, data: bytes) -> bytes:
        """Frame the body of an Upgrade request (llhttp skips it); returns the bytes after it."""
        req = self.req
        assert req is not None
        if self.ubody_left > 0:
            chunk = data[: self.ubody_left]
            self.ubody_left -= len(chunk)
            self.on_body(chunk)
            rest = data[len(chunk) :]
            if self.ubody_left:
                return b""
        else:
            sub = self.ubody_parser
            assert sub is not None
            try:
                sub.feed_data(data)
            except httptools.HttpParserError:
                if self.ubody_left:  # not a complaint about bytes after the final chunk
                    raise
            if self.ubody_left:
                return b""
            # Where the final chunk ended is not reported: whatever followed it is dropped and
            # the connection closes after the response (chunked Upgrade requests are exotic).
            rest = b""
            req.keep_alive = False
            req.upgrade = None
            self.dead = True
        self.ubody_left = 0
        self.ubody_parser = None
        self._complete(req)
        return self._after_upgrade_request(req, rest) if not self.dead else b""

    def _drop_pending(self) -> None:
        """The request being parsed is malformed: if it is the one being proxied, forget the
        bytes this read produced for it (what an earlier request produced is still sent)."""
        self.feeding = False
        if self.req is not None and self.req is self.current:
            self.ubuf = []
            self.ubuf_t = None

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

    # -- request parsing (httptools callbacks) ---------------------------------------------------

    def on_message_begin(self) -> None:
        self.req = req = Request(self.plane.snapshot)
        req.peer = self.peer
        config = req.snapshot.config
        self.timeouts = config.timeouts
        self.max_headers = config.limits.max_headers
        self.max_header_size = config.limits.max_header_size
        self.route_headers = req.snapshot.route_headers
        if self.dkind == D_IDLE:
            self.deadline = self.plane.clock.now + self.timeouts.client_header
            self.dkind = D_HEADER

    def on_url(self, url: bytes) -> None:
        req = self.req
        assert req is not None
        req.target += url
        if len(req.target) > req.snapshot.config.limits.max_url_length:
            raise Reject(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        assert req is not None
        req.nheaders += 1
        req.hsize += len(name) + len(value) + 4
        if req.nheaders > self.max_headers or req.hsize > self.max_header_size:
            raise Reject(431)  # trailers count too: they are buffered by the parser all the same
        if value and (value[-1] == 32 or value[-1] == 9):
            value = value.rstrip(b" \t")  # OWS is not part of the value (RFC 9110 5.5); llhttp strips the leading one
        if req.t0:
            self._trailer(req, name, value)
            return
        known = H.REQUEST_EXACT.get(name)
        if known is not None:
            kind, lname = known
        else:
            lname = name.lower()
            kind = H.REQUEST_SPECIAL.get(lname, H.H_PLAIN)
        if lname in self.route_headers:
            old = req.rhdrs.get(lname)
            # Repeats are joined like one list-valued header; cookie pairs are `;`-separated.
            req.rhdrs[lname] = value if old is None else old + (b"; " if lname == b"cookie" else b", ") + value
        if kind == H.H_PLAIN:
            if known is None and b"_" in lname:
                alias = H.UNDERSCORE_ALIASES.get(lname.replace(b"-", b"_"))
                if alias == H.H_BAD:
                    raise Reject(400)
                if alias is not None:
                    return  # an alias of a header we set or drop ourselves
            req.lines.append(name + b": " + value + b"\r\n")
        elif kind == H.H_CL:
            req.clen = int(value)
            if req.clen > H.MAX_CONTENT_LENGTH:
                raise Reject(413)
        elif kind == H.H_HOST:
            if req.host is not None:
                raise Reject(400)
            req.host = value
            req.lines.append(name + b": " + value + b"\r\n")
        elif kind == H.H_TE:
            if req.te is not None:
                raise Reject(400)
            req.te = value
        elif kind == H.H_CONNECTION:
            req.conn_tokens = (req.conn_tokens or []) + H.connection_tokens(value)
        elif kind == H.H_XFF:
            req.xff = value if req.xff is None else req.xff + b", " + value
        elif kind == H.H_XFPROTO:
            req.xfproto = value
        elif kind == H.H_XFHOST:
            req.xfhost = value
        elif kind == H.H_VIA:
            req.via = value if req.via is None else req.via + b", " + value
            req.lines.append(name + b": " + value + b"\r\n")
        elif kind == H.H_REQID:
            req.reqid = value
        elif kind == H.H_EXPECT:
            if value.strip().lower() != b"100-continue":
                raise Reject(417)
            req.expect = True
            req.lines.append(name + b": " + value + b"\r\n")
        elif kind == H.H_UPGRADE:
            req.upgrade = value
            req.wants_upgrade = True
        elif kind == H.H_TRAILER:
            req.trailer = value if req.trailer is None else req.trailer + b", " + value
        # H_HOP: dropped

    @staticmethod
    def _trailer(req: Request, name: bytes, value: bytes) -> None:
        """A trailer field after a chunked body: relayed (the upstream leg is chunked too), except
        the fields a trailer must not carry (framing, routing, our own headers; RFC 9110 6.5.1)."""
        if name.lower() in H.REQUEST_SPECIAL:
            return
        if req.trailers is None:
            req.trailers = []
        req.trailers.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        plane = self.plane
        now = req.t0 = plane.clock.now  # read when this data arrived (see data_received)
        parser = self.parser
        keep_alive = parser.should_keep_alive()
        # Keep-alive without a Connection header can only be HTTP/1.1 (1.0 needs `keep-alive`):
        # the version string (built on each call) is only needed otherwise.
        if not keep_alive or req.conn_tokens is not None:
            version = parser.get_http_version()
            if version != "1.1":
                if version != "1.0":
                    raise Reject(400 if version < "1.0" else 505)  # HTTP/0.9: 400, as nginx
                req.version10 = True
        req.method = parser.get_method()
        req.keep_alive = keep_alive and not plane.draining
        self._validate(req)
        req.max_body = exchange.route(plane, req, self.peer)
        if req.clen >= 0:
            if req.max_body is not None and req.clen > req.max_body:
                raise Reject(413)
            if req.clen:
                self.deadline = now + self.timeouts.client_body
                self.dkind = D_BODY
            else:
                self.dkind = D_NONE
        elif req.te is not None:
            self.deadline = now + self.timeouts.client_body
            self.dkind = D_BODY
        else:
            self.dkind = D_NONE
        if self.current is None:
            self.start(req)
        else:
            self.queue.append(req)
            self.pause_reading_for(P_PIPELINE)

    def _validate(self, req: Request) -> None:
        """Refuse what must never be forwarded (RFC 9112 framing, smuggling vectors, loops)."""
        if req.method == b"CONNECT":
            raise Reject(405)
        # Only a lone `chunked` coding is accepted; HTTP/1.0 cannot use chunked at all.
        if req.te is not None and (req.version10 or req.te.strip().lower() != b"chunked"):
            raise Reject(400 if req.version10 else 501)
        if req.host is None:
            if not req.version10:
                raise Reject(400)
        elif not H.valid_host(req.host):
            raise Reject(400)  # RFC 9112 3.2: Host is uri-host [":" port]; `evil.com:80@x` is not
        target = req.target
        if target[:1] != b"/":
            if target == b"*" and req.method == b"OPTIONS":
                req.path = b"*"
                return
            lower = target[:8].lower()
            if not (lower.startswith(b"http://") or lower.startswith(b"https://")):
                raise Reject(400)
            # Absolute form never chooses the destination: its authority must equal Host.
            rest = target.split(b"://", 1)[1]
            slash = rest.find(b"/")
            authority = rest if slash < 0 else rest[:slash]
            if req.host is None or authority.lower() != req.host.lower():
                raise Reject(400)
            target = b"/" if slash < 0 else rest[slash:]
            req.target = target
        q = target.find(b"?")
        if q < 0:
            req.path = target
        else:
            req.path = target[:q]
            req.query = target[q + 1 :]
        token = self.plane.via
        if req.via is not None and token and token in req.via:
            for entry in req.via.split(b","):
                parts = entry.split()
                if len(parts) >= 2 and parts[1] == token:
                    raise Reject(508)

    def on_body(self, body: bytes) -> None:
        req = self.req
        assert req is not None
        req.body_bytes += len(body)
        if req.max_body is not None and req.body_bytes > req.max_body:
            raise Reject(413)
        if self.dkind == D_BODY:
            self.deadline = self.plane.clock.now + self.timeouts.client_body
        if req.mirror is not None:
            self.plane.mirrors.body(req, body)
        if req.discard:
            return  # answered already: read and dropped
        up = self.upstream
        if up is not None and req is self.current and up.transport is not None:
            self.forward_body(req, up.transport, body)
        else:
            req.body.append(body)
            if req is not self.current or up is None:
                self.pause_reading_for(P_CONNECT)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        if req.wants_upgrade and self.parser.should_upgrade():
            self.upgrading = req
            if req.clen > 0 or req.te is not None:
                # llhttp skipped the body: it is framed by _feed_upgrade_body, then completed.
                self.ubody_left = req.clen if req.clen > 0 else -1
                if req.clen <= 0:
                    self.ubody_parser = p = httptools.HttpRequestParser(_ChunkedBody(self))
                    p.feed_data(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
                return
        self._complete(req)

    def _complete(self, req: Request) -> None:
        self.req = None
        req.complete = True
        if self.dkind == D_BODY:
            self.dkind = D_NONE
        if req.mirror is not None:
            self.plane.mirrors.complete(req)
        if req.discard and self.current is None:  # answered already: now an idle connection
            self.deadline = self.plane.clock.now + self.timeouts.idle
            self.dkind = D_IDLE
        up = self.upstream
        if up is not None and req is self.current and up.transport is not None:
            if req.te is not None:
                self.up_write(up.transport, last_chunk(req))
            up.deadline = self.plane.clock.now + (req.try_timeout or self.timeouts.response)

    # -- proxying --------------------------------------------------------------------------------

    def start(self, req: Request) -> None:
        """Begin proxying `req` (its head is parsed; its body may still be arriving)."""
        self.current = req
        exchange.begin(self.plane, self, req)

    def forward_body(self, req: Request, transport: asyncio.Transport, body: bytes) -> None:
        req.body_forwarded = True
        if req.te is not None:
            self.up_write(transport, b"%x\r\n" % len(body))
            self.up_write(transport, body)
            self.up_write(transport, b"\r\n")
        else:
            self.up_write(transport, body)

    def upstream_ready(self, leg: UpstreamLeg) -> None:
        """An upstream connection is ours: send the head and whatever body is buffered."""
        conn = cast(UpstreamConnection, leg)
        req = self.current
        t = conn.transport
        if req is None or self.closed or t is None:
            return
        self.upstream = conn
        conn.client = self
        if self.write_blocked_at:
            t.pause_reading()  # the client still cannot take more: resume_writing() lets this one in
        req.attempts += 1
        if req.body:
            self.up_write(t, req.head)
            chunks, req.body = req.body, []
            for chunk in chunks:
                self.forward_body(req, t, chunk)
            if req.complete and req.te is not None:
                self.up_write(t, last_chunk(req))
        elif req.complete and req.te is not None:
            self.up_write(t, req.head + last_chunk(req))
        else:
            self.up_write(t, req.head)
        if req.complete:
            conn.deadline = self.plane.clock.now + (req.try_timeout or self.timeouts.response)
        else:
            conn.deadline = 0.0
        self.resume_reading_for(P_CONNECT)

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

    def flush_later(self, read_size: int) -> None:
        """Write what the response produced during this read at the end of the loop iteration,
        together with every other connection's writes: the peers (client, upstream) are then woken
        in one burst rather than one at a time while we are still parsing, which costs the kernel
        far less (a wake-up of an idle CPU is an inter-processor interrupt). Large reads are
        written at once: they are streams, where memory and backpressure matter more."""
        if read_size >= BATCH_BELOW:
            self.flush()
        elif self.wbuf and not self.queued:
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
        if wbuf:
            self.wbuf = []
            t = self.transport
            if t is not None:
                t.write(wbuf[0] if len(wbuf) == 1 else b"".join(wbuf))

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
        exchange.release(req, conn, upstream_keep_alive)
        self.end_exchange(req)

    def end_exchange(self, req: Request) -> None:
        """The response is fully written: record it, then serve the next request or close."""
        self.current = None
        if self.paused & (P_CONNECT | P_UPLOAD):
            # The exchange may end without an upstream ever taking the request (a proxy error).
            self.resume_reading_for(P_CONNECT | P_UPLOAD)
        self.served += 1
        exchange.finish(self.plane, req, aborted=False)
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

    # -- failures --------------------------------------------------------------------------------

    def bad_request(self, status: int) -> None:
        """Malformed input: answer in order, never forward anything more, close."""
        self.dead = True
        self.plane.stats.rejected += 1
        req = self.req or Request(self.plane.snapshot)
        self.req = None
        req.error = status
        req.keep_alive = False
        if req is self.current:
            up, self.upstream = self.upstream, None
            if up is not None:
                up.client = None
                up.abort()
            if req.status:
                self.abort()
            else:
                self.respond_error(req, status)
            return
        if req in self.queue:
            return
        if self.current is None:
            self.start(req)
        else:
            self.queue.append(req)

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

    def start_error(self, req: Request, status: int) -> None:
        req.error = status
        self.start(req)

    # -- tunnel (Upgrade) ------------------------------------------------------------------------

    def begin_tunnel(self, conn: UpstreamConnection) -> None:
        req = self.current
        self.upstream = None
        self.tunnel = conn
        conn.tunnel = True
        conn.deadline = 0.0
        self.dkind = D_NONE
        self.dead = True
        if req is not None:
            self.current = None
            exchange.finish(self.plane, req, aborted=False, log=False)
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

    def tunnel_write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            if self.tunnel_req is not None:
                self.tunnel_req.sent += len(data)

    # -- flow control and closing ----------------------------------------------------------------

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


def last_chunk(req: Request) -> bytes:
    """The end of a chunked request body, with its trailers (we frame the upstream leg chunked too)."""
    trailers = req.trailers
    if not trailers:
        return b"0\r\n\r\n"
    return b"".join([b"0\r\n", *trailers, b"\r\n"])


class _ChunkedBody:
    """Callbacks of the parser that frames a chunked Upgrade request's body (see on_message_complete)."""

    def __init__(self, client: ClientConnection) -> None:
        self.client = client

    def on_body(self, body: bytes) -> None:
        if self.client.ubody_left:
            self.client.on_body(body)

    def on_message_complete(self) -> None:
        self.client.ubody_left = 0
