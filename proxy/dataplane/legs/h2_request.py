"""Client leg (HTTP/2), the request rules: one stream's header list becomes the same
:class:`~proxy.dataplane.request.Request` an HTTP/1.1 request head becomes, so routing, forwarding
and recording never learn which protocol the client spoke.

Pseudo-headers map as documented (README, "HTTP/2"): `:method` is the method, `:path` the target,
`:authority` the Host (routing, vhosts, X-Forwarded-Host, the Host sent upstream); `:scheme` is
checked by the protocol library and otherwise ignored (X-Forwarded-Proto follows the listener, as
for HTTP/1.1). Every other field, gRPC metadata included, is an ordinary header for match rules.
Pure functions; they raise :class:`~proxy.dataplane.legs.http1_request.Reject`.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack import NeverIndexedHeaderTuple

from proxy.dataplane.legs.http1_request import Reject, add_header, validate
from proxy.dataplane.request import Request

Header = tuple[bytes, bytes]


def build(
    req: Request,
    headers: Iterable[Header],
    ended: bool,
    via: bytes,
    route_headers: frozenset[bytes],
) -> None:
    """Fill `req` from a stream's decoded header list (`ended`: END_STREAM came with it).

    The limits of `limits` apply as for HTTP/1.1: more than `max_headers` fields or more than
    `max_header_size` bytes (name + value + 4 per field, pseudo-headers included) is 431; a
    `:path` longer than `max_url_length` is 414."""
    limits = req.snapshot.config.limits
    max_headers = limits.max_headers
    max_size = limits.max_header_size
    method = path = authority = None
    cookies: list[bytes] = []
    plain: list[Header] = []
    for name, value in headers:
        req.nheaders += 1
        req.hsize += len(name) + len(value) + 4
        if req.nheaders > max_headers or req.hsize > max_size:
            raise Reject(431)
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue  # :scheme (checked by the protocol library); nothing else is accepted there
        if name == b"cookie":
            cookies.append(value)  # RFC 9113 8.2.3: crumbs are joined into one field
            continue
        plain.append((name, value))
    if method is None or path is None:
        raise Reject(400)
    req.method = method
    req.target = path
    if len(path) > limits.max_url_length:
        raise Reject(414)
    for name, value in plain:
        if name == b"content-length" and not value.isdigit():
            raise Reject(400)
        add_header(req, name, value, route_headers)
    if cookies:
        add_header(req, b"cookie", b"; ".join(cookies), route_headers)
    if authority is not None:
        if req.host is None:
            req.host = authority
            req.lines.insert(0, b"Host: " + authority + b"\r\n")  # HTTP/1.1 upstream: Host is mandatory
        elif req.host.lower() != authority.lower():
            raise Reject(400)  # RFC 9113 8.3.1: a Host naming another entity is malformed
    if req.te is not None:
        raise Reject(400)  # transfer-encoding is connection-specific (the library refuses it too)
    if not ended and req.clen < 0:
        # A body of unknown length: chunked towards the HTTP/1.1 upstream (its trailers relayed).
        req.te = b"chunked"
    elif ended and req.clen > 0:
        raise Reject(400)  # a Content-Length with no body to follow
    validate(req, via)


def trailer_lines(headers: Iterable[Header]) -> list[bytes]:
    """Request trailers (a HEADERS frame after the body) as HTTP/1.1 trailer lines; passed on
    only when the upstream request is chunked (see :func:`build`), like HTTP/1.1 trailers."""
    lines = []
    for name, value in headers:
        if name[:1] != b":" and name not in _NOT_IN_TRAILERS:
            lines.append(name + b": " + value + b"\r\n")
    return lines


# Fields a trailer must not carry (RFC 9110 6.5.1): framing, routing, our own.
_NOT_IN_TRAILERS = frozenset(
    {
        b"content-length",
        b"host",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"connection",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"via",
        b"x-request-id",
    }
)


def response_fields(lines: list[bytes]) -> list[Header]:
    """HTTP/1.1 response header lines (`Name: value\\r\\n`, hop-by-hop ones already removed by the
    upstream leg) as HTTP/2 fields: lower-case names (RFC 9113 8.2.1)."""
    fields = []
    for line in lines:
        i = line.find(b":")
        if i <= 0:
            continue
        name = line[:i].lower()
        if name in _CONNECTION_SPECIFIC:
            continue
        value = line[i + 1 : -2].strip()
        fields.append(NeverIndexedHeaderTuple(name, value) if name in NEVER_INDEXED else (name, value))
    return fields


# Values that differ on every response: kept out of the HPACK dynamic table (they would only push
# the reusable fields out of it); cookies are never indexed anyway (RFC 7541 7.1.3).
NEVER_INDEXED = frozenset({b"x-request-id", b"set-cookie", b"etag"})


# RFC 9113 8.2.2: never in an HTTP/2 message.
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)
