"""The seams of an HTTP/2 upstream stream: its connection as the stream sees it, and the stream
dressed as a transport for the client leg's backpressure.

The client leg pauses and resumes its upstream's transport when its own write buffer fills and
drains. For an HTTP/2 stream that must not stop the shared connection: pausing a stream stops
acknowledging its DATA (the flow-control window then stops the server), resuming acknowledges
what was held back. Nothing is written through this object: the stream writes frames itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import h2.connection
import h2.events
import h2.exceptions
from h2.events import Event
from hyperframe.frame import Frame, GoAwayFrame

from proxy.dataplane.context import PlaneContext

# What h2 raises for a stream that was reset or closed meanwhile (nothing left to do for it).
ERRORS: tuple[type[Exception], ...] = (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError, KeyError)


class StreamTransport(asyncio.Transport):
    """The transport face of one stream: pause/resume reading and the connection's buffer size."""

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None], size: Callable[[], int]) -> None:
        super().__init__()
        self._pause = pause
        self._resume = resume
        self._size = size
        self.closing = False

    def pause_reading(self) -> None:
        self._pause()

    def resume_reading(self) -> None:
        self._resume()

    def is_reading(self) -> bool:
        return not self.closing

    def get_write_buffer_size(self) -> int:
        return self._size()

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        raise RuntimeError("an HTTP/2 stream is written frame by frame by its leg")

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


class StreamHost(Protocol):
    """What a stream uses of its connection (:class:`.h2_upstream.H2Upstream`)."""

    h2: ClientH2
    ctx: PlaneContext
    scheme: bytes
    goaway: bool
    transport: asyncio.Transport | None

    def opened(self, sid: int, stream: Any) -> None: ...

    def forget_stream(self, sid: int) -> None: ...

    def stream_done(self) -> None: ...

    def ack(self, size: int, sid: int) -> None: ...

    def want_flush(self) -> None: ...

    def buffer_size(self) -> int: ...


class ClientH2(h2.connection.H2Connection):
    """h2's connection, except that a GOAWAY received leaves it open for the streams the server still
    completes (RFC 9113 6.8): h2 closes its state machine at once (python-hyper/h2#1181), and a PING
    or the answers arriving after the GOAWAY (gRPC servers send both) would be protocol errors.
    No new stream is opened after it: the leg stops using the connection (`goaway`)."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        machine = self.state_machine
        before = machine.state
        events = machine.process_input(h2.connection.ConnectionInputs.RECV_GOAWAY)
        if before != h2.connection.ConnectionState.CLOSED:
            machine.state = before
        ended = h2.events.ConnectionTerminated()
        ended.error_code = frame.error_code
        ended.last_stream_id = frame.last_stream_id
        ended.additional_data = frame.additional_data or None
        return [], [*events, ended]
