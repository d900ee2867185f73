"""Pure forwarding rules for an HTTP/2 upstream: a parsed request -> the header list of its HEADERS
frame (RFC 9113 8.3), from the same request state :func:`proxy.dataplane.forwarding.upstream_head`
uses for HTTP/1.1.

Pseudo-headers first (`:method`, `:scheme`, `:authority` from Host, `:path`), then the passed-on
fields with lower-case names. Connection-specific fields never appear (they were sorted out while
parsing; `host` becomes `:authority`), `te: trailers` is always sent (we relay trailers, and gRPC
servers expect it), the forwarding headers are added as for HTTP/1.1. No sockets, no state.
"""

from __future__ import annotations

from proxy.dataplane.legs import http1_headers as H
from proxy.dataplane.request import Request

Header = tuple[bytes, bytes]

# Fields RFC 9113 8.2.2 forbids in HTTP/2 (the parser already drops most of them), plus `host`.
_NOT_FORWARDED = frozenset(
    {b"host", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"trailer"}
)
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def split_line(line: bytes) -> Header:
    """`Name: value\\r\\n` (as the client leg stores passed-on fields) -> (b"name", b"value")."""
    colon = line.find(b":")
    return line[:colon].lower(), line[colon + 1 :].strip()


def grpc_timeout(value: bytes) -> float:
    """A `grpc-timeout` value (1-8 digits and a unit: H M S m u n) in seconds; 0.0 when invalid."""
    value = value.strip()
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _UNITS:
        return 0.0
    return int(digits) * _UNITS[unit]


def is_grpc(lines: list[bytes]) -> bool:
    """Whether a request with these passed-on fields is gRPC (`content-type: application/grpc*`)."""
    for line in lines:
        if line[:13].lower() == b"content-type:":
            return line[13:].strip().lower().startswith(b"application/grpc")
    return False


def request_headers(
    req: Request,
    peer: bytes,
    trusted_peer: bool,
    default_host: bytes,
    via: bytes,
    scheme: bytes = b"http",
    listener_scheme: bytes = b"http",
) -> tuple[list[Header], float]:
    """The upstream HEADERS for `req` and its grpc-timeout in seconds (0.0: none).

    `req.reqid` must be set. `peer` is the connection's address (appended to X-Forwarded-For),
    `trusted_peer` whether its X-Forwarded-Proto/-Host are believed, `default_host` the authority
    when the client sent no Host (HTTP/1.0), `via` the Via entry to add (b"" when off), `scheme`
    the upstream's (`http` or `https`, for `:scheme`), `listener_scheme` ours (X-Forwarded-Proto)."""
    authority = req.host if req.host is not None else default_host
    out: list[Header] = [
        (b":method", req.method),
        (b":scheme", scheme),
        (b":authority", authority),
        (b":path", req.target),
    ]
    named = frozenset(req.conn_tokens or ()) - H.REQUEST_KEEP
    timeout = 0.0
    for line in req.lines:
        name, value = split_line(line)
        if name in _NOT_FORWARDED or name in named:
            continue
        if name == b"grpc-timeout":
            timeout = grpc_timeout(value)
        out.append((name, value))
    if req.clen >= 0 and req.te is None:
        out.append((b"content-length", b"%d" % req.clen))
    out.append((b"te", b"trailers"))
    xff = peer if req.xff is None else req.xff + b", " + peer
    out.append((b"x-forwarded-for", xff))
    out.append((b"x-forwarded-proto", req.xfproto if trusted_peer and req.xfproto else listener_scheme))
    fhost = req.xfhost if trusted_peer and req.xfhost else req.host
    if fhost:
        out.append((b"x-forwarded-host", fhost))
    if via:
        out.append((b"via", via))  # after the client's own Via fields, as for HTTP/1.1
    out.append((b"x-request-id", req.reqid if req.reqid is not None else b""))
    return out, timeout


def trailer_fields(lines: list[bytes] | None) -> list[Header]:
    """A chunked request's trailer lines as HTTP/2 trailing fields (lower-case names)."""
    return [split_line(line) for line in lines or ()]
