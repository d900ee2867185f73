"""A raw HTTP/2 client over a real socket, driven frame by frame with python-hyper `h2`: for the
HTTP/2 tests that need what real clients never do (floods, resets, windows that never open)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, Event, ResponseReceived, StreamEnded, StreamReset

Headers = list[tuple[bytes, bytes]]
GOAWAY, RST_STREAM = 0x7, 0x3
NO_ERROR, PROTOCOL_ERROR, REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x0, 0x1, 0x7, 0xB


def request_headers(path: str = "/", method: str = "GET", authority: str = "h2.test", **extra: str) -> Headers:
    """A request's header list (pseudo-headers first)."""
    hdrs = [(b":method", method.encode()), (b":path", path.encode()), (b":scheme", b"http")]
    hdrs.append((b":authority", authority.encode()))
    hdrs += [(k.replace("_", "-").encode(), v.encode()) for k, v in extra.items()]
    return hdrs


class RawH2:
    """One client connection: `conn` is the h2 state machine, `events` what the server sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, validate: bool = True) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = H2Connection(
            H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=validate)
        )
        self.events: list[Event] = []
        self.closed = False
        self.received = 0  # bytes read from the server
        self.frames: list[tuple[int, int, int, bytes]] = []  # (type, flags, stream, payload), as read
        self._buf = b""

    @classmethod
    async def open(cls, port: int, validate: bool = True) -> RawH2:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer, validate)
        client.conn.initiate_connection()
        client.flush()
        return client

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    def raw(self, data: bytes) -> None:
        """Bytes the state machine does not know about (hand-made frames)."""
        self.writer.write(data)

    async def pump(self, until: Callable[[RawH2], Any], timeout: float = 10.0) -> Any:
        """Read and handle server frames until `until(self)` is truthy or the server closes; returns
        the last value of `until`. Fails after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            done = until(self)
            if done or self.closed:
                return done
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; events so far: {self.events[-5:]!r}")
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            except TimeoutError:
                continue  # the deadline check above reports it
            if not data:
                self.closed = True
                continue
            self.received += len(data)
            self._parse(data)
            try:
                self.events += self.conn.receive_data(data)
            except Exception:  # the server's GOAWAY may cut our state machine short: keep the events
                self.closed = True
            self.flush()

    async def peek(self, wait: float = 0.01) -> bool:
        """Read what the server has sent so far (waiting at most `wait` s for more): True once it
        sent a GOAWAY or closed. A flooding client must read as it goes: once the server resets
        the connection, bytes it sent earlier but not yet read are lost to the reader."""
        with contextlib.suppress(AssertionError):
            await self.pump(lambda c: c.goaway_code() is not None, timeout=wait)
        return self.closed or self.goaway_code() is not None

    async def get(self, path: str = "/", **extra: str) -> tuple[int, dict[bytes, bytes], bytes]:
        """One GET on a new stream; returns status, headers and the body."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, request_headers(path, **extra), end_stream=True)
        self.flush()
        await self.pump(lambda c: c.ended(sid))
        return self.response(sid)

    def ended(self, sid: int) -> bool:
        return (
            any(isinstance(e, (StreamEnded, StreamReset)) and e.stream_id == sid for e in self.events)
            or self.goaway() is not None
        )

    def response(self, sid: int) -> tuple[int, dict[bytes, bytes], bytes]:
        status, headers, body = 0, {}, b""
        for e in self.events:
            if isinstance(e, ResponseReceived) and e.stream_id == sid:
                headers = dict(e.headers)  # type: ignore[arg-type]
                status = int(headers[b":status"])
            elif isinstance(e, DataReceived) and e.stream_id == sid:
                body += e.data
                self.conn.acknowledge_received_data(e.flow_controlled_length, sid)
        self.flush()
        return status, headers, body

    def _parse(self, data: bytes) -> None:
        """Split what the server sent into frames by hand (independent of our state machine)."""
        buf = self._buf + data
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            self.frames.append((buf[3], buf[4], sid, buf[9 : 9 + length]))
            buf = buf[9 + length :]
        self._buf = buf

    def goaway_code(self) -> int | None:
        """The error code of the server's GOAWAY frame, if one came (read off the wire)."""
        for ftype, _, _, payload in self.frames:
            if ftype == GOAWAY:
                return int.from_bytes(payload[4:8], "big")
        return None

    def rst_codes(self) -> dict[int, int]:
        """RST_STREAM frames the server sent: stream -> error code."""
        return {sid: int.from_bytes(p[:4], "big") for ftype, _, sid, p in self.frames if ftype == RST_STREAM}

    async def closes(self, timeout: float = 10.0) -> None:
        """Read until the server closes the connection."""
        await self.pump(lambda c: False, timeout)

    def goaway(self) -> ConnectionTerminated | None:
        """The server's GOAWAY, if one came."""
        for e in self.events:
            if isinstance(e, ConnectionTerminated):
                return e
        return None

    def close(self) -> None:
        self.writer.close()
