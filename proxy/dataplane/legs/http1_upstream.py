"""Upstream leg (HTTP/1.1): one connection to an endpoint; parses the response with httptools and
streams it to the client side (:class:`proxy.dataplane.legs.base.ClientLeg`).

Pools live in :mod:`proxy.dataplane.pools`, balancing in :mod:`proxy.dataplane.balancer`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, cast

import httptools

from proxy.dataplane.legs.base import P_UPLOAD, ClientLeg
from proxy.dataplane.legs.http1_buffers import READ_VIEW, WRITE_HIGH, WRITE_LOW, read_view
from proxy.dataplane.legs.http1_headers import (
    CONNECTION_OPTIONS,
    H_CL,
    H_CONNECTION,
    H_PLAIN,
    H_REQID,
    H_TE,
    H_TRAILER,
    H_UPGRADE,
    RESPONSE_EXACT,
    RESPONSE_SPECIAL,
    connection_tokens,
    without_named,
)
from proxy.dataplane.legs.http1_request import last_chunk

if TYPE_CHECKING:
    from proxy.dataplane.pools import EndpointPool
    from proxy.dataplane.request import Request

# Interim (1xx) responses relayed per request; more is a misbehaving upstream: 502.
MAX_INTERIM = 32
# Reads of 64 KiB a lost tunnel upstream gets for what it sent before going away.
SALVAGE_READS = 4

log = logging.getLogger("canary_proxy.upstream")


# The Connection values nearly every response carries, already tokenized.
_SIMPLE_CONNECTION = {v: v.lower() for v in (b"keep-alive", b"Keep-Alive", b"close", b"Close")}


class UpstreamConnection(asyncio.BufferedProtocol):
    """One TCP connection to an endpoint. Bound to at most one client exchange at a time."""

    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: ClientLeg | None = None
        self.deadline = 0.0  # loop time; 0 = none
        self.tunnel = False
        self.started = False  # response head forwarded to the client
        self.reused = False  # taken from the idle pool at least once
        self.interim = False  # parsing a 1xx
        self.until_close = False  # response framed by connection close
        self.lines: list[bytes] = []
        self.reason = b""
        self.has_length = False  # Content-Length present (llhttp has checked its value)
        self.chunked = False
        self.has_reqid = False
        self.conn_tokens: list[bytes] | None = None
        self.upgrade: bytes | None = None  # the Upgrade header: hop-by-hop, only forwarded with a 101
        # Response head limits (the client's max_headers / max_header_size apply to upstreams too).
        self.nheaders = 0
        self.hsize = 0
        self.head_bytes = 0  # bytes read while a head is incomplete (httptools buffers partial lines)
        self.ninterim = 0
        self.trailer: bytes | None = None  # the `Trailer` header
        self.trailers: list[bytes] | None = None  # trailer lines after a chunked body
        self.spare_fd = -1  # a tunnel's second descriptor of the socket (see keep_spare)
        # The response ended with its head (HTTP/2 HEADERS with END_STREAM: a gRPC trailers-only
        # answer); an HTTP/2 client leg then ends its stream with the head too. Never set here.
        self.ended_with_head = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self.pool.plane.upstream_conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.plane.upstream_conns.discard(self)
        self.pool.forget(self)
        transport, self.transport = self.transport, None
        client = self.client
        if self.spare_fd >= 0:
            self._salvage(client)
        if client is not None:
            self.client = None
            client.upstream_lost(self, exc, transport)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_reading_for(P_UPLOAD)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading_for(P_UPLOAD)

    def get_buffer(self, sizehint: int) -> memoryview:
        """Read at most what the client's write buffer still has room for: with a slow client,
        bytes in flight per connection stay under READ_BUDGET (uvloop would read 256 KiB)."""
        client = self.client
        t = client.transport if client is not None else None
        return read_view(t.get_write_buffer_size() if t is not None else 0)

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(READ_VIEW[:nbytes]))

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            self.close()  # nobody asked: an idle connection must stay silent
            return
        if self.tunnel:
            client.tunnel_write(data)
            return
        now = self.pool.plane.clock.read()  # for the deadlines set while this response is handled
        started = self.started
        if not started:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            rest = data[exc.args[0] :] if exc.args else b""
            if self.tunnel and rest and self.client is not None:
                self.client.tunnel_write(rest)
        except httptools.HttpParserError as exc:
            client.upstream_protocol_error(self, str(exc))
        else:
            if not self.started and self.head_bytes > client.max_header_size + 8192:
                # An endless header line: httptools buffers it whole before calling on_header.
                client.upstream_protocol_error(self, "response head larger than limits.max_header_size")
        if self.started and not self.tunnel:
            # The response timeout also bounds each pause within a response once it has started.
            self.deadline = now + client.timeouts.response
        client.flush_later(len(data))

    # -- the request -------------------------------------------------------------------------------

    def send_request(self, req: Request) -> None:
        """Write `req`'s head and whatever of its body has arrived, framed for HTTP/1.1. Writes go
        through the client side's deferred writes: one client read's bytes leave in one call."""
        client = self.client
        t = self.transport
        if client is None or t is None:
            return
        if req.body:
            client.up_write(t, req.head)
            chunks, req.body = req.body, []
            for chunk in chunks:
                self.send_body(req, chunk)
            if req.complete and req.te is not None:
                client.up_write(t, last_chunk(req))
        elif req.complete and req.te is not None:
            client.up_write(t, req.head + last_chunk(req))
        else:
            client.up_write(t, req.head)
        if req.complete:
            self.deadline = self.pool.plane.clock.now + (req.try_timeout or client.timeouts.response)
        else:
            self.deadline = 0.0

    def send_body(self, req: Request, body: bytes) -> None:
        """Pass one piece of the request body on (re-framed as chunked when it came chunked)."""
        client = self.client
        t = self.transport
        if client is None or t is None:
            return
        req.body_forwarded = True
        if req.te is not None:
            client.up_write(t, b"%x\r\n" % len(body))
            client.up_write(t, body)
            client.up_write(t, b"\r\n")
        else:
            client.up_write(t, body)

    def send_end(self, req: Request) -> None:
        """The request body is complete: end the chunked framing; the response timeout starts."""
        client = self.client
        t = self.transport
        if client is None or t is None:
            return
        if req.te is not None:
            client.up_write(t, last_chunk(req))
        self.deadline = self.pool.plane.clock.now + (req.try_timeout or client.timeouts.response)

    # -- httptools callbacks -------------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason = status

    def on_header(self, name: bytes, value: bytes) -> None:
        client = self.client
        if client is not None:
            self.nheaders += 1
            self.hsize += len(name) + len(value) + 4
            if self.nheaders > client.max_headers or self.hsize > client.max_header_size:
                raise ValueError("response headers over limits.max_headers / max_header_size")  # -> 502
        if value and (value[-1] == 32 or value[-1] == 9):
            value = value.rstrip(b" \t")  # OWS is not part of the value (RFC 9110 5.5)
        if self.started:
            self._trailer(name, value)
            return
        kind = RESPONSE_EXACT.get(name)
        if kind is None:
            kind = RESPONSE_SPECIAL.get(name.lower(), H_PLAIN)
        if kind == H_PLAIN:
            self.lines.append(name + b": " + value + b"\r\n")
            return
        if kind == H_CL:
            self.has_length = True
            self.lines.append(b"Content-Length: " + value + b"\r\n")
        elif kind == H_TE:
            if self.chunked or value.strip().lower() != b"chunked":
                raise ValueError("unsupported or repeated Transfer-Encoding")  # -> protocol error, 502
            self.chunked = True
        elif kind == H_CONNECTION:
            simple = _SIMPLE_CONNECTION.get(value)  # "keep-alive" / "close": nearly every response
            tokens = [simple] if simple is not None else connection_tokens(value)
            self.conn_tokens = tokens if self.conn_tokens is None else self.conn_tokens + tokens
        elif kind == H_UPGRADE:
            self.upgrade = value
        elif kind == H_REQID:
            self.has_reqid = True
            self.lines.append(name + b": " + value + b"\r\n")
        elif kind == H_TRAILER:
            self.trailer = value if self.trailer is None else self.trailer + b", " + value
        # H_HOP: dropped

    def _trailer(self, name: bytes, value: bytes) -> None:
        """A trailer after a chunked body: relayed when the client leg is chunked too (framing and
        hop-by-hop fields are never taken from trailers, RFC 9110 6.5.1)."""
        if name.lower() in RESPONSE_SPECIAL:
            return
        if self.trailers is None:
            self.trailers = []
        self.trailers.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        client = self.client
        if client is not None:
            status = self.parser.get_status_code()
            if 100 <= status < 200 and status != 101:
                self.interim = True
                self.ninterim += 1
                if self.ninterim > MAX_INTERIM:
                    raise ValueError(f"more than {MAX_INTERIM} interim (1xx) responses")  # -> 502
                client.response_interim(status, self.reason, self.lines)
            else:
                self.started = True
                client.response_head(self, status)
        self._clear_head()

    def _clear_head(self) -> None:
        """Forget the head just handled: the next message's headers start afresh (this saves the
        parser an on_message_begin callback per response)."""
        self.lines = []
        self.has_length = False
        self.chunked = False
        self.has_reqid = False
        self.conn_tokens = None
        self.upgrade = None
        self.nheaders = self.hsize = self.head_bytes = 0

    def on_body(self, body: bytes) -> None:
        client = self.client
        if client is not None:
            client.response_body(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        client = self.client
        if client is not None:
            client.response_complete(self, self.parser.should_keep_alive())

    # -- pool side -------------------------------------------------------------------------------

    def filtered_lines(self) -> list[bytes]:
        """Response header lines without the ones named in Connection (rarely needed)."""
        return without_named(self.lines, self.conn_tokens, CONNECTION_OPTIONS)

    def head_keep_alive(self) -> bool:
        """Whether the connection stays open after the response head being parsed (its version
        and Connection header; the parser itself would wait for a HEAD response's body)."""
        tokens = self.conn_tokens or ()
        if self.parser.get_http_version() == "1.1":
            return b"close" not in tokens
        return b"keep-alive" in tokens

    def reset_parser(self) -> None:
        """A response to HEAD has no body whatever its framing headers say; start afresh."""
        self.parser = httptools.HttpResponseParser(self)

    def released(self) -> None:
        """Back in its pool: forget the exchange's response state (the next one starts afresh)."""
        self.ninterim = self.head_bytes = 0
        self.trailer = None
        self.trailers = None

    def keep_spare(self) -> None:
        """A tunnel keeps a second descriptor of its socket. When a write to the upstream fails
        (it sent a WebSocket close frame and reset the connection), the transport closes without
        reading what is still queued on the socket; the spare lets us read it (see _salvage)."""
        t = self.transport
        if t is None or t.get_extra_info("ssl_object") is not None:
            return  # TLS: the socket's bytes are records, not the upstream's data
        sock = t.get_extra_info("socket")
        if sock is not None and self.spare_fd < 0:
            try:
                self.spare_fd = os.dup(sock.fileno())
            except OSError:
                self.spare_fd = -1  # out of descriptors: the tunnel works without it

    def _salvage(self, client: ClientLeg | None) -> None:
        """Pass on what the upstream sent before it went away and the transport did not read,
        then close the spare descriptor (that closes the socket)."""
        fd, self.spare_fd = self.spare_fd, -1
        try:
            for _ in range(SALVAGE_READS):
                if client is None or not self.tunnel:
                    break
                data = os.read(fd, 65536)  # non-blocking: libuv set O_NONBLOCK on the socket
                if not data:
                    break
                client.tunnel_write(data)
        except OSError:
            pass  # nothing left (EAGAIN) or the reset itself
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
