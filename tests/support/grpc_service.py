"""A tiny gRPC service on a real grpcio server, with generic handlers and bytes messages (no protoc,
no generated code), plus the HTTP/1.1 form of a gRPC call for clients that cannot speak HTTP/2.

Service `echo.Echo`:
  Say(bytes) -> b"<name>:" + request                       (unary)
  Many(bytes) -> three messages b"<name>:<i>"              (server streaming)
  Slow(bytes) -> sleeps until the call's deadline or 10 s  (for deadlines)
Every handler records the invocation metadata it saw. `fail` makes every call end UNAVAILABLE.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc


class EchoServer:
    """A grpcio server (cleartext HTTP/2) on 127.0.0.1, started in its own threads."""

    def __init__(self, name: str, fail: bool = False, cert: tuple[bytes, bytes] | None = None) -> None:
        self.name = name
        self.fail = fail
        self.calls = 0
        self.metadata: list[dict[str, str]] = []
        self.slow_ended: list[float] = []  # monotonic times Slow calls stopped waiting
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        handlers = {
            "Say": grpc.unary_unary_rpc_method_handler(self._say),
            "Many": grpc.unary_stream_rpc_method_handler(self._many),
            "Slow": grpc.unary_unary_rpc_method_handler(self._slow),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", handlers),))
        if cert is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:  # (key PEM, certificate chain PEM): TLS with ALPN h2
            self.port = self.server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([cert]))
        self.server.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _seen(self, context: Any) -> None:
        with self._lock:
            self.calls += 1
            self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        if self.fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is down")

    def _say(self, request: bytes, context: Any) -> bytes:
        self._seen(context)
        return self.name.encode() + b":" + request

    def _many(self, request: bytes, context: Any) -> Iterator[bytes]:
        self._seen(context)
        for i in range(3):
            yield b"%s:%d" % (self.name.encode(), i)

    def _slow(self, request: bytes, context: Any) -> bytes:
        self._seen(context)
        end = time.monotonic() + 10
        while context.is_active() and time.monotonic() < end:
            time.sleep(0.02)
        self.slow_ended.append(time.monotonic())
        return b"late"

    def stop(self) -> None:
        self.server.stop(grace=None)


def frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def unframe(body: bytes) -> list[bytes]:
    """The messages of a gRPC body."""
    out = []
    while body:
        size = struct.unpack(">I", body[1:5])[0]
        out.append(body[5 : 5 + size])
        body = body[5 + size :]
    return out


def http1_call(method: str, message: bytes, metadata: dict[str, str] | None = None) -> bytes:
    """A gRPC call as an HTTP/1.1 request (what gRPC-web-ish clients and HTTP/1.1 tooling send)."""
    body = frame(message)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (metadata or {}).items())
    head = (
        f"POST /echo.Echo/{method} HTTP/1.1\r\nHost: svc\r\nContent-Type: application/grpc\r\nTE: trailers\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body
