"""Upstream leg (HTTP/2), the connection: one :class:`H2Upstream` to an endpoint (cleartext with
prior knowledge) carries many requests at once, each an :class:`.h2_upstream_stream.H2UpstreamStream`.

It runs the h2 state machine, writes its frames once per loop iteration, hands each event to its
stream, counts streams against the server's MAX_CONCURRENT_STREAMS, and on GOAWAY stops taking
streams and lets the ones the server did not process go elsewhere. To the sweeper and the plane it
is an upstream leg that never serves an exchange itself (idle timeout, close, abort).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from proxy.dataplane.context import PlaneContext
from proxy.dataplane.legs.base import P_UPLOAD, ClientLeg
from proxy.dataplane.legs.h2_upstream_seams import ERRORS, ClientH2
from proxy.dataplane.legs.h2_upstream_stream import H2UpstreamStream

if TYPE_CHECKING:
    from proxy.dataplane.pools import EndpointPool

log = logging.getLogger("canary_proxy.upstream")

# Streams per connection before the server's SETTINGS say otherwise (RFC 9113 6.5.2 advises 100).
DEFAULT_STREAMS = 100
# Our connection-level receive window: one stream held back by a slow client cannot stop the others.
CONNECTION_WINDOW = 1 << 24


class H2Upstream(asyncio.Protocol):
    """One HTTP/2 connection to an endpoint (prior knowledge), shared by many :class:`H2UpstreamStream`."""

    def __init__(self, pool: EndpointPool, scheme: bytes = b"http") -> None:
        self.pool = pool
        self.ctx = cast(PlaneContext, pool.plane)
        self.scheme = scheme
        self.h2 = ClientH2(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2UpstreamStream] = {}
        self.active = 0  # streams reserved or open
        self.served = 0
        self.goaway = False  # no new streams (the server's GOAWAY, or we are closing)
        self.settings_seen = False
        self.queued = False
        # The UpstreamLeg face, for the sweeper and the plane's bookkeeping (idle timeout, close).
        self.client: ClientLeg | None = None  # always None: streams serve exchanges
        self.deadline = 0.0
        self.reused = False
        self.started = False
        self.tunnel = False
        self.until_close = False

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.ENABLE_PUSH: 0}
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.ctx.upstream_conns.add(self)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ctx.upstream_conns.discard(self)
        self.pool.forget(self)
        self.transport = None
        self.goaway = True
        for stream in list(self.streams.values()):
            stream.lost(exc)

    def pause_writing(self) -> None:
        for stream in self.streams.values():
            if stream.client is not None:
                stream.client.pause_reading_for(P_UPLOAD)

    def resume_writing(self) -> None:
        for stream in self.streams.values():
            if stream.client is not None and not stream.blocked:
                stream.client.resume_reading_for(P_UPLOAD)

    def data_received(self, data: bytes) -> None:
        self.ctx.clock.read()
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.protocol_error(f"HTTP/2 protocol error: {exc}")
            return
        touched: list[ClientLeg] = []  # client legs to flush once this read is handled
        streams = self.streams
        for ev in events:
            sid = getattr(ev, "stream_id", 0)
            stream = streams.get(sid) if sid else None
            if stream is not None and stream.client is not None:
                touched.append(stream.client)
            if isinstance(ev, h2.events.DataReceived):
                if stream is None:
                    self.ack(ev.flow_controlled_length or 0, sid)
                    continue
                stream.on_data(ev.data or b"", ev.flow_controlled_length or 0)
            elif stream is not None and isinstance(ev, h2.events.ResponseReceived):
                stream.on_response(cast("list[tuple[bytes, bytes]]", ev.headers or []), ev.stream_ended is not None)
            elif stream is not None and isinstance(ev, h2.events.InformationalResponseReceived):
                stream.on_interim(cast("list[tuple[bytes, bytes]]", ev.headers or []))
            elif stream is not None and isinstance(ev, h2.events.TrailersReceived):
                stream.on_trailers(cast("list[tuple[bytes, bytes]]", ev.headers or []))
            elif stream is not None and isinstance(ev, h2.events.StreamEnded):
                stream.on_end()
            elif stream is not None and isinstance(ev, h2.events.StreamReset):
                stream.on_reset(int(ev.error_code or 0))
            elif isinstance(ev, h2.events.WindowUpdated):
                for s in [stream] if stream is not None else list(streams.values()):
                    s.pump()
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                self.settings_seen = True
                for s in list(streams.values()):
                    s.pump()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.on_goaway(ev.last_stream_id or 0)
        self.flush()
        for client in dict.fromkeys(touched):
            client.flush_later(len(data))

    # -- streams -------------------------------------------------------------------------------------

    def has_room(self) -> bool:
        """Whether another stream may start here now (open, no GOAWAY, under the server's limit)."""
        if self.goaway or self.transport is None or self.transport.is_closing():
            return False
        limit = self.h2.remote_settings.max_concurrent_streams if self.settings_seen else DEFAULT_STREAMS
        return self.active < limit

    def new_stream(self) -> H2UpstreamStream:
        """Reserve a slot for a request; its stream opens when the request is sent."""
        self.active += 1
        self.deadline = 0.0
        stream = H2UpstreamStream(self.pool, self)
        stream.reused = self.served > 0
        self.served += 1
        return stream

    def opened(self, sid: int, stream: H2UpstreamStream) -> None:
        self.streams[sid] = stream

    def forget_stream(self, sid: int) -> None:
        self.streams.pop(sid, None)

    def stream_done(self) -> None:
        self.active -= 1
        if self.active > 0:
            return
        if self.goaway:
            self.close_now()
        else:
            self.deadline = self.ctx.clock.now + self.ctx.snapshot.config.timeouts.idle

    def on_goaway(self, last_stream_id: int) -> None:
        """The server stops taking streams: newer ones were not processed and go elsewhere; older
        ones still complete (RFC 9113 6.8, see :class:`.h2_upstream_seams.ClientH2`)."""
        self.goaway = True
        self.pool.forget(self)
        for sid, stream in sorted(self.streams.items()):
            if sid > last_stream_id:
                stream.refused()
        if not self.active:
            self.close_now()

    def protocol_error(self, why: str) -> None:
        log.warning("upstream %s:%d: %s", self.pool.host, self.pool.port, why)
        self.goaway = True
        for stream in list(self.streams.values()):
            client = stream.client
            stream.detach()
            stream.client = None
            if client is not None:
                client.upstream_protocol_error(stream, why)
        self.abort()

    def ack(self, size: int, sid: int) -> None:
        if size and self.transport is not None:
            with contextlib.suppress(*ERRORS):
                self.h2.acknowledge_received_data(size, sid)
            self.want_flush()

    # -- writing and closing -------------------------------------------------------------------------

    def alpn(self) -> str | None:
        """The protocol the server selected by ALPN (TLS connections; None otherwise)."""
        t = self.transport
        obj = t.get_extra_info("ssl_object") if t is not None else None
        return cast("str | None", obj.selected_alpn_protocol()) if obj is not None else None

    def buffer_size(self) -> int:
        t = self.transport
        return t.get_write_buffer_size() if t is not None else 0

    def want_flush(self) -> None:
        """Write the frames produced so far at the end of this loop iteration (one write)."""
        if not self.queued:
            self.queued = True
            self.ctx.queue_flush(self)

    def flush_queued(self) -> None:
        self.queued = False
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def released(self) -> None:
        """Part of the upstream-leg face; a connection is never handed to an exchange."""

    def close(self) -> None:
        """Close gracefully: no new streams; GOAWAY and close once the open ones are done (h2
        refuses every frame after its own GOAWAY, so it is not sent before)."""
        if not self.goaway:
            self.goaway = True
            self.pool.forget(self)
        if not self.active:
            self.close_now()

    def close_now(self) -> None:
        """GOAWAY (when the connection is still usable) and close."""
        t = self.transport
        if t is not None and not t.is_closing():
            with contextlib.suppress(*ERRORS):
                self.h2.close_connection()
            self.flush()
            t.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
