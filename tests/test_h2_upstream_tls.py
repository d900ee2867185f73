"""`https://` upstreams with `protocol: h2`: TLS with ALPN h2 (a private CA), a real grpcio server
behind TLS, and a server that does not select h2 refused clearly (502 and one log line)."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from support.certs import CA
from support.grpc_service import EchoServer
from support.h2server import H2Server
from test_grpc_e2e import call
from test_h2_upstream import grpc_request, ok_grpc, read_chunked

from proxy.control.app import ProxyApp


def tls_config(url: str, ca: Path) -> str:
    return (
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\naccess_log: false\nupstreams:\n"
        f"  stable: {{endpoints: [{url}], protocol: h2, tls: {{ca: {ca}}}}}\n"
        "routes:\n  - name: all\n    to: stable\n"
    )


def server_context(ca: CA, alpn: list[str]) -> ssl.SSLContext:
    leaf = ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(leaf.cert, leaf.key)
    ctx.set_alpn_protocols(alpn)
    return ctx


async def test_https_h2_upstream_with_a_private_ca(tmp_path, proxy_factory, raw_client) -> None:
    ca = CA(tmp_path / "pki")
    server = await H2Server(ok_grpc, tls=server_context(ca, ["h2"])).start()
    try:
        app: ProxyApp = await proxy_factory(tls_config(f"https://localhost:{server.port}", ca.cert))
        client = await raw_client(app.plane.bound_port)
        for _ in range(3):
            await client.send(grpc_request())
            _, body, trailers = await read_chunked(client)
            assert b"grpc-status: 0" in trailers and b"hi" in body
        assert server.requests[0].header(b":scheme") == b"https"
        assert server.accepts == 1  # one TLS connection, three streams
    finally:
        await server.close()


async def test_server_not_selecting_h2_is_refused_with_a_clear_line(tmp_path, proxy_factory, raw_client, caplog):
    ca = CA(tmp_path / "pki")
    server = await H2Server(ok_grpc, tls=server_context(ca, ["http/1.1"])).start()
    try:
        app = await proxy_factory(tls_config(f"https://localhost:{server.port}", ca.cert))
        client = await raw_client(app.plane.bound_port)
        with caplog.at_level(logging.ERROR):
            resp = await client.request(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        assert resp.status == 502
        assert not server.requests  # nothing of HTTP/2 reached it
        lines = [r.getMessage() for r in caplog.records if "did not select h2" in r.getMessage()]
        assert len(lines) == 1 and "stable" in lines[0], [r.getMessage() for r in caplog.records]
    finally:
        await server.close()


async def test_grpcio_server_behind_tls(tmp_path, proxy_factory) -> None:
    ca = CA(tmp_path / "pki")
    leaf = ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"])
    server = EchoServer("secure", cert=(leaf.key.read_bytes(), leaf.cert.read_bytes()))
    try:
        app = await proxy_factory(tls_config(f"https://localhost:{server.port}", ca.cert))
        reply = await call(app.plane.bound_port, "Say", b"tls")
        assert reply.messages == [b"secure:tls"] and reply.grpc_status == b"0"
    finally:
        server.stop()


