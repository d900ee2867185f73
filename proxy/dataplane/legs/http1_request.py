"""Client leg, the request rules (HTTP/1.1): how each request header is sorted and what a request
head must satisfy before anything of it is forwarded (RFC 9112 framing, smuggling vectors, loops).
Pure functions of the request being parsed; they raise :class:`Reject` with the status to answer.
"""

from __future__ import annotations

from proxy.dataplane.legs import http1_headers as H
from proxy.dataplane.request import Request


class Reject(Exception):
    """Raised from a parser callback to stop parsing and answer `status`."""

    def __init__(self, status: int) -> None:
        self.status = status


def add_header(req: Request, name: bytes, value: bytes, route_headers: frozenset[bytes]) -> None:
    """Sort one request header: ours to rebuild (framing, forwarding, Via, request id), hop-by-hop
    (dropped), needed for routing (kept aside too), or passed through. Raises :class:`Reject`."""
    known = H.REQUEST_EXACT.get(name)
    if known is not None:
        kind, lname = known
    else:
        lname = name.lower()
        kind = H.REQUEST_SPECIAL.get(lname, H.H_PLAIN)
    if lname in route_headers:
        old = req.rhdrs.get(lname)
        # Repeats are joined like one list-valued header; cookie pairs are `;`-separated.
        req.rhdrs[lname] = value if old is None else old + (b"; " if lname == b"cookie" else b", ") + value
    if kind == H.H_PLAIN:
        if known is None and b"_" in lname:
            alias = H.UNDERSCORE_ALIASES.get(lname.replace(b"-", b"_"))
            if alias == H.H_BAD:
                raise Reject(400)
            if alias is not None:
                return  # an alias of a header we set or drop ourselves
        req.lines.append(name + b": " + value + b"\r\n")
    elif kind == H.H_CL:
        req.clen = int(value)
        if req.clen > H.MAX_CONTENT_LENGTH:
            raise Reject(413)
    elif kind == H.H_HOST:
        if req.host is not None:
            raise Reject(400)
        req.host = value
        req.lines.append(name + b": " + value + b"\r\n")
    elif kind == H.H_TE:
        if req.te is not None:
            raise Reject(400)
        req.te = value
    elif kind == H.H_CONNECTION:
        req.conn_tokens = (req.conn_tokens or []) + H.connection_tokens(value)
    elif kind == H.H_XFF:
        req.xff = value if req.xff is None else req.xff + b", " + value
    elif kind == H.H_XFPROTO:
        req.xfproto = value
    elif kind == H.H_XFHOST:
        req.xfhost = value
    elif kind == H.H_VIA:
        req.via = value if req.via is None else req.via + b", " + value
        req.lines.append(name + b": " + value + b"\r\n")
    elif kind == H.H_REQID:
        req.reqid = value
    elif kind == H.H_EXPECT:
        if value.strip().lower() != b"100-continue":
            raise Reject(417)
        req.expect = True
        req.lines.append(name + b": " + value + b"\r\n")
    elif kind == H.H_UPGRADE:
        req.upgrade = value
        req.wants_upgrade = True
    elif kind == H.H_TRAILER:
        req.trailer = value if req.trailer is None else req.trailer + b", " + value
    # H_HOP: dropped


def add_trailer(req: Request, name: bytes, value: bytes) -> None:
    """A trailer field after a chunked body: relayed (the upstream leg is chunked too), except
    the fields a trailer must not carry (framing, routing, our own headers; RFC 9110 6.5.1)."""
    if name.lower() in H.REQUEST_SPECIAL:
        return
    if req.trailers is None:
        req.trailers = []
    req.trailers.append(name + b": " + value + b"\r\n")


def validate(req: Request, via: bytes) -> None:
    """Refuse what must never be forwarded (RFC 9112 framing, smuggling vectors, loops)."""
    if req.method == b"CONNECT":
        raise Reject(405)
    # Only a lone `chunked` coding is accepted; HTTP/1.0 cannot use chunked at all.
    if req.te is not None and (req.version10 or req.te.strip().lower() != b"chunked"):
        raise Reject(400 if req.version10 else 501)
    if req.host is None:
        if not req.version10:
            raise Reject(400)
    elif not H.valid_host(req.host):
        raise Reject(400)  # RFC 9112 3.2: Host is uri-host [":" port]; `evil.com:80@x` is not
    target = req.target
    if target[:1] != b"/":
        if target == b"*" and req.method == b"OPTIONS":
            req.path = b"*"
            return
        lower = target[:8].lower()
        if not (lower.startswith(b"http://") or lower.startswith(b"https://")):
            raise Reject(400)
        # Absolute form never chooses the destination: its authority must equal Host.
        rest = target.split(b"://", 1)[1]
        slash = rest.find(b"/")
        authority = rest if slash < 0 else rest[:slash]
        if req.host is None or authority.lower() != req.host.lower():
            raise Reject(400)
        target = b"/" if slash < 0 else rest[slash:]
        req.target = target
    q = target.find(b"?")
    if q < 0:
        req.path = target
    else:
        req.path = target[:q]
        req.query = target[q + 1 :]
    token = via
    if req.via is not None and token and token in req.via:
        for entry in req.via.split(b","):
            parts = entry.split()
            if len(parts) >= 2 and parts[1] == token:
                raise Reject(508)


def last_chunk(req: Request) -> bytes:
    """The end of a chunked request body, with its trailers (we frame the upstream leg chunked too)."""
    trailers = req.trailers
    if not trailers:
        return b"0\r\n\r\n"
    return b"".join([b"0\r\n", *trailers, b"\r\n"])
