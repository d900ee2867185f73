"""Client leg (HTTP/2): one asyncio protocol per HTTP/2 client connection, framing with python-hyper
`h2`; each stream becomes one request on the exchange (:mod:`.h2_stream`).

The HTTP/1.1 leg hands a connection over (:func:`take_over`) when TLS negotiated ALPN `h2` or the
first bytes are the HTTP/2 connection preface (cleartext h2c with prior knowledge). This class owns
the connection from then on: settings, the per-connection deadlines, the flood counters
(:mod:`.h2_limits`), write batching and backpressure, and the graceful GOAWAY on drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from proxy.dataplane import exchange
from proxy.dataplane.legs import h2_limits as L
from proxy.dataplane.legs.base import UpstreamLeg
from proxy.dataplane.legs.h2_hpack import ResponseEncoder
from proxy.dataplane.legs.h2_request import Malformed, build, check_request, check_trailers
from proxy.dataplane.legs.h2_respond import HOLD_CONNECTION, H2Responder
from proxy.dataplane.legs.h2_stream import H2Stream
from proxy.dataplane.legs.http1_buffers import READ_VIEW, WRITE_HIGH, WRITE_LOW
from proxy.dataplane.legs.http1_request import Reject
from proxy.dataplane.request import Request

if TYPE_CHECKING:
    from proxy.dataplane.context import PlaneContext

log = logging.getLogger("canary_proxy.http")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# What the connection's one deadline means (the sweeper calls on_timeout when it passes).
D_NONE, D_HEADER, D_IDLE, D_STREAMS, D_LINGER = 0, 1, 2, 3, 4
TICK = 1.0  # while streams are open: how often their body and send deadlines are checked
LINGER = 2.0  # after our GOAWAY: how long we read and drop before the final close


def take_over(plane: PlaneContext, transport: asyncio.Transport, peer: bytes, data: bytes) -> None:
    """Make an HTTP/2 connection the protocol of `transport`; `data`: what was read so far."""
    conn = H2ClientConnection(plane, peer)
    transport.set_protocol(conn)
    conn.connection_made(transport)
    if data:
        conn.data_received(data)


class H2ClientConnection(asyncio.BufferedProtocol):
    """One HTTP/2 client connection: a :class:`~proxy.dataplane.context.ClientSide` for the sweeper
    and the drain (its streams are the exchanges' client sides)."""

    def __init__(self, plane: PlaneContext, peer: bytes) -> None:
        self.plane = plane
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.queued = False
        self.current: Request | None = None  # a request in flight (the drain reports it)
        self.deadline = 0.0
        self.dkind = D_NONE
        self.paused = 0
        self.write_blocked_at = 0.0
        self.blocked = False  # our write buffer is full: every stream holds its upstream
        self.streams: dict[int, H2Stream] = {}
        self.goaway = False  # GOAWAY sent: no new streams
        config = plane.snapshot.config
        self.timeouts = config.timeouts
        limits = config.limits
        self.h2 = h2 = H2Connection(
            H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_outbound_headers=False,  # built by us from parsed, checked HTTP/1.1 fields
                normalize_outbound_headers=False,
                validate_inbound_headers=False,  # check_request / check_trailers: the same rules, cheaper
                normalize_inbound_headers=False,  # cookie crumbs are joined by build / trailer_lines
            )
        )
        h2.local_settings = Settings(client=False, initial_values=L.local_settings(limits))
        h2.decoder.max_header_list_size = L.max_header_list_size(limits)  # before the client's ACK too
        h2.encoder = ResponseEncoder()  # stateless, memoised field encodings
        self.shrink_encoder()
        self.block_cap = L.header_block_cap(limits)
        self.resets = L.Counter(L.RESET_LIMIT)
        self.control = L.Counter(L.CONTROL_LIMIT)

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        # Several streams share this buffer: a little more room than one HTTP/1.1 response has.
        transport.set_write_buffer_limits(4 * WRITE_HIGH, WRITE_LOW)
        self.plane.clients.add(self)
        h2 = self.h2
        h2.initiate_connection()
        h2.increment_flow_control_window(L.CONNECTION_WINDOW - L.STREAM_WINDOW)
        self.flush()
        self.deadline = self.plane.clock.read() + self.timeouts.client_header
        self.dkind = D_HEADER

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.plane.clients.discard(self)
        self._drop_streams()
        self.transport = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return READ_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(READ_VIEW[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        now = self.plane.clock.read()
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            # The library queued a GOAWAY with the error code (PROTOCOL_ERROR, or ENHANCE_YOUR_CALM
            # for an HPACK bomb, FLOW_CONTROL_ERROR...): send it and close.
            log.debug("HTTP/2 client %s: %s", self.peer.decode(), exc)
            self.plane.stats.rejected += 1
            self.terminate(None)
            return
        # Streams the client reset in this very read are never started (rapid reset costs little).
        reset = {ev.stream_id for ev in events if isinstance(ev, StreamReset)} if len(events) > 1 else None
        for ev in events:
            try:
                self.event(ev, now, reset)
            except ProtocolError:  # a stream the library already closed: it ends like a lost one
                stream = self.streams.get(getattr(ev, "stream_id", 0))
                if stream is not None:
                    stream.lost()
            if self.closed:
                return
        buffered = getattr(self.h2.incoming_buffer, "_headers_buffer", None)  # unfinished header block
        if buffered and sum(len(f.data) for f in buffered) > self.block_cap:
            log.warning("HTTP/2 client %s: header block over the limit (CONTINUATION flood)", self.peer.decode())
            self.calm()
            return
        self.flush()

    def event(self, ev: Event, now: float, reset: set[int] | None) -> None:
        """Handle one event of the library (what one frame, or a header block, meant)."""
        if isinstance(ev, DataReceived):
            stream = self.streams.get(ev.stream_id)
            if stream is not None:
                stream.on_data(ev.data, ev.flow_controlled_length)
            else:  # a stream we answered or reset: its bytes still count against our window
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if not ev.data and ev.stream_ended is None and self.control.hit(now):
                self.calm()
        elif isinstance(ev, RequestReceived):
            headers = ev.headers or []
            try:
                check_request(headers)  # even for a stream reset already, as the library did
            except Malformed as exc:
                self.malformed(exc)
                return
            if reset is not None and ev.stream_id in reset:
                return
            self.request(ev.stream_id, headers, ev.stream_ended is not None)
        elif isinstance(ev, StreamEnded):
            stream = self.streams.get(ev.stream_id)
            if stream is not None:
                stream.on_end()
        elif isinstance(ev, WindowUpdated):
            self.window_opened(ev.stream_id)
        elif isinstance(ev, StreamReset):
            stream = self.streams.get(ev.stream_id)
            if stream is not None:
                stream.lost()  # the library sent or saw the RST_STREAM: nothing more to send
            if ev.remote_reset and self.resets.hit(now):
                log.warning("HTTP/2 client %s reset too many streams (rapid reset): GOAWAY", self.peer.decode())
                self.calm()
        elif isinstance(ev, TrailersReceived):
            trailers = list(ev.headers or ())
            try:
                check_trailers(trailers)
            except Malformed as exc:
                self.malformed(exc)  # the connection is closed: no stream is left
            stream = self.streams.get(ev.stream_id)
            if stream is not None:
                stream.on_trailers(trailers)
        elif isinstance(ev, (PingReceived, PriorityUpdated)):
            if self.control.hit(now):
                self.calm()
        elif isinstance(ev, RemoteSettingsChanged):
            if self.control.hit(now):
                self.calm()
            else:
                changed = ev.changed_settings
                if SettingCodes.HEADER_TABLE_SIZE in changed:
                    self.shrink_encoder()  # the library sized our encoder's table to the client's
                if SettingCodes.INITIAL_WINDOW_SIZE in changed:
                    self.window_opened(0)
        elif isinstance(ev, ConnectionTerminated):
            self.terminate(None)  # the client's GOAWAY: the library sends nothing more

    def pause_writing(self) -> None:
        self.write_blocked_at = self.plane.clock.read()
        self.blocked = True
        for stream in list(self.streams.values()):
            stream.set_hold(HOLD_CONNECTION, True)

    def resume_writing(self) -> None:
        self.write_blocked_at = 0.0
        self.blocked = False
        for stream in list(self.streams.values()):
            stream.set_hold(HOLD_CONNECTION, False)

    # -- streams ---------------------------------------------------------------------------------

    def request(self, sid: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        """A new stream's complete header list (checked): the request goes to the exchange."""
        plane = self.plane
        if self.goaway:
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)  # after our GOAWAY (drain)
            return
        req = Request(plane.snapshot)
        req.peer = self.peer
        req.t0 = plane.clock.now
        req.keep_alive = False  # nothing follows on a stream (HTTP/1.1's notion, for the legs)
        try:
            build(req, headers, ended, plane.via, req.snapshot.route_headers)
            req.max_body = exchange.route(plane, req, self.peer)
            if req.max_body is not None and req.clen > req.max_body:
                raise Reject(413)
        except Reject as exc:
            plane.stats.rejected += 1
            req.error = exc.status
        stream = H2Stream(self, sid, req, self.peer)
        if self.blocked:
            stream.hold = HOLD_CONNECTION
        self.streams[sid] = stream
        self.current = req
        if self.dkind != D_STREAMS:
            self.deadline = plane.clock.now + TICK
            self.dkind = D_STREAMS
        if ended:
            stream.on_end()
        exchange.begin(plane, stream, req)

    def shrink_encoder(self) -> None:
        """Keep our HPACK encoder's table at ENCODER_TABLE at most, and announce the change as
        RFC 7541 4.2 asks: the smallest size reached since the last header block, then the final."""
        enc = self.h2.encoder
        size = min(self.h2.remote_settings.header_table_size, L.ENCODER_TABLE)
        enc.header_table_size = size
        changes = enc.table_size_changes
        if changes:
            low = min(changes)
            enc.table_size_changes = [low, size] if low < size else [size]

    def window_opened(self, sid: int) -> None:
        """The client's window grew (one stream's, or the connection's: every stream may go on)."""
        if sid:
            stream = self.streams.get(sid)
            if stream is not None and stream.out:
                stream.pump()
            return
        for stream in list(self.streams.values()):
            if stream.out:
                stream.pump()

    def stream_done(self, stream: H2Responder) -> None:
        """`stream` ended (answered, reset or lost)."""
        self.streams.pop(stream.sid, None)
        if self.closed:
            return
        streams = self.streams
        if streams:
            self.current = next(iter(streams.values())).current
            return
        self.current = None
        if self.goaway:
            self.flush()
            self.close()  # draining: the last stream is done
            return
        self.deadline = self.plane.clock.now + self.timeouts.idle
        self.dkind = D_IDLE

    # -- writing ---------------------------------------------------------------------------------

    def schedule_flush(self) -> None:
        """Write what the streams produced at the end of this loop iteration, in one call."""
        if not self.queued:
            self.queued = True
            self.plane.queue_flush(self)

    def flush_queued(self) -> None:
        self.queued = False
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        t = self.transport
        if data and t is not None:
            t.write(data)
            if t.get_write_buffer_size() > L.MAX_QUEUED:
                self.abort()  # a client that sends but never reads (ping/settings acks pile up)

    # -- ClientSide (sweeper, drain) -------------------------------------------------------------

    def is_idle(self) -> bool:
        """No stream in flight. While the plane drains, the first call sends GOAWAY (the last
        stream id we will serve): in-flight streams finish, the client opens no new ones."""
        if self.plane.draining and not self.goaway and not self.closed:
            self.flush()
            frame = GoAwayFrame(0, last_stream_id=self.h2.highest_inbound_stream_id, error_code=ErrorCodes.NO_ERROR)
            self.goaway = True
            if self.transport is not None:
                self.transport.write(frame.serialize())
        return not self.streams

    def on_timeout(self, now: float) -> None:
        if self.dkind == D_STREAMS:
            for stream in list(self.streams.values()):
                stream.on_timeout(now)
            if self.dkind == D_STREAMS:
                self.deadline = now + TICK
            return
        if self.dkind == D_LINGER:
            self.dkind = D_NONE
            self.abort()
            return
        # No stream open: the first HEADERS never came (header timeout), or idle for timeouts.idle.
        self.dkind = D_NONE
        self.close()

    def check_gone(self) -> None:
        pass  # reading never pauses: a FIN or RST is seen at once

    def respond_error(self, req: Request, status: int) -> None:
        pass  # requests are answered on their streams

    def upstream_ready(self, leg: UpstreamLeg) -> None:
        pass  # upstream connections serve streams

    def pause_reading_for(self, reason: int) -> None:
        pass  # backpressure is per stream (flow control), never the whole connection

    def malformed(self, exc: Malformed) -> None:
        """GOAWAY PROTOCOL_ERROR (even after our drain GOAWAY, as the library did) and close."""
        log.debug("HTTP/2 client %s: %s", self.peer.decode(), exc)
        self.plane.stats.rejected += 1
        with contextlib.suppress(ProtocolError):
            self.h2.close_connection(ErrorCodes.PROTOCOL_ERROR, last_stream_id=self.h2.highest_inbound_stream_id)
        self.terminate(None)

    def calm(self) -> None:
        """GOAWAY ENHANCE_YOUR_CALM and close: the client abuses the protocol."""
        self.plane.stats.rejected += 1
        self.terminate(ErrorCodes.ENHANCE_YOUR_CALM)

    def terminate(self, code: ErrorCodes | None) -> None:
        """Send GOAWAY `code` (None: the library queued one already), stop every stream, close."""
        if code is not None and not self.goaway:
            with contextlib.suppress(ProtocolError):  # closed already (the client's GOAWAY)
                self.h2.close_connection(code, last_stream_id=self.h2.highest_inbound_stream_id)
        self.goaway = True
        self.closed = True
        self._drop_streams()
        self.flush()
        t = self.transport
        if t is None:
            return
        if not t.can_write_eof():
            t.close()
            return
        # Close gently: half-close, then read and drop what the client still sends until it closes
        # or LINGER passes. Closing with unread input makes the kernel send a RST, and the client
        # could lose the GOAWAY that says why.
        try:
            t.write_eof()
        except OSError:  # the client is gone already
            t.close()
            return
        self.deadline = self.plane.clock.read() + LINGER
        self.dkind = D_LINGER

    def close(self) -> None:
        """Close gently: GOAWAY NO_ERROR (unless one was sent), flush, close."""
        if self.closed:
            return
        self.terminate(ErrorCodes.NO_ERROR)

    def abort(self) -> None:
        self.closed = True
        self._drop_streams()
        if self.transport is not None:
            self.transport.abort()

    def _drop_streams(self) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.lost()
