"""Request smuggling and strict parsing, over real sockets, against an upstream that logs the exact
bytes it receives.

The mutation table draws on the public corpora: defparam/smuggler's Transfer-Encoding mutations
(prefix/suffix/mid bytes, folding, case, quoting, underscores), HTTP Garden's findings (bare CR/LF,
whitespace before the colon, NUL and control bytes, version tricks), nginx-tests body_chunked.t
(chunk size overflow, extensions, missing CRLF), HAProxy's h1 regtests (duplicate / list-valued
Content-Length) and aiohttp's CVE history (LF in chunk extensions, lax methods and versions).

Every case is sent pipelined right behind a clean request, then again on its own after a warm-up.
What must hold:

* a malformed request gets a 4xx (or 501/505) and the connection is closed;
* the upstream sees exactly the clean requests (parsed by llhttp from the raw bytes it got), no
  parse error, and never a byte of the attack (`/evil`, `/smuggled`);
* a request that is odd but legal (e.g. `CHUNKED`, chunk extensions, trailers) is forwarded as
  exactly one request, re-framed, and nothing more.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from conftest import LoggingUpstream, RawClient, config_text, wait_until

from proxy.control.app import ProxyApp

ProxyFactory = Callable[..., Awaitable[ProxyApp]]
LogFactory = Callable[[], Awaitable[LoggingUpstream]]

CLEAN = b"GET /clean-1 HTTP/1.1\r\nHost: h\r\n\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
POST = b"POST /evil HTTP/1.1\r\nHost: h\r\n"
TE = b"Transfer-Encoding: chunked\r\n"
CHUNKED_SMUGGLE = b"0\r\n\r\n" + SMUGGLED  # a chunked body that ends early, then a second request
HELLO = b"hello"  # an expected `bytes` outcome: legal, forwarded as one request with that body


def te_cl(te_line: bytes) -> bytes:
    """CL.TE / TE.CL: a Content-Length covering the smuggled request plus a TE variant."""
    body = CHUNKED_SMUGGLE
    return POST + b"Content-Length: %d\r\n" % len(body) + te_line + b"\r\n" + body


def te_only(te_line: bytes) -> bytes:
    """A TE variant alone: a front end that misses it would read the smuggled request as next."""
    return POST + te_line + b"\r\n" + CHUNKED_SMUGGLE


# smuggler.py's byte families (midspace, postspace, prespace, endspace, xprespace, ...), sampled over
# the bytes that matter: controls, separators, DEL and high bytes.
BYTES = [0x00, 0x01, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1F, 0x20, 0x7F, 0x80, 0x85, 0xA0, 0xFF]
FAMILIES = {
    "midspace": b"Transfer-Encoding:%cchunked\r\n",
    "postspace": b"Transfer-Encoding%c: chunked\r\n",
    "prespace": b"%cTransfer-Encoding: chunked\r\n",
    "endspace": b"Transfer-Encoding: chunked%c\r\n",
    "xprespace": b"X: X%cTransfer-Encoding: chunked\r\n",
    "endspacex": b"Transfer-Encoding: chunked%cX: X\r\n",
    "rxprespace": b"X: X\r%cTransfer-Encoding: chunked\r\n",
    "xnprespace": b"X: X%c\nTransfer-Encoding: chunked\r\n",
    "endspacerx": b"Transfer-Encoding: chunked\r%cX: X\r\n",
    "endspacexn": b"Transfer-Encoding: chunked%c\nX: X\r\n",
}
# Bytes that are legal optional whitespace in that position (RFC 9110 5.6.3: SP / HTAB), so the TE
# header is read as plain `chunked`: with a Content-Length as well that is still CL+TE (400).
OWS = {0x09, 0x20}

NAMED_TE: list[tuple[str, bytes]] = [
    ("leading-space", b"Transfer-Encoding:  chunked\r\n"),
    ("tab", b"Transfer-Encoding:\tchunked\r\n"),
    ("tab-before-colon", b"Transfer-Encoding\t:\tchunked\r\n"),
    ("space-before-colon", b"Transfer-Encoding : chunked\r\n"),
    ("vtab", b"Transfer-Encoding:\x0bchunked\r\n"),
    ("formfeed", b"Transfer-Encoding:\x0cchunked\r\n"),
    ("chunked-identity", b"Transfer-Encoding: chunked, identity\r\n"),
    ("identity-chunked", b"Transfer-Encoding: identity, chunked\r\n"),
    ("chunked-chunked", b"Transfer-Encoding: chunked, chunked\r\n"),
    ("cow-chunked", b"Transfer-Encoding: cow, chunked\r\n"),
    ("chunked-cow", b"Transfer-Encoding: chunked, cow\r\n"),
    ("nested", b"Transfer-Encoding: cow chunked bar\r\n"),
    ("uppercase", b"TRANSFER-ENCODING: CHUNKED\r\n"),
    ("multicase", b"TrAnSFer-EnCODinG: cHuNkeD\r\n"),
    ("obs-fold", b"Transfer-Encoding:\r\n chunked\r\n"),
    ("obs-fold-tab", b"Transfer-Encoding:\r\n\tchunked\r\n"),
    ("lf-fold", b"Transfer-Encoding:\n chunked\r\n"),
    ("name-fold", b"X: y\r\n Transfer-Encoding: chunked\r\n"),
    ("underscore", b"Transfer_Encoding: chunked\r\n"),
    ("space-in-name", b"Transfer Encoding: chunked\r\n"),
    ("smashed", b"Transfer Encoding:chunked\r\n"),
    ("quoted", b'Transfer-Encoding: "chunked"\r\n'),
    ("single-quoted", b"Transfer-Encoding: 'chunked'\r\n"),
    ("lazygrep", b"Transfer-Encoding: chunk\r\n"),
    ("chunky", b"Transfer-Encoding: chunky\r\n"),
    ("xchunked", b"Transfer-Encoding: xchunked\r\n"),
    ("identity", b"Transfer-Encoding: identity\r\n"),
    ("empty-te", b"Transfer-Encoding: \r\n"),
    ("double", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
    ("rev-dual", b"Transfer-Encoding: cow\r\nTransfer-Encoding: chunked\r\n"),
    ("dual-rev", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: cow\r\n"),
    ("0d-wrap", b"Foo: bar\r\n\rTransfer-Encoding: chunked\r\n"),
    ("0d-spam", b"Transfer\r-Encoding: chunked\r\n"),
    ("space-ff", b"Transfer-Encoding:\xffchunked\r\n"),
    ("unispace", b"Transfer-Encoding:\xa0chunked\r\n"),
    ("accent-te", b"Transf\x82r-Encoding: chunked\r\n"),
    ("accent-ch", b"Transfer-Encoding: ch\x96nked\r\n"),
    ("content-encoding", b"Content-Encoding: chunked\r\n"),
    ("nul-after", b"Transfer-Encoding: chunked\x00\r\n"),
]

# Not framing at all: `Content-Encoding` is a plain header, and `X: X<byte>Transfer-Encoding: ...`
# is one header `X` whose value holds text (for SP, HTAB and obs-text bytes). The Content-Length
# frames the body; the "smuggled" request stays body bytes.
LEGAL_CL_TE = {"content-encoding"} | {f"xprespace-{b:02x}" for b in (0x09, 0x20, 0x80, 0x85, 0xA0, 0xFF)}

Expect = int | bytes
CASES: list[tuple[str, bytes, Expect]] = []
for _name, _line in NAMED_TE:
    CASES.append((f"cl-te-{_name}", te_cl(_line), CHUNKED_SMUGGLE if _name in LEGAL_CL_TE else 400))
for _family, _fmt in FAMILIES.items():
    for _b in BYTES:
        _name = f"{_family}-{_b:02x}"
        CASES.append((f"cl-te-{_name}", te_cl(_fmt % _b), CHUNKED_SMUGGLE if _name in LEGAL_CL_TE else 400))

# A TE variant with no Content-Length: only `chunked` (any case, OWS around it) is legal.
TE_ONLY: list[tuple[str, bytes, Expect]] = [
    ("te-leading-space", b"Transfer-Encoding:  chunked\r\n", HELLO),
    ("te-tab", b"Transfer-Encoding:\tchunked\r\n", HELLO),
    ("te-uppercase", b"TRANSFER-ENCODING: CHUNKED\r\n", HELLO),
    ("te-trailing-space", b"Transfer-Encoding: chunked \r\n", HELLO),
    ("te-vtab", b"Transfer-Encoding:\x0bchunked\r\n", 400),
    ("te-chunked-identity", b"Transfer-Encoding: chunked, identity\r\n", 400),  # llhttp: chunked not last
    ("te-identity-chunked", b"Transfer-Encoding: identity, chunked\r\n", 501),
    ("te-chunked-chunked", b"Transfer-Encoding: chunked, chunked\r\n", 400),
    ("te-gzip-chunked", b"Transfer-Encoding: gzip, chunked\r\n", 501),
    ("te-identity", b"Transfer-Encoding: identity\r\n", 501),
    ("te-quoted", b'Transfer-Encoding: "chunked"\r\n', 501),
    ("te-empty", b"Transfer-Encoding: \r\n", 400),
    ("te-obs-fold", b"Transfer-Encoding:\r\n chunked\r\n", 400),
    ("te-underscore", b"Transfer_Encoding: chunked\r\n", 400),
    ("te-space-before-colon", b"Transfer-Encoding : chunked\r\n", 400),
    ("te-double", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400),
    ("te-rev-dual", b"Transfer-Encoding: cow\r\nTransfer-Encoding: chunked\r\n", 400),
    ("te-nul", b"Transfer-Encoding: chunked\x00\r\n", 400),
    ("te-high-byte", b"Transfer-Encoding: ch\x96nked\r\n", 501),
]
for _name, _line, _expect in TE_ONLY:
    if _expect == HELLO:
        CASES.append((_name, POST + _line + b"\r\n5\r\nhello\r\n0\r\n\r\n", HELLO))
    else:
        CASES.append((_name, te_only(_line), _expect))

CASES += [
    # -- Content-Length -------------------------------------------------------------------------
    ("cl-duplicate-same", POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    ("cl-duplicate-differ", POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    ("cl-list", POST + b"Content-Length: 5, 5\r\n\r\nhello", 400),
    ("cl-space-list", POST + b"Content-Length: 5 5\r\n\r\nhello", 400),
    ("cl-plus", POST + b"Content-Length: +5\r\n\r\nhello", 400),
    ("cl-minus", POST + b"Content-Length: -1\r\n\r\nhello", 400),
    ("cl-hex", POST + b"Content-Length: 0x5\r\n\r\nhello", 400),
    ("cl-underscore-digits", POST + b"Content-Length: 1_0\r\n\r\nhellohello", 400),
    ("cl-empty", POST + b"Content-Length: \r\n\r\nhello", 400),
    ("cl-letters", POST + b"Content-Length: five\r\n\r\nhello", 400),
    ("cl-decimal", POST + b"Content-Length: 5.0\r\n\r\nhello", 400),
    ("cl-huge", POST + b"Content-Length: 99999999999999999999999\r\n\r\nhello", 400),
    # Parsed fine, but no upstream can take it (and some wrap it to a negative int64): too large.
    ("cl-uint64-max", POST + b"Content-Length: 18446744073709551615\r\n\r\nhello", 413),
    ("cl-int64-wrap", POST + b"Content-Length: 9223372036854775808\r\n\r\nhello", 413),
    ("cl-vtab", POST + b"Content-Length:\x0b5\r\n\r\nhello", 400),
    ("cl-nul", POST + b"Content-Length: 5\x00\r\n\r\nhello", 400),
    ("cl-underscore-name", POST + b"Content_Length: 44\r\n\r\n" + SMUGGLED, 400),
    ("cl-space-before-colon", POST + b"Content-Length : 5\r\n\r\nhello", 400),
    ("cl-obs-fold", POST + b"Content-Length:\r\n 5\r\n\r\nhello", 400),
    ("cl-leading-zeros", POST + b"Content-Length: 005\r\n\r\nhello", HELLO),
    ("cl-ows", POST + b"Content-Length:   5  \r\n\r\nhello", HELLO),
    ("cl-zero-then-request", POST + b"Content-Length: 0\r\nContent-Length: 37\r\n\r\n" + SMUGGLED, 400),
    ("cl-http10-chunked", b"POST /evil HTTP/1.0\r\nHost: h\r\n" + TE + b"\r\n" + CHUNKED_SMUGGLE, 400),
    ("cl-http10-chunked-cl", b"POST /evil HTTP/1.0\r\nContent-Length: 42\r\n" + TE + b"\r\n" + CHUNKED_SMUGGLE, 400),
    # -- chunk sizes, extensions, data, trailers -------------------------------------------------
    ("chunk-hex-prefix", POST + TE + b"\r\n0x5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-plus", POST + TE + b"\r\n+5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-minus", POST + TE + b"\r\n-5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-leading-space", POST + TE + b"\r\n 5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-space-ext", POST + TE + b"\r\n5 ;ext\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-trailing-space", POST + TE + b"\r\n5 \r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-tab", POST + TE + b"\r\n5\t\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-overflow", POST + TE + b"\r\nffffffffffffffff1\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-overflow-64", POST + TE + b"\r\n10000000000000000\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-bare-lf-size", POST + TE + b"\r\n5\nhello\r\n0\r\n\r\n", 400),
    ("chunk-bare-cr-size", POST + TE + b"\r\n5\rhello\r\n0\r\n\r\n", 400),
    ("chunk-bare-lf-data", POST + TE + b"\r\n5\r\nhello\n0\r\n\r\n", 400),
    ("chunk-data-too-long", POST + TE + b"\r\n3\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-data-no-crlf", POST + TE + b"\r\n5\r\nhelloXX0\r\n\r\n", 400),
    ("chunk-missing-last-crlf", POST + TE + b"\r\n5\r\nhello\r\n0\r\n" + SMUGGLED, 400),
    ("chunk-last-bare-lf", POST + TE + b"\r\n5\r\nhello\r\n0\n\n" + SMUGGLED, 400),
    ("chunk-ext-lf", POST + TE + b"\r\n5;a=b\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-ext-cr", POST + TE + b"\r\n5;a=b\rc\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-ext-nul", POST + TE + b"\r\n5;a=\x00\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-ext-quoted-crlf", POST + TE + b'\r\n5;a="b\r\nc"\r\nhello\r\n0\r\n\r\n', 400),
    ("chunk-no-size", POST + TE + b"\r\n\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-nul-size", POST + TE + b"\r\n5\x00\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-underscore-size", POST + TE + b"\r\n0_5\r\nhello\r\n0\r\n\r\n", 400),
    ("trailer-bad-name", POST + TE + b"\r\n5\r\nhello\r\n0\r\nBad Name: v\r\n\r\n", 400),
    ("trailer-bare-lf", POST + TE + b"\r\n5\r\nhello\r\n0\r\nX: v\n\r\n", 400),
    ("trailer-obs-fold", POST + TE + b"\r\n5\r\nhello\r\n0\r\nX: v\r\n w\r\n\r\n", 400),
    ("trailer-content-length", POST + TE + b"\r\n5\r\nhello\r\n0\r\nContent-Length: 99\r\n\r\n", 400),
    ("chunk-ext", POST + TE + b"\r\n5;name=value\r\nhello\r\n0\r\n\r\n", HELLO),
    ("chunk-ext-quoted", POST + TE + b'\r\n5;name="a b"\r\nhello\r\n0\r\n\r\n', HELLO),
    ("chunk-leading-zeros", POST + TE + b"\r\n0005\r\nhello\r\n0\r\n\r\n", HELLO),
    ("chunk-uppercase-hex", POST + TE + b"\r\nA\r\nhellohello\r\n0\r\n\r\n", b"hellohello"),
    ("trailers", POST + TE + b"\r\n5\r\nhello\r\n0\r\nX-Trailer: v\r\nX-Other: w\r\n\r\n", HELLO),
    # -- request line ---------------------------------------------------------------------------
    ("no-host", b"GET /evil HTTP/1.1\r\n\r\n", 400),
    ("http-1.2", b"GET /evil HTTP/1.2\r\nHost: h\r\n\r\n", 400),
    ("http-2.0", b"GET /evil HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    ("http-0.9-versionless", b"GET /evil\r\n\r\n", 400),
    ("http-0.9", b"GET /evil HTTP/0.9\r\nHost: h\r\n\r\n", 400),
    ("http-1.10", b"GET /evil HTTP/1.10\r\nHost: h\r\n\r\n", 400),
    ("http-01.1", b"GET /evil HTTP/01.1\r\nHost: h\r\n\r\n", 400),
    ("lowercase-version", b"GET /evil http/1.1\r\nHost: h\r\n\r\n", 400),
    ("lowercase-method", b"get /evil HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("nul-method", b"G\x00T /evil HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    # llhttp skips repeated SP (RFC 9112 3 allows it); we rebuild the request line, so the upstream
    # sees one clean `GET /evil HTTP/1.1`.
    ("double-space", b"GET  /evil HTTP/1.1\r\nHost: h\r\n\r\n", b""),
    ("tab-separators", b"GET\t/evil\tHTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("trailing-garbage", b"GET /evil HTTP/1.1 x\r\nHost: h\r\n\r\n", 400),
    ("bare-lf-request-line", b"GET /evil HTTP/1.1\nHost: h\r\n\r\n", 400),
    ("bare-cr-request-line", b"GET /evil HTTP/1.1\rHost: h\r\n\r\n", 400),
    ("nul-in-target", b"GET /evil\x00 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("high-byte-in-target", b"GET /evil\xff HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("absolute-other-host", b"GET http://other.test/evil HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("absolute-userinfo", b"GET http://h@other.test/evil HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("absolute-userinfo-host", b"GET http://other.test@h/evil HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("absolute-port-mismatch", b"GET http://h:81/evil HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("absolute-ftp", b"GET ftp://h/evil HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("authority-form", b"GET h:80 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("asterisk-get", b"GET * HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("connect", b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 405),
    # -- header syntax ---------------------------------------------------------------------------
    ("host-space-before-colon", b"GET /evil HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    ("duplicate-host", b"GET /evil HTTP/1.1\r\nHost: h\r\nHost: h\r\n\r\n", 400),
    ("host-obs-fold", b"GET /evil HTTP/1.1\r\n Host: h\r\n\r\n", 400),
    ("nul-in-value", b"GET /evil HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400),
    ("cr-in-value", b"GET /evil HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400),
    ("lf-in-value", b"GET /evil HTTP/1.1\r\nHost: h\r\nX: a\nb\r\n\r\n", 400),
    ("ctl-in-value", b"GET /evil HTTP/1.1\r\nHost: h\r\nX: a\x01b\r\n\r\n", 400),
    ("del-in-value", b"GET /evil HTTP/1.1\r\nHost: h\r\nX: a\x7fb\r\n\r\n", 400),
    ("nul-in-name", b"GET /evil HTTP/1.1\r\nHost: h\r\nX\x00Y: v\r\n\r\n", 400),
    ("bracket-in-name", b"GET /evil HTTP/1.1\r\nHost: h\r\nX[y]: v\r\n\r\n", 400),
    ("slash-in-name", b"GET /evil HTTP/1.1\r\nHost: h\r\nX/y: v\r\n\r\n", 400),
    ("quote-in-name", b'GET /evil HTTP/1.1\r\nHost: h\r\nX"y: v\r\n\r\n', 400),
    ("high-byte-in-name", b"GET /evil HTTP/1.1\r\nHost: h\r\nX\xe9: v\r\n\r\n", 400),
    ("empty-name", b"GET /evil HTTP/1.1\r\nHost: h\r\n: v\r\n\r\n", 400),
    ("no-colon", b"GET /evil HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n", 400),
    ("lf-only-head", b"GET /evil HTTP/1.1\nHost: h\n\n", 400),
    ("cr-only-end", b"GET /evil HTTP/1.1\r\nHost: h\r\n\r" + SMUGGLED, 400),
    ("via-loop", b"GET /evil HTTP/1.1\r\nHost: h\r\nVia: 1.1 OURS\r\n\r\n", 508),
    ("via-loop-listed", b"GET /evil HTTP/1.1\r\nHost: h\r\nVia: 1.0 edge, 1.1 OURS (x)\r\n\r\n", 508),
    ("via-loop-second-header", b"GET /evil HTTP/1.1\r\nHost: h\r\nVia: 1.1 a\r\nVia: 1.0 OURS\r\n\r\n", 508),
    ("expect-unknown", POST + b"Expect: 200-ok\r\nContent-Length: 0\r\n\r\n", 417),
]  # fmt: skip


async def run_case(app: ProxyApp, up: LoggingUpstream, data: bytes, expect: Expect, pipelined: bool) -> None:
    assert app.plane is not None
    data = data.replace(b"OURS", app.plane.via)  # the via-loop cases carry our own pseudonym
    client = await RawClient.connect(app.plane.bound_port)
    try:
        if pipelined:
            await client.send(CLEAN + data)
        else:
            await client.send(CLEAN)
        first = await client.response()
        assert first.status == 200 and first.body == b"/clean-1"
        if not pipelined:
            await client.send(data)
        resp = await client.response()
        if isinstance(expect, bytes):
            assert resp.status == 200, resp.raw
        else:
            assert resp.status == expect, resp.raw
            assert resp.get("connection") == [b"close"]
            assert await client.at_eof() == b""
    finally:
        client.close()
    if isinstance(expect, bytes):
        await wait_until(lambda: len(up.requests) == 2, what="the legal request upstream")
        assert up.urls() == [b"/clean-1", b"/evil"]
        evil = up.requests[1]
        assert evil.body == expect
        framing = evil.get("transfer-encoding") + evil.get("content-length")
        assert framing in ([b"chunked"], [b"%d" % len(expect)], []), framing  # exactly one framing
    else:
        await wait_until(lambda: app.plane is not None and not app.plane.clients, what="client closed")
        assert up.urls() == [b"/clean-1"]
        assert b"/evil" not in up.raw and b"/smuggled" not in up.raw  # not even a head
    assert up.parse_errors == 0, up.raw
    assert up.partial == 0, up.raw


@pytest.mark.parametrize(("data", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_mutation_pipelined_behind_a_clean_request(
    data: bytes, expect: Expect, logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    """Both requests arrive in one read: only the clean one may reach the upstream."""
    up = await logging_upstream()
    app = await proxy_factory(config_text(up.url, up.url, extra="retries: {attempts: 0}\n"))
    await run_case(app, up, data, expect, pipelined=True)


@pytest.mark.parametrize(("data", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_mutation_on_a_warm_connection(
    data: bytes, expect: Expect, logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    """Sent on its own after a warm-up (a pooled upstream connection waits): still never forwarded
    as a request."""
    up = await logging_upstream()
    app = await proxy_factory(config_text(up.url, up.url, extra="retries: {attempts: 0}\n"))
    await run_case(app, up, data, expect, pipelined=False)


SEQUENCES: list[tuple[str, bytes, list[bytes]]] = [
    # Nothing after a request that closes the connection is read, let alone forwarded.
    ("after-connection-close", b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" + SMUGGLED, [b"/a"]),
    ("after-http10", b"GET /a HTTP/1.0\r\n\r\n" + SMUGGLED, [b"/a"]),
    # An Upgrade the upstream declines: the bytes after it are not a second request (h2c/websocket
    # smuggling: they were meant for the tunnel).
    ("after-refused-upgrade",
     b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n" + SMUGGLED, [b"/a"]),
    # (`Upgrade: h2c` alone is never forwarded: such a request is a plain one; see test_http_details.py.)
    # A body that contains a request is a body.
    ("request-in-body", b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED),
     [b"/a"]),
    # Leading empty lines before a request line are ignored (RFC 9112 2.2), nothing else is.
    ("leading-crlf", b"\r\n\r\nGET /a HTTP/1.1\r\nHost: h\r\n\r\n", [b"/a"]),
]  # fmt: skip


@pytest.mark.parametrize(("data", "urls"), [c[1:] for c in SEQUENCES], ids=[c[0] for c in SEQUENCES])
async def test_bytes_after_a_final_request_are_never_a_request(
    data: bytes, urls: list[bytes], logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    up = await logging_upstream()
    app = await proxy_factory(config_text(up.url, up.url, extra="retries: {attempts: 0}\n"))
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    await client.send(data)
    resp = await client.response()
    assert resp.status == 200
    if data.endswith(SMUGGLED) and b"Content-Length" not in data:
        assert await client.at_eof() == b""  # closed: the rest is never parsed
    client.close()
    await wait_until(lambda: not app.plane.clients if app.plane else False, what="client closed")
    assert up.urls() == urls
    assert up.parse_errors == 0 and up.partial == 0
