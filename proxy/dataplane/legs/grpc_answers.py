"""The proxy's own error answers to gRPC requests, as gRPC clients expect them (as Envoy does).

A gRPC client reads the outcome from `grpc-status`, not from the HTTP status: an error the proxy
answers itself (no route, upstream unreachable, response deadline passed) goes out as HTTP 200 with
`content-type: application/grpc` and the gRPC status in the head (a "trailers-only" response),
mapped by :func:`proxy.config.grpc_codes.from_http_status`. Pure functions, for every client leg.
"""

from __future__ import annotations

from http import HTTPStatus

from proxy.config.grpc_codes import NAMES, from_http_status


def grpc_error_fields(status: int) -> list[tuple[bytes, bytes]]:
    """The gRPC fields of an error the proxy answers with HTTP `status` (lower-case names)."""
    code = from_http_status(status)
    message = f"canary-proxy: {status} {HTTPStatus(status).phrase} ({NAMES[code]})"
    return [
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % code),
        (b"grpc-message", message.replace(" ", "%20").encode("ascii")),
    ]


def grpc_error_response(status: int, close: bool, request_id: bytes | None, via: bytes) -> bytes:
    """The HTTP/1.1 form: 200, the gRPC fields in the head, an empty body (`via`: our Via line)."""
    lines = [b"%s: %s\r\n" % field for field in grpc_error_fields(status)]
    return b"".join(
        [
            b"HTTP/1.1 200 OK\r\n",
            *lines,
            b"Content-Length: 0\r\n",
            via,
            b"X-Request-Id: " + request_id + b"\r\n" if request_id is not None else b"",
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
        ]
    )
