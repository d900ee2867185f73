"""Header rules shared by both legs: hop-by-hop sets, our own headers, canned error responses."""

from __future__ import annotations

import hashlib
import re
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Final

VIA_TOKEN: Final = b"canary-proxy"  # the default pseudonym's prefix (config `via:`)
VIA_LINE: Final = b"Via: 1.1 canary-proxy\r\n"

# Request header names the client leg treats specially (lower-cased) -> kind code.
H_PLAIN: Final = 0
H_HOP: Final = 1  # dropped: RFC 9110 7.6.1 hop-by-hop
H_CONNECTION: Final = 2
H_TE: Final = 3  # Transfer-Encoding
H_CL: Final = 4
H_HOST: Final = 5
H_XFF: Final = 6
H_XFPROTO: Final = 7
H_XFHOST: Final = 8
H_VIA: Final = 9
H_REQID: Final = 10
H_EXPECT: Final = 11
H_UPGRADE: Final = 12
H_TRAILER: Final = 14  # forwarded only when the body is chunked on both legs (trailers relayed)

REQUEST_SPECIAL: Final[dict[bytes, int]] = {
    b"connection": H_CONNECTION,
    b"keep-alive": H_HOP,
    b"proxy-connection": H_HOP,
    b"te": H_HOP,
    b"trailer": H_TRAILER,
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
    b"http2-settings": H_HOP,  # only meaningful with `Upgrade: h2c`, which we never forward
}

# `Transfer_Encoding`, `X_Forwarded_For`, ...: CGI-style servers (WSGI, PHP) map `_` and `-` alike, so
# an underscore alias of a special header could override ours upstream. Framing aliases are
# refused (a smuggling attempt); the others are dropped, as nginx does by default.
H_BAD: Final = 13
UNDERSCORE_ALIASES: Final[dict[bytes, int]] = {
    name.replace(b"-", b"_"): H_BAD if kind in (H_TE, H_CL) else H_HOP
    for name, kind in REQUEST_SPECIAL.items()
    if b"-" in name
}

# `HTTP/1.1 200 ` for every status a response may carry (the reason phrase is the upstream's).
STATUS_PREFIX: Final[dict[int, bytes]] = {code: b"HTTP/1.1 %d " % code for code in range(100, 600)}

# Larger than any real body, and past what int64 or float-based upstreams parse exactly.
MAX_CONTENT_LENGTH: Final = 1 << 53

# Response header names the upstream leg treats specially: the request's hop-by-hop and framing
# names, with the same kind codes; routing and forwarding names are plain in a response.
_RESPONSE_KINDS = frozenset({H_HOP, H_CONNECTION, H_TE, H_CL, H_UPGRADE, H_REQID, H_TRAILER})
RESPONSE_SPECIAL: Final[dict[bytes, int]] = {
    name: kind
    for name, kind in REQUEST_SPECIAL.items()
    if kind in _RESPONSE_KINDS and name != b"http2-settings"  # a request-only header
}


def _spellings(name: bytes) -> tuple[bytes, ...]:
    """How a lower-case header name is usually written: as is, Title-Case, and upper case."""
    title = b"-".join([part.capitalize() for part in name.split(b"-")])
    return tuple(dict.fromkeys((name, title, name.upper())))


# Common header names as sent, mapped to what the lower-casing lookups above would find: most
# headers then cost one dict lookup and no `lower()`. Names not listed take the general path.
_COMMON_REQUEST = (
    b"user-agent", b"accept", b"accept-encoding", b"accept-language", b"cookie", b"referer", b"origin",
    b"authorization", b"cache-control", b"content-type", b"if-none-match", b"if-modified-since", b"pragma",
    b"priority", b"dnt", b"range", b"x-user-id", b"x-canary", b"sec-fetch-site", b"sec-fetch-mode",
    b"sec-fetch-dest", b"sec-fetch-user", b"upgrade-insecure-requests", b"x-requested-with",
)  # fmt: skip
_COMMON_RESPONSE = (
    b"server", b"date", b"content-type", b"cache-control", b"etag", b"last-modified", b"vary", b"set-cookie",
    b"expires", b"accept-ranges", b"location", b"content-encoding", b"age", b"access-control-allow-origin",
    b"strict-transport-security", b"x-content-type-options", b"x-frame-options", b"content-security-policy",
)  # fmt: skip

