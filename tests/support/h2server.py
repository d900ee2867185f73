"""A small HTTP/2 server (cleartext, prior knowledge) built on python-hyper `h2`, for upstream tests.

Each complete request (headers and body) is handed to `handler(stream)`, a coroutine that answers
through the :class:`Stream` methods. The server counts accepted connections (`accepts`) and keeps
every request it saw, so tests can check multiplexing and what was forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

Headers = list[tuple[bytes, bytes]]


class Stream:
    """One request on a connection, and the ways to answer it."""

    def __init__(self, conn: _Conn, sid: int, headers: Headers) -> None:
        self.conn = conn
        self.sid = sid
        self.headers = headers
        self.body = b""

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    def send_headers(self, status: int, headers: Headers = (), end: bool = False) -> None:  # type: ignore[assignment]
        self.conn.h2.send_headers(self.sid, [(b":status", b"%d" % status), *headers], end_stream=end)
        self.conn.flush()

    async def send_data(self, data: bytes, end: bool = False) -> None:
        """Send `data`, waiting for the flow-control window as needed."""
        h = self.conn.h2
        while data:
            room = min(h.local_flow_control_window(self.sid), h.max_outbound_frame_size)
            if room <= 0:
                await self.conn.window_changed()
                continue
            h.send_data(self.sid, data[:room])
            data = data[room:]
            self.conn.flush()
        if end:
            h.end_stream(self.sid)
            self.conn.flush()

    def send_trailers(self, trailers: Headers) -> None:
        self.conn.h2.send_headers(self.sid, trailers, end_stream=True)
        self.conn.flush()

    async def respond(self, status: int, headers: Headers, body: bytes = b"", trailers: Headers | None = None) -> None:
        self.send_headers(status, headers, end=not body and not trailers)
        if body:
            await self.send_data(body, end=not trailers)
        if trailers:
            self.send_trailers(trailers)

    def goaway(self, last_stream_id: int) -> None:
        """GOAWAY (NO_ERROR) naming `last_stream_id` as the last one processed. Written as a raw
        frame: h2 would refuse to answer the streams up to `last_stream_id` after its own GOAWAY."""
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = 0
        self.conn.flush()
        if self.conn.transport is not None:
            self.conn.transport.write(frame.serialize())

    def die(self) -> None:
        """Drop the connection at once (no GOAWAY)."""
        if self.conn.transport is not None:
            self.conn.transport.abort()


Handler = Callable[[Stream], Awaitable[None]]


class _Conn(asyncio.Protocol):
    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.window = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.accepts += 1
        self.server.conns.append(self)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_streams},
        )
        self.h2.initiate_connection()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.window.set()

    async def window_changed(self) -> None:
        self.window.clear()
        await self.window.wait()
        if self.transport is None:
            raise ConnectionError("connection closed")

    def data_received(self, data: bytes) -> None:
        for ev in self.h2.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                self.streams[ev.stream_id] = Stream(self, ev.stream_id, list(ev.headers or []))  # type: ignore[arg-type]
                self.server.requests.append(self.streams[ev.stream_id])
                if self.streams[ev.stream_id].header(b"expect") == b"100-continue":
                    self.h2.send_headers(ev.stream_id, [(b":status", b"100")])
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id in self.streams:
                self.streams[ev.stream_id].body += ev.data or b""
                self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in self.streams:
                stream = self.streams[ev.stream_id]
                task = asyncio.get_running_loop().create_task(self.server.run(stream))
                self.server.tasks.add(task)
                task.add_done_callback(self.server.tasks.discard)
            elif isinstance(ev, h2.events.StreamReset):
                self.server.resets.append(ev.stream_id)
            elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self.window.set()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)


class H2Server:
    """Listen on 127.0.0.1 (ephemeral port); `await close()` stops it and its handlers."""

    def __init__(self, handler: Handler, max_streams: int = 100, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.handler = handler
        self.max_streams = max_streams
        self.accepts = 0
        self.conns: list[_Conn] = []
        self.requests: list[Stream] = []
        self.resets: list[int] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> H2Server:
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _Conn(self), "127.0.0.1", 0, ssl=self.tls
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def run(self, stream: Stream) -> None:
        with contextlib.suppress(ConnectionError, h2.exceptions.ProtocolError):
            await self.handler(stream)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
