"""TLS termination on the listener, with real clients (curl, openssl s_client) against the real proxy.

Every test makes its own private CA and certificates (tests/support/certs.py). The clients run in
threads: the proxy under test runs on this test's event loop.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import ProxyProcess, Upstream, config_text, wait_until
from support.certs import CA, Issued, s_client

from proxy.control.app import ProxyApp
from proxy.control.metrics import make_registry, render
from proxy.control.status import build_status
from proxy.dataplane.legs.base import ALPN_SUPPORTED

pytestmark = pytest.mark.timeout(90)

StartProxy = Callable[..., Awaitable[ProxyApp]]
StartUpstream = Callable[..., Awaitable[Upstream]]


@pytest.fixture
def pki(tmp_path: Path) -> tuple[CA, Issued]:
    ca = CA(tmp_path / "pki")
    return ca, ca.issue("localhost", dns=["localhost"])


def tls_config(up: Upstream, server: Issued, extra: str = "") -> str:
    return config_text(up.url, up.url) + f"tls:\n  cert: {server.cert}\n  key: {server.key}\n{extra}"


async def curl(port: int, ca: Path, *args: str, path: str = "/") -> subprocess.CompletedProcess[str]:
    cmd = [
        "curl", "-sS", "--http1.1", "--cacert", str(ca), "--resolve", f"localhost:{port}:127.0.0.1",
        "-o", "-", "-w", "\\n%{http_code}", *args, f"https://localhost:{port}{path}",
    ]  # fmt: skip
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=30)


async def handshake(port: int, *args: str, data: bytes = b"") -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(s_client, port, *args, data=data)


def handshake_errors(app: ProxyApp) -> dict[str, float]:
    out = {}
    for line in render(make_registry(app, process=False)).decode().splitlines():
        if line.startswith("canary_proxy_tls_handshake_errors_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


async def test_https_keep_alive_requests_and_forwarded_proto(
    pki: tuple[CA, Issued], upstream_factory: StartUpstream, proxy_factory: StartProxy
) -> None:
    ca, server = pki
    up = await upstream_factory("stable")
    app = await proxy_factory(tls_config(up, server))
    port = app.plane.bound_port if app.plane else 0
    # Two requests on one connection: curl says it reused it.
    got = await curl(port, ca.cert, "-v", "--next", "--cacert", str(ca.cert), f"https://localhost:{port}/two")
    assert got.returncode == 0, got.stderr
    assert got.stdout.count("stable GET") == 2 and got.stdout.strip().endswith("200")
    assert "Re-using existing connection" in got.stderr or "Reusing existing connection" in got.stderr
    assert [s["headers"]["X-Forwarded-Proto"] for s in up.seen] == ["https", "https"]
    # The proxy's certificate is verified by curl: a client without our CA refuses it.
    untrusted = await asyncio.to_thread(
        subprocess.run,
        ["curl", "-sS", "--resolve", f"localhost:{port}:127.0.0.1", f"https://localhost:{port}/"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert untrusted.returncode == 60, untrusted.stderr  # CURLE_PEER_FAILED_VERIFICATION
    await wait_until(lambda: handshake_errors(app).get("client_rejected_certificate") == 1)


async def test_sni_chooses_the_certificate(
    tmp_path: Path, upstream_factory: StartUpstream, proxy_factory: StartProxy
) -> None:
    ca = CA(tmp_path / "pki")
    first = ca.issue("first.test", dns=["first.test"])
    wild = ca.issue("wild.test", dns=["*.wild.test"])
    legacy = ca.issue("legacy.test", ips=())  # no SAN at all: its common name counts
    up = await upstream_factory("stable")
    extra = f"  certificates:\n    - {{cert: {wild.cert}, key: {wild.key}}}\n"
    extra += f"    - {{cert: {legacy.cert}, key: {legacy.key}}}\n"
    app = await proxy_factory(tls_config(up, first, extra))
    port = app.plane.bound_port if app.plane else 0

    async def subject(*args: str) -> str:
        out = (await handshake(port, *args)).stdout
        return next(line for line in out.splitlines() if line.startswith("subject="))

    assert await subject("-servername", "a.wild.test") == "subject=CN = wild.test"
    assert await subject("-servername", "legacy.test") == "subject=CN = legacy.test"
    assert await subject("-servername", "first.test") == "subject=CN = first.test"
    assert await subject("-servername", "x.y.wild.test") == "subject=CN = first.test"  # one label only
    assert await subject("-servername", "unknown.test") == "subject=CN = first.test"  # the default
    assert await subject("-noservername") == "subject=CN = first.test"
    # /status shows what is served.
    doc = build_status(app)["tls"]
    assert [(c["key_path"], c["names"], c["serial"]) for c in doc["certificates"]] == [
        ("tls", ["first.test"], first.serial_hex),
        ("tls.certificates[0]", ["*.wild.test"], wild.serial_hex),
        ("tls.certificates[1]", ["legacy.test"], legacy.serial_hex),
    ]
    assert doc["min_version"] == "1.2" and "http/1.1" in doc["alpn_offered"]


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
async def test_old_protocol_versions_are_refused_and_counted(
    version: str, pki: tuple[CA, Issued], upstream_factory: StartUpstream, proxy_factory: StartProxy
) -> None:
    _, server = pki
    up = await upstream_factory("stable")
    app = await proxy_factory(tls_config(up, server))
    port = app.plane.bound_port if app.plane else 0
    # SECLEVEL=0: let this OpenSSL client offer the old version at all, so the server refuses it.
    got = await handshake(port, version, "-cipher", "DEFAULT@SECLEVEL=0")
    assert got.returncode != 0
    assert "Cipher is (NONE)" in got.stdout or "Cipher    : 0000" in got.stdout
    await wait_until(lambda: handshake_errors(app).get("protocol_version") == 1)
    good = await handshake(port, "-tls1_2")
    assert "New, TLSv1.2, Cipher is" in good.stdout


async def test_min_version_1_3_refuses_1_2(
    pki: tuple[CA, Issued], upstream_factory: StartUpstream, proxy_factory: StartProxy
) -> None:
    _, server = pki
    up = await upstream_factory("stable")
    app = await proxy_factory(tls_config(up, server, '  min_version: "1.3"\n'))
    port = app.plane.bound_port if app.plane else 0
    assert (await handshake(port, "-tls1_2")).returncode != 0
    assert "New, TLSv1.3, Cipher is" in (await handshake(port, "-tls1_3")).stdout
    await wait_until(lambda: handshake_errors(app).get("protocol_version") == 1)


async def test_alpn_offers_what_the_legs_speak(
    pki: tuple[CA, Issued], upstream_factory: StartUpstream, proxy_factory: StartProxy
) -> None:
    _, server = pki
    up = await upstream_factory("stable")
    app = await proxy_factory(tls_config(up, server))
    port = app.plane.bound_port if app.plane else 0
    assert "ALPN protocol: http/1.1" in (await handshake(port, "-alpn", "http/1.1")).stdout
    h2 = (await handshake(port, "-alpn", "h2")).stdout
    if "h2" in ALPN_SUPPORTED:
        assert "ALPN protocol: h2" in h2
    else:  # never advertised before a client leg can speak it
        assert "No ALPN negotiated" in h2
    app2 = await proxy_factory(tls_config(up, server, "  alpn: [http/1.1]\n"), name="other.yaml")
    port2 = app2.plane.bound_port if app2.plane else 0
    assert "No ALPN negotiated" in (await handshake(port2, "-alpn", "h2")).stdout
    assert "ALPN protocol: http/1.1" in (await handshake(port2, "-alpn", "h2,http/1.1")).stdout


async def test_mutual_tls(tmp_path: Path, upstream_factory: StartUpstream, proxy_factory: StartProxy) -> None:
    ca = CA(tmp_path / "pki")
    server = ca.issue("localhost", dns=["localhost"])
    clients = CA(tmp_path / "clients", "client-ca")
    alice = clients.issue("alice")
    mallory = CA(tmp_path / "other", "other-ca").issue("mallory")
    up = await upstream_factory("stable")
    app = await proxy_factory(tls_config(up, server, f"  client_ca: {clients.cert}\n"))
    port = app.plane.bound_port if app.plane else 0
    good = await curl(port, ca.cert, "--cert", str(alice.cert), "--key", str(alice.key))
    assert good.returncode == 0 and good.stdout.endswith("200"), good.stderr
    none = await curl(port, ca.cert)
    assert none.returncode != 0 and "stable GET" not in none.stdout
    await wait_until(lambda: handshake_errors(app).get("certificate_required") == 1)
    wrong = await curl(port, ca.cert, "--cert", str(mallory.cert), "--key", str(mallory.key))
    assert wrong.returncode != 0 and "stable GET" not in wrong.stdout
    await wait_until(lambda: handshake_errors(app).get("unknown_ca") == 1)
    assert len(up.seen) == 1  # only alice's request got through


def scraped_errors(admin_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("canary_proxy_tls_handshake_errors_total{")
    }


async def test_plain_http_eof_and_silence_are_counted_and_logged_once(
    pki: tuple[CA, Issued], upstream_factory: StartUpstream, proxy_process: Callable[..., ProxyProcess]
) -> None:
    """A real process (uvloop): plain HTTP, a hang-up and a silent client are each counted, logged
    once per reason, and the proxy goes on serving."""
    ca, server = pki
    up = await upstream_factory("stable")
    pp = await asyncio.to_thread(proxy_process, tls_config(up, server, "timeouts: {client_header: 1s}\n"))
    for _ in range(3):  # plain HTTP to the TLS port: closed, counted, the proxy carries on
        reader, writer = await asyncio.open_connection("127.0.0.1", pp.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    await wait_until(lambda: scraped_errors(pp.admin_port).get("http_request") == 3, timeout=10)
    with socket.create_connection(("127.0.0.1", pp.port)):
        pass  # connect and hang up: eof
    await wait_until(lambda: scraped_errors(pp.admin_port).get("eof") == 1, timeout=10)
    # A silent client is dropped after the handshake timeout (timeouts.client_header).
    reader, writer = await asyncio.open_connection("127.0.0.1", pp.port)
    t0 = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert 0.8 < asyncio.get_running_loop().time() - t0 < 5
    writer.close()
    await wait_until(lambda: scraped_errors(pp.admin_port).get("timeout") == 1, timeout=10)
    got = await curl(pp.port, ca.cert)
    assert got.stdout.endswith("200"), got.stderr

    def reasons_logged() -> list[str]:
        logged = [line for line in pp.lines if "TLS handshake failed: reason=" in line]
        return [line.split("reason=")[1].split(" ")[0] for line in logged]

    # One line per reason, although http_request failed three times (rate-limited).
    await wait_until(lambda: reasons_logged() == ["http_request", "eof", "timeout"], timeout=10)
