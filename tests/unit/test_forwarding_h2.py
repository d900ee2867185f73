"""proxy.dataplane.forwarding_h2: the HTTP/2 upstream header list as a pure function of the
parsed request; gRPC codes, classes and deadlines (proxy.config.grpc_codes)."""

from __future__ import annotations

import ipaddress

import pytest
from support.fakes import request, snapshot

from proxy.config import grpc_codes
from proxy.dataplane import forwarding_h2
from proxy.dataplane.legs.grpc_answers import grpc_error_fields, grpc_error_response

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


def build(req, peer=b"192.0.2.7", trusted=False, via=b"1.1 canary-proxy"):  # type: ignore[no-untyped-def]
    if req.reqid is None:
        req.reqid = b"id-1"
    return forwarding_h2.request_headers(req, peer, trusted, b"10.0.0.1:80", via)


def test_pseudo_headers_first_then_lower_case_fields() -> None:
    snap, _, _ = snapshot()
    req = request(snap, b"POST", b"/pkg.Svc/Call?x=1", (b"Content-Type: application/grpc\r\n", b"X-Canary: always\r\n"))
    req.clen = 5
    headers, timeout = build(req)
    assert headers[:4] == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"example.test"),
        (b":path", b"/pkg.Svc/Call?x=1"),
    ]
    rest = dict(headers[4:])
    assert b"host" not in rest  # it is :authority
    assert rest[b"content-type"] == b"application/grpc" and rest[b"x-canary"] == b"always"
    assert rest[b"content-length"] == b"5"
    assert rest[b"te"] == b"trailers"
    assert rest[b"x-forwarded-for"] == b"192.0.2.7" and rest[b"x-forwarded-proto"] == b"http"
    assert rest[b"x-forwarded-host"] == b"example.test"
    assert rest[b"via"] == b"1.1 canary-proxy" and rest[b"x-request-id"] == b"id-1"
    assert all(name == name.lower() for name, _ in headers)
    assert timeout == 0.0


def test_no_connection_specific_fields_and_connection_named_ones_dropped() -> None:
    snap, _, _ = snapshot()
    req = request(snap, lines=(b"Keep-Alive: 5\r\n", b"X-Secret: 1\r\n", b"Upgrade: h2c\r\n", b"TE: gzip\r\n"))
    req.conn_tokens = [b"x-secret", b"x-forwarded-for"]
    names = [n for n, _ in build(req)[0]]
    for gone in (b"keep-alive", b"x-secret", b"upgrade", b"connection", b"transfer-encoding"):
        assert gone not in names
    assert names.count(b"te") == 1  # only our `te: trailers`
    assert b"x-forwarded-for" in names  # ours: a client cannot have it dropped


def test_chunked_request_has_no_content_length_and_http10_gets_default_authority() -> None:
    snap, _, _ = snapshot()
    req = request(snap, b"POST")
    req.te = b"chunked"
    req.clen = -1
    assert b"content-length" not in dict(build(req)[0])
    req = request(snap)
    req.host = None
    req.lines = []
    assert dict(build(req)[0])[b":authority"] == b"10.0.0.1:80"


def test_forwarding_headers_follow_the_http1_rules() -> None:
    snap, _, _ = snapshot()
    req = request(snap)
    req.xff, req.xfproto, req.xfhost = b"198.51.100.1", b"https", b"public.test"
    untrusted = dict(build(req)[0])
    assert untrusted[b"x-forwarded-for"] == b"198.51.100.1, 192.0.2.7"
    assert untrusted[b"x-forwarded-proto"] == b"http" and untrusted[b"x-forwarded-host"] == b"example.test"
    trusted = dict(build(req, b"10.1.1.1", True)[0])
    assert trusted[b"x-forwarded-proto"] == b"https" and trusted[b"x-forwarded-host"] == b"public.test"
    assert b"via" not in dict(build(req, via=b"")[0])


def test_grpc_timeout_is_read_and_passed_on() -> None:
    snap, _, _ = snapshot()
    req = request(snap, b"POST", lines=(b"grpc-timeout: 250m\r\n",))
    headers, timeout = build(req)
    assert timeout == pytest.approx(0.25) and (b"grpc-timeout", b"250m") in headers


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(b"1H", 3600.0), (b"2M", 120.0), (b"3S", 3.0), (b"100m", 0.1), (b"5000u", 0.005), (b"7n", 7e-9)],
)
def test_grpc_timeout_units(value: bytes, seconds: float) -> None:
    assert forwarding_h2.grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"S", b"10", b"10x", b"123456789S", b"-1S", b"1.5S"])
def test_invalid_grpc_timeouts_are_ignored(value: bytes) -> None:
    assert forwarding_h2.grpc_timeout(value) == 0.0


def test_is_grpc_by_content_type() -> None:
    assert forwarding_h2.is_grpc([b"Content-Type: application/grpc+proto\r\n"])
    assert forwarding_h2.is_grpc([b"content-type: application/grpc-web\r\n"])
    assert not forwarding_h2.is_grpc([b"Content-Type: application/json\r\n"])
    assert not forwarding_h2.is_grpc([])


def test_grpc_code_names_numbers_and_classes() -> None:
    assert grpc_codes.parse_code("unavailable") == 14 and grpc_codes.parse_code("14") == 14
    assert grpc_codes.parse_code(4) == 4
    for bad in ("17", "NOPE", -1, True, ""):
        with pytest.raises(ValueError):
            grpc_codes.parse_code(bad)
    assert grpc_codes.code_class(0) == "ok"
    client = {"CANCELLED", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
              "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNAUTHENTICATED", "UNIMPLEMENTED"}  # fmt: skip
    for code, name in enumerate(grpc_codes.NAMES):
        expected = "ok" if code == 0 else "client_error" if name in client else "server_error"
        assert grpc_codes.code_class(code) == expected, name


def test_default_error_table_and_status_values() -> None:
    table = grpc_codes.error_table(grpc_codes.DEFAULT_ERRORS)
    errors = {grpc_codes.NAMES[c] for c, e in enumerate(table) if e}
    assert errors == {"UNKNOWN", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
    assert grpc_codes.parse_status_value(b"14") == 14
    assert grpc_codes.parse_status_value(b"99") == 2 and grpc_codes.parse_status_value(b"x") == 2


def test_own_errors_map_to_grpc_statuses() -> None:
    assert grpc_codes.from_http_status(504) == grpc_codes.DEADLINE_EXCEEDED
    assert grpc_codes.from_http_status(404) == grpc_codes.UNIMPLEMENTED
    for status in (502, 503, 429):
        assert grpc_codes.from_http_status(status) == grpc_codes.UNAVAILABLE
    fields = dict(grpc_error_fields(503))
    assert fields[b"grpc-status"] == b"14" and fields[b"content-type"] == b"application/grpc"
    assert b" " not in fields[b"grpc-message"]  # percent-encoded, as gRPC requires
    raw = grpc_error_response(504, False, b"id-9", b"Via: 1.1 canary-proxy\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and b"grpc-status: 4\r\n" in raw
    assert b"Content-Length: 0\r\n" in raw and raw.endswith(b"\r\n\r\n") and b"X-Request-Id: id-9\r\n" in raw
