"""Pure forwarding rules: a parsed request -> the head sent upstream (RFC 9110 7.6, RFC 7239 style).

Hop-by-hop headers and every header named in Connection are dropped (they were sorted out while
parsing: `Request.lines` holds what passes through); the framing is re-stated; `X-Forwarded-For`
is appended to, `X-Forwarded-Proto` / `-Host` are kept only from trusted proxies; `Via` and
`X-Request-Id` are added. No sockets, no clocks, no state: unit-tested in tests/unit.
"""

from __future__ import annotations

import ipaddress

from proxy.dataplane.legs import http1_headers as H
from proxy.dataplane.request import Request

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_trusted(peer: bytes, trusted: tuple[IpNetwork, ...]) -> bool:
    """Whether the peer address is one of the `trusted_proxies`."""
    if not trusted:
        return False
    try:
        addr = ipaddress.ip_address(peer.decode())
    except ValueError:
        return False
    return any(addr in net for net in trusted)


def client_address(xff: bytes, trusted: tuple[IpNetwork, ...], peer: bytes) -> bytes:
    """The client a trusted peer speaks for: the right-most X-Forwarded-For entry that is not a
    trusted proxy. A malformed entry stops the walk at the last hop we could vouch for, so the
    access log never carries text a client made up."""
    found = peer
    for entry in reversed(xff.split(b",")):
        try:
            addr = ipaddress.ip_address(entry.strip().decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return found
        found = str(addr).encode()
        if not any(addr in net for net in trusted):
            return found
    return found


def forwarded_upgrade(req: Request) -> bytes | None:
    """The Upgrade value passed on: only when the client's Connection header names `upgrade`, and
    without `h2c` (we speak HTTP/1.1 upstream); None when nothing is left."""
    tokens = req.conn_tokens
    if req.upgrade is not None and tokens and b"upgrade" in tokens:
        return H.without_h2c(req.upgrade) or None
    return None


def upstream_head(
    req: Request, peer: bytes, trusted_peer: bool, default_host: bytes | None, via: bytes, scheme: bytes = b"http"
) -> bytes:
    """The request head for the upstream, in one allocation. `req.reqid` must be set, and
    `req.upgrade` already reduced by :func:`forwarded_upgrade`. `default_host` is sent as Host when
    the client sent none (HTTP/1.0): we speak HTTP/1.1 upstream, where Host is mandatory. `via` is
    the Via line to add (b"" when `via:` is switched off). `scheme`: the listener's (X-Forwarded-Proto)."""
    lines = req.lines
    tokens = req.conn_tokens
    if tokens:
        lines = H.without_named(lines, tokens, H.REQUEST_KEEP)
    upgrade = b"Connection: upgrade\r\nUpgrade: " + req.upgrade + b"\r\n" if req.upgrade is not None else b""
    if req.host is None and default_host is not None:
        lines = [b"Host: " + default_host + b"\r\n", *lines]
    xff = peer if req.xff is None else req.xff + b", " + peer
    proto = req.xfproto if trusted_peer and req.xfproto else scheme
    fhost = req.xfhost if trusted_peer and req.xfhost else req.host
    if req.te is not None:
        framing = b"Transfer-Encoding: chunked\r\n"
        if req.trailer is not None:  # its trailers are relayed: the upstream leg is chunked too
            framing += b"Trailer: " + req.trailer + b"\r\n"
    elif req.clen >= 0:
        framing = b"Content-Length: %d\r\n" % req.clen
    else:
        framing = b""
    reqid = req.reqid if req.reqid is not None else b""
    # One join: a single allocation, no format string to parse.
    return b"".join(
        [
            req.method,
            b" ",
            req.target,
            b" HTTP/1.1\r\n",
            *lines,
            framing,
            upgrade,
            b"X-Forwarded-For: ",
            xff,
            b"\r\nX-Forwarded-Proto: ",
            proto,
            b"\r\n",
            b"X-Forwarded-Host: " + fhost + b"\r\n" if fhost else b"",
            via,
            b"X-Request-Id: ",
            reqid,
            b"\r\n\r\n",
        ]
    )
