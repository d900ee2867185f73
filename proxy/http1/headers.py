"""Header rules shared by both legs: hop-by-hop sets, our own headers, canned error responses."""

from __future__ import annotations

from http import HTTPStatus

VIA_TOKEN = b"canary-proxy"
VIA_LINE = b"Via: 1.1 canary-proxy\r\n"

# Request header names the client leg treats specially (lower-cased) -> kind code.
H_PLAIN = 0
H_HOP = 1  # dropped: RFC 9110 7.6.1 hop-by-hop
H_CONNECTION = 2
H_TE = 3  # Transfer-Encoding
H_CL = 4
H_HOST = 5
H_XFF = 6
H_XFPROTO = 7
H_XFHOST = 8
H_VIA = 9
H_REQID = 10
H_EXPECT = 11
H_UPGRADE = 12

REQUEST_SPECIAL: dict[bytes, int] = {
    b"connection": H_CONNECTION,
    b"keep-alive": H_HOP,
    b"proxy-connection": H_HOP,
    b"te": H_HOP,
    b"trailer": H_HOP,
    b"proxy-authorization": H_HOP,
    b"proxy-authenticate": H_HOP,
    b"transfer-encoding": H_TE,
    b"content-length": H_CL,
    b"host": H_HOST,
    b"x-forwarded-for": H_XFF,
    b"x-forwarded-proto": H_XFPROTO,
    b"x-forwarded-host": H_XFHOST,
    b"via": H_VIA,
    b"x-request-id": H_REQID,
    b"expect": H_EXPECT,
    b"upgrade": H_UPGRADE,
}

# `Transfer_Encoding`, `X_Forwarded_For`, ...: CGI-style servers (WSGI, PHP) map `_` and `-` alike, so
# an underscore alias of a special header could override ours upstream. Framing aliases are
# refused (a smuggling attempt); the others are dropped, as nginx does by default.
H_BAD = 13
UNDERSCORE_ALIASES: dict[bytes, int] = {
    name.replace(b"-", b"_"): H_BAD if kind in (H_TE, H_CL) else H_HOP
    for name, kind in REQUEST_SPECIAL.items()
    if b"-" in name
}

# Larger than any real body, and past what int64 or float-based upstreams parse exactly.
MAX_CONTENT_LENGTH = 1 << 53

# Response header names the upstream leg treats specially.
R_HOP = 1
R_CONNECTION = 2
R_TE = 3
R_CL = 4
R_UPGRADE = 5
R_REQID = 6

RESPONSE_SPECIAL: dict[bytes, int] = {
    b"connection": R_CONNECTION,
    b"keep-alive": R_HOP,
    b"proxy-connection": R_HOP,
    b"te": R_HOP,
    b"trailer": R_HOP,
    b"proxy-authenticate": R_HOP,
    b"proxy-authorization": R_HOP,
    b"transfer-encoding": R_TE,
    b"content-length": R_CL,
    b"upgrade": R_UPGRADE,
    b"x-request-id": R_REQID,
}

# Headers a client can never remove by naming them in Connection: we rebuild them ourselves.
PROTECTED = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via", b"x-request-id", b"host"}
)
# Connection tokens that are options, not the names of headers to drop.
CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def connection_tokens(value: bytes) -> list[bytes]:
    """Lower-cased tokens of a Connection header value."""
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def is_token_list_with(value: bytes, token: bytes) -> bool:
    """True if the comma-separated header value names `token` (case-insensitive)."""
    return token in connection_tokens(value)


def _error_response(status: int, close: bool, extra: bytes = b"") -> bytes:
    phrase = HTTPStatus(status).phrase.encode()
    body = b"%d %s\n" % (status, phrase)
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n%s%s%s\r\n%s"
        % (status, phrase, len(body), VIA_LINE, extra, b"Connection: close\r\n" if close else b"", body)
    )


_CANNED: dict[tuple[int, bool], bytes] = {}


def error_response(status: int, close: bool = True, request_id: bytes | None = None) -> bytes:
    """A small plain-text response for errors the proxy itself answers."""
    if request_id is not None:
        return _error_response(status, close, b"X-Request-Id: " + request_id + b"\r\n")
    key = (status, close)
    resp = _CANNED.get(key)
    if resp is None:
        resp = _CANNED[key] = _error_response(status, close)
    return resp


def head_error_response(status: int, close: bool = True) -> bytes:
    """The error response without its body (for HEAD requests)."""
    full = error_response(status, close)
    return full[: full.index(b"\r\n\r\n") + 4]