REQUEST_EXACT: Final[dict[bytes, tuple[int, bytes]]] = {
    spelled: (kind, lname)
    for lname, kind in [*[(n, H_PLAIN) for n in _COMMON_REQUEST], *REQUEST_SPECIAL.items()]
    for spelled in _spellings(lname)
}
RESPONSE_EXACT: Final[dict[bytes, int]] = {
    spelled: kind
    for lname, kind in [*[(n, H_PLAIN) for n in _COMMON_RESPONSE], *RESPONSE_SPECIAL.items()]
    for spelled in _spellings(lname)
}

# Headers a client can never remove by naming them in Connection: we rebuild them ourselves.
PROTECTED: Final = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via", b"x-request-id", b"host"}
)
# Connection tokens that are options, not the names of headers to drop.
CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})
# What a client's Connection header can never remove from the request we send.
REQUEST_KEEP: Final = CONNECTION_OPTIONS | PROTECTED

IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


# RFC 9112 3.2 / RFC 3986 3.2.2: uri-host [":" port]; an IP literal in brackets or a reg-name
# (unreserved, pct-encoded, sub-delims). Userinfo (`@`), paths and spaces are refused.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")


def valid_host(host: bytes) -> bool:
    """Whether a Host header value is `uri-host [":" port]`."""
    return _HOST.fullmatch(host) is not None


def without_h2c(upgrade: bytes) -> bytes:
    """The Upgrade value without `h2c` (HTTP/2 over cleartext needs the proxy itself to speak
    HTTP/2; forwarding it would let the upstream switch protocols under us). b"": nothing left."""
    if b"h2c" not in upgrade.lower():
        return upgrade
    kept = [p.strip() for p in upgrade.split(b",") if p.strip() and p.strip().lower() != b"h2c"]
    return b", ".join(kept)


def connection_tokens(value: bytes) -> list[bytes]:
    """Lower-cased tokens of a Connection header value."""
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def without_named(lines: list[bytes], tokens: list[bytes] | None, keep: frozenset[bytes]) -> list[bytes]:
    """Header `lines` minus those a Connection header's `tokens` name (RFC 9110 7.6.1); names in
    `keep` (options such as `close`, or headers we rebuild ourselves) are never dropped."""
    if not tokens or (len(tokens) == 1 and tokens[0] in keep):
        return lines  # nearly always: no Connection header, or just keep-alive / close
    drop = {t for t in tokens if t not in keep}
    if not drop:
        return lines
    return [ln for ln in lines if ln.split(b":", 1)[0].strip().lower() not in drop]


_date: list[object] = [0, b""]


def http_date() -> bytes:
    """`Date` value for now (RFC 9110 5.6.7), formatted once per second."""
    now = int(time.time())
    if _date[0] != now:
        _date[0] = now
        _date[1] = formatdate(now, usegmt=True).encode("ascii")
    value = _date[1]
    assert isinstance(value, bytes)
    return value


def default_pseudonym(hostname: str, listen: str) -> bytes:
    """`canary-proxy-` and a short hash of the host name and the bound listen address: the same
    for every worker of one instance and across restarts, different for two instances in a row
    (an edge in front of a sidecar), so their Via loop detection does not take each other for a loop."""
    digest = hashlib.blake2s(f"{hostname} {listen}".encode(), digest_size=3).hexdigest()
    return VIA_TOKEN + b"-" + digest.encode("ascii")


def via_line(pseudonym: bytes, version10: bool = False) -> bytes:
    """The `Via` line we add (empty when Via is switched off)."""
    if not pseudonym:
        return b""
    return b"Via: %s %s\r\n" % (b"1.0" if version10 else b"1.1", pseudonym)


def error_response(
    status: int, close: bool = True, request_id: bytes | None = None, via: bytes = VIA_LINE, head_only: bool = False
) -> bytes:
    """A small plain-text response for errors the proxy itself answers: with `Date`, our `Via`
    line (`via`) and the request's `X-Request-Id`, so an operator can find its log line."""
    phrase = HTTPStatus(status).phrase.encode()
    body = b"%d %s\n" % (status, phrase)
    head = b"".join(
        [
            b"HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            % (status, phrase, http_date(), len(body)),
            via,
            b"X-Request-Id: " + request_id + b"\r\n" if request_id is not None else b"",
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
        ]
    )
    return head if head_only else head + body


def error_body_size(status: int) -> int:
    """Length of the body :func:`error_response` sends for `status` (for the access log)."""
    return len(b"%d %s\n" % (status, HTTPStatus(status).phrase.encode()))


def head_error_response(status: int, close: bool = True) -> bytes:
    """The error response without its body (for HEAD requests)."""
    return error_response(status, close, head_only=True)
