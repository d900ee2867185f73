"""Client leg (HTTP/1.1): one asyncio protocol per client connection, parsing requests with httptools.

A request head is parsed and checked (:mod:`.http1_request`), handed to the exchange
(:mod:`proxy.dataplane.exchange`) which routes it and finds an upstream connection, and its body is
streamed on; the response streams back through :class:`.http1_respond.ClientResponder`. Pipelined
requests are queued and answered in order. Reading is paused whenever a peer cannot keep up.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

import httptools

from proxy.dataplane import exchange, recording
from proxy.dataplane.legs import h2_client
from proxy.dataplane.legs import http1_headers as H
from proxy.dataplane.legs.base import P_CONNECT, P_PIPELINE, P_TUNNEL
from proxy.dataplane.legs.http1_buffers import READ_VIEW, WRITE_HIGH, WRITE_LOW
from proxy.dataplane.legs.http1_io import (
    BATCH_BELOW,
    D_BODY,
    D_HEADER,
    D_IDLE,
    D_NONE,
)
from proxy.dataplane.legs.http1_request import Reject, add_header, add_trailer, validate
from proxy.dataplane.legs.http1_respond import ClientResponder
from proxy.dataplane.request import Request

if TYPE_CHECKING:
    from proxy.dataplane.context import PlaneContext

log = logging.getLogger("canary_proxy.http")


class ClientConnection(ClientResponder):
    """The asyncio protocol of one client connection: parser callbacks and deadlines."""

    def __init__(self, plane: PlaneContext) -> None:
        super().__init__(plane)
        self.parser = httptools.HttpRequestParser(self)
        # Bytes of reads that made no parsing progress (the parser buffers an unfinished header
        # name/value itself and reports it only once complete): bounded by max_header_size.
        self.quiet = 0

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
        tls = transport.get_extra_info("ssl_object")
        if tls is not None and tls.selected_alpn_protocol() == "h2":
            self._to_h2(b"")  # TLS negotiated HTTP/2

    def _first_bytes(self, data: bytes) -> bytes:
        """The connection's first read: the HTTP/2 connection preface hands the connection to the
        HTTP/2 leg (cleartext h2c with prior knowledge). Returns what HTTP/1.1 parses (b"": none)."""
        if self.first:
            data = self.first + data
            self.first = b""
        if data[:1] == b"P":
            if data.startswith(h2_client.PREFACE):
                self._to_h2(data)
                return b""
            if len(data) < len(h2_client.PREFACE) and h2_client.PREFACE.startswith(data):
                self.first = data  # the preface may come split across reads
                return b""
        self.fresh = False
        return data

    def _to_h2(self, data: bytes) -> None:
        """Hand this connection to the HTTP/2 leg, which owns it from now on."""
        t = self.transport
        if t is None:
            return
        self.plane.clients.discard(self)
        self.transport = None
        self.closed = self.dead = True
        self.fresh = False
        h2_client.take_over(self.plane, t, self.peer, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.plane.clients.discard(self)
        self.plane.tunnels.discard(self)
        if self.tunnel_req is not None:
            treq, self.tunnel_req = self.tunnel_req, None
            recording.log_access(self.plane, treq)
        up = self.upstream or self.tunnel
        self.upstream = self.tunnel = None
        if up is not None:
            up.client = None
            up.abort()  # the client went away: stop the upstream work too (like nginx, Envoy)
        req = self.current
        if req is not None:
            self.current = None
            req.status = req.status or 499
            recording.finish(self.plane, req, aborted=True)
        for waiting in (self.req, *self.queue):
            if waiting is not None and waiting.mirror is not None:
                self.plane.mirrors.drop(waiting)  # never started: its mirror copy goes too
        self.transport = None

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
        if self.fresh:
            data = self._first_bytes(data)
            if not data:
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
            # The parser does not say where the final chunk ended, but it can only end at a line
            # end: feed line by line, so the bytes after it stay ours (like nginx, the connection
            # then goes on; chunked Upgrade requests are rare enough for the extra calls).
            at, end = 0, len(data)
            while at < end and self.ubody_left:
                nl = data.find(b"\n", at)
                stop = end if nl < 0 else nl + 1
                sub.feed_data(data[at:stop] if at or stop < end else data)
                at = stop
            if self.ubody_left:
                return b""
            rest = data[at:]
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
            add_trailer(req, name, value)
            return
        add_header(req, name, value, self.route_headers)

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
        validate(req, self.plane.via)
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
            self.current = req
            exchange.begin(plane, self, req)  # the exchange takes it from here
        else:
            self.queue.append(req)
            self.pause_reading_for(P_PIPELINE)

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
            up.send_body(req, body)
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
            up.send_end(req)

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


class _ChunkedBody:
    """Callbacks of the parser that frames a chunked Upgrade request's body (see on_message_complete)."""

    def __init__(self, client: ClientConnection) -> None:
        self.client = client

    def on_body(self, body: bytes) -> None:
        if self.client.ubody_left:
            self.client.on_body(body)

    def on_message_complete(self) -> None:
        self.client.ubody_left = 0
