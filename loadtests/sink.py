"""Upload sink: an HTTP/1.1 server that reads each request body to the end, discards it, and only then
answers ``{"received": N}``. Run as ``python -m loadtests.sink PORT``.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import httptools


class SinkProtocol(asyncio.Protocol):
    """Counts body bytes (Content-Length or chunked, httptools decodes both) and never stores them."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.received = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.received = 0

    def on_body(self, body: bytes) -> None:
        self.received += len(body)

    def on_message_complete(self) -> None:
        payload = b'{"received": %d}\n' % self.received
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(payload)
        keep = self.parser.should_keep_alive()
        head += b"\r\n" if keep else b"Connection: close\r\n\r\n"
        if self.transport is not None:
            self.transport.write(head + payload)
            if not keep:
                self.transport.close()


async def serve(port: int) -> None:
    """Listen on 127.0.0.1:``port`` until killed."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkProtocol, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    port = int(sys.argv[1])
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(port))
    else:
        uvloop.run(serve(port))


if __name__ == "__main__":
    main()
