"""proxy.dataplane.forwarding: the upstream head as a pure function of the parsed request."""

from __future__ import annotations

import ipaddress

from support.fakes import request, snapshot

from proxy.dataplane import forwarding

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)
VIA = b"Via: 1.1 canary-proxy\r\n"


def head_lines(head: bytes) -> list[bytes]:
    assert head.endswith(b"\r\n\r\n")
    return head[:-4].split(b"\r\n")


def test_plain_get_gets_forwarding_headers_in_one_head() -> None:
    snap, _, _ = snapshot()
    req = request(snap, target=b"/a?b=1", lines=(b"Accept: */*\r\n",))
    req.reqid = b"id-1"
    lines = head_lines(forwarding.upstream_head(req, b"192.0.2.7", False, None, VIA))
    assert lines[0] == b"GET /a?b=1 HTTP/1.1"
    assert lines[1:3] == [b"Host: example.test", b"Accept: */*"]
    assert b"X-Forwarded-For: 192.0.2.7" in lines
    assert b"X-Forwarded-Proto: http" in lines
    assert b"X-Forwarded-Host: example.test" in lines
    assert b"Via: 1.1 canary-proxy" in lines
    assert lines[-1] == b"X-Request-Id: id-1"


def test_x_forwarded_for_is_appended_to() -> None:
    snap, _, _ = snapshot()
    req = request(snap)
    req.xff = b"198.51.100.1"
    lines = head_lines(forwarding.upstream_head(req, b"192.0.2.7", False, None, VIA))
    assert b"X-Forwarded-For: 198.51.100.1, 192.0.2.7" in lines


def test_proto_and_host_kept_only_from_trusted_peers() -> None:
    snap, _, _ = snapshot()
    req = request(snap)
    req.xfproto, req.xfhost = b"https", b"public.test"
    untrusted = head_lines(forwarding.upstream_head(req, b"192.0.2.7", False, None, VIA))
    assert b"X-Forwarded-Proto: http" in untrusted and b"X-Forwarded-Host: example.test" in untrusted
    trusted = head_lines(forwarding.upstream_head(req, b"10.1.1.1", True, None, VIA))
    assert b"X-Forwarded-Proto: https" in trusted and b"X-Forwarded-Host: public.test" in trusted


def test_framing_is_restated() -> None:
    snap, _, _ = snapshot()
    req = request(snap, method=b"POST")
    req.clen = 5
    assert b"Content-Length: 5" in head_lines(forwarding.upstream_head(req, b"p", False, None, VIA))
    req.clen, req.te = -1, b"chunked"
    lines = head_lines(forwarding.upstream_head(req, b"p", False, None, VIA))
    assert b"Transfer-Encoding: chunked" in lines and not [x for x in lines if x.startswith(b"Content-Length")]


def test_headers_named_in_connection_are_dropped_but_ours_are_rebuilt() -> None:
    snap, _, _ = snapshot()
    req = request(snap, lines=(b"X-Secret: 1\r\n", b"X-Keep: 2\r\n"))
    req.conn_tokens = [b"x-secret", b"x-forwarded-for"]
    lines = head_lines(forwarding.upstream_head(req, b"192.0.2.7", False, None, VIA))
    assert b"X-Secret: 1" not in lines and b"X-Keep: 2" in lines
    assert b"X-Forwarded-For: 192.0.2.7" in lines  # a client cannot strip our headers


def test_upgrade_passes_only_when_connection_names_it() -> None:
    snap, _, _ = snapshot()
    req = request(snap)
    req.upgrade = b"websocket"
    assert forwarding.forwarded_upgrade(req) is None
    req.conn_tokens = [b"upgrade"]
    assert forwarding.forwarded_upgrade(req) == b"websocket"
    lines = head_lines(forwarding.upstream_head(req, b"p", False, None, VIA))
    assert b"Connection: upgrade" in lines and b"Upgrade: websocket" in lines


def test_http10_without_host_gets_the_endpoint_as_host_and_a_10_via() -> None:
    snap, _, _ = snapshot()
    req = request(snap)
    req.host, req.lines, req.version10 = None, [], True
    lines = head_lines(forwarding.upstream_head(req, b"p", False, b"10.0.0.1:80", VIA))
    assert lines[0] == b"GET / HTTP/1.1" and lines[1] == b"Host: 10.0.0.1:80"
    assert not [x for x in lines if x.startswith(b"X-Forwarded-Host")]


def test_trusted_peers_and_the_client_they_speak_for() -> None:
    assert forwarding.is_trusted(b"10.2.3.4", TRUSTED)
    assert not forwarding.is_trusted(b"192.0.2.1", TRUSTED)
    assert not forwarding.is_trusted(b"not-an-ip", TRUSTED)
    assert not forwarding.is_trusted(b"10.2.3.4", ())
    assert forwarding.client_address(b"198.51.100.9, 10.0.0.5", TRUSTED, b"10.0.0.1") == b"198.51.100.9"
    # A forged entry stops the walk at the last hop we could vouch for.
    assert forwarding.client_address(b"<script>, 10.0.0.5", TRUSTED, b"10.0.0.1") == b"10.0.0.5"
    assert forwarding.client_address(b"10.0.0.6", TRUSTED, b"10.0.0.1") == b"10.0.0.6"
