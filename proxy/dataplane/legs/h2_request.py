"""Client leg (HTTP/2), the request rules: one stream's header list becomes the same
:class:`~proxy.dataplane.request.Request` an HTTP/1.1 request head becomes, so routing, forwarding
and recording never learn which protocol the client spoke.

Pseudo-headers map as documented (README, "HTTP/2"): `:method` is the method, `:path` the target,
`:authority` the Host (routing, vhosts, X-Forwarded-Host, the Host sent upstream); `:scheme` is
checked by the protocol library and otherwise ignored (X-Forwarded-Proto follows the listener, as
for HTTP/1.1). Every other field, gRPC metadata included, is an ordinary header for match rules.
Pure functions; they raise :class:`~proxy.dataplane.legs.http1_request.Reject` (an answer on the
stream) or :class:`Malformed` (GOAWAY PROTOCOL_ERROR).

The protocol library's own inbound header validation is switched off (it costs a chain of seven
generators per field); :func:`check_request` and :func:`check_trailers` keep every rule it applied
(RFC 9113 8.2, 8.3) in one pass.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack import NeverIndexedHeaderTuple

from proxy.dataplane.legs.http1_request import Reject, add_header, validate
from proxy.dataplane.request import Request

Header = tuple[bytes, bytes]


class Malformed(Exception):
    """A header list HTTP/2 forbids (RFC 9113 8.2, 8.3): a connection error, GOAWAY PROTOCOL_ERROR."""


# The bytes a regular field name may hold (RFC 9113 8.2.1): visible ASCII without upper case or ':'.
_NAME_BYTES = bytes(c for c in range(0x21, 0x7F) if not 0x41 <= c <= 0x5A and c != 0x3A)
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
# RFC 9113 8.2.2 (`te` is allowed with the value `trailers` only).
_CONNECTION_FIELDS = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"})


def _check_field(name: bytes, value: bytes) -> None:
    """One regular field: name characters, connection-specific fields, value characters."""
    if not name or name.translate(None, _NAME_BYTES):
        raise Malformed(f"invalid field name {name!r}")
    if name in _CONNECTION_FIELDS:
        raise Malformed(f"connection-specific field {name!r}")
    if name == b"te" and value.lower() != b"trailers":
        raise Malformed(f"te: {value!r}")
    _check_value(value)


def _check_value(value: bytes) -> None:
    """No NUL, CR or LF anywhere; no space or tab at either end (RFC 9113 8.2.1)."""
    if value and (
        b"\r" in value or b"\n" in value or b"\0" in value or value[0] in (0x20, 0x09) or value[-1] in (0x20, 0x09)
    ):
        raise Malformed(f"invalid field value {value!r}")


def check_request(headers: list[Header]) -> None:
    """Raise :class:`Malformed` for a request header list RFC 9113 forbids: pseudo-headers that are
    unknown, duplicated, after a regular field, missing (:method; :scheme and :path unless CONNECT)
    or an empty :path; invalid names or values; connection-specific fields; :authority and Host
    both present but different, or Host twice."""
    seen: set[bytes] = set()
    regular = False
    method: bytes | None = None
    authority: bytes | None = None
    host: bytes | None = None
    for name, value in headers:
        if name[:1] == b":":
            if regular or name in seen or name not in _REQUEST_PSEUDO:
                raise Malformed(f"pseudo-header {name!r} unknown, repeated or out of place")
            seen.add(name)
            _check_value(value)
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value:
                raise Malformed("empty :path")
            continue
        regular = True
        _check_field(name, value)
        if name == b"host":
            if host is not None:
                raise Malformed("Host twice")
            host = value
    if method is None:
        raise Malformed("no :method")
    if method == b"CONNECT" and b":protocol" not in seen:
        if b":scheme" in seen or b":path" in seen:
            raise Malformed("CONNECT with :scheme or :path")
    elif b":scheme" not in seen or b":path" not in seen:
        raise Malformed("no :scheme or :path")
    elif method != b"CONNECT" and b":protocol" in seen:
        raise Malformed(":protocol without CONNECT")
    if authority is None and host is None:
        raise Malformed("neither :authority nor Host")
    if authority is not None and host is not None and authority != host:
        raise Malformed(":authority and Host differ")


def check_trailers(headers: list[Header]) -> None:
    """Raise :class:`Malformed` for trailers RFC 9113 forbids: any pseudo-header, an invalid name or
    value, a connection-specific field."""
    for name, value in headers:
        if name[:1] == b":":
            raise Malformed(f"pseudo-header {name!r} in trailers")
        _check_field(name, value)


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
    nheaders = hsize = 0
    for name, value in headers:
        if name == b"cookie":
            cookies.append(value)  # RFC 9113 8.2.3: crumbs are joined into one field (counted below)
            continue
        nheaders += 1
        hsize += len(name) + len(value) + 4
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue  # :scheme (checked by check_request); nothing else is accepted there
        plain.append((name, value))
    cookie = b"; ".join(cookies) if cookies else None
    if cookie is not None:  # the joined field counts once
        nheaders += 1
        hsize += len(cookie) + 10
    req.nheaders += nheaders
    req.hsize += hsize
    if req.nheaders > max_headers or req.hsize > max_size:
        raise Reject(431)
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
    if cookie is not None:
        add_header(req, b"cookie", cookie, route_headers)
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
    cookies = []
    for name, value in headers:
        if name == b"cookie":
            cookies.append(value)  # joined, last (RFC 9113 8.2.3)
        elif name[:1] != b":" and name not in _NOT_IN_TRAILERS:
            lines.append(name + b": " + value + b"\r\n")
    if cookies:
        lines.append(b"cookie: " + b"; ".join(cookies) + b"\r\n")
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
