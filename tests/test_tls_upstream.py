"""`https://` upstreams: verified against a private CA, by name, with a client certificate; a bad
certificate gives 502 and one clear log line naming the upstream, the endpoint and the reason."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from conftest import Upstream, config_text
from support.certs import CA, Issued

from proxy.control.app import ProxyApp
from proxy.dataplane.tls.client import upstream_context

pytestmark = pytest.mark.timeout(90)

StartProxy = Callable[..., Awaitable[ProxyApp]]
StartTLSUpstream = Callable[..., Awaitable[int]]


@pytest.fixture
async def tls_upstream() -> AsyncIterator[StartTLSUpstream]:
    """An aiohttp server over TLS answering `<name> <path> <client cert CN>`; returns its port."""
    runners: list[web.AppRunner] = []

    async def start(name: str, server: Issued, client_ca: Path | None = None) -> int:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(server.cert, server.key)
        if client_ca is not None:
            ctx.load_verify_locations(cafile=client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED

        async def handle(request: web.Request) -> web.Response:
            peer = request.transport.get_extra_info("peercert") if request.transport else None
            cn = dict(x[0] for x in peer["subject"]).get("commonName", "-") if peer else "-"
            return web.Response(text=f"{name} {request.path} {cn} {request.host}")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        runners.append(runner)
        port: int = runner.addresses[0][1]
        return port

    yield start
    for runner in runners:
        await runner.cleanup()


def https_config(stable: str, canary: str, extra: str = "") -> str:
    return config_text(stable, canary) + extra


async def get(app: ProxyApp, path: str = "/", headers: dict[str, str] | None = None) -> httpx.Response:
    port = app.plane.bound_port if app.plane else 0
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{port}{path}", headers=headers or {}, timeout=20)


def tls_of(upstream: str, body: str) -> str:
    return f"  {upstream}: {{endpoints: [{body}]}}\n"


async def test_https_upstream_with_a_private_ca(
    tmp_path: Path,
    tls_upstream: StartTLSUpstream,
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_factory: StartProxy,
) -> None:
    ca = CA(tmp_path / "pki")
    port = await tls_upstream("stable", ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"]))
    canary = await upstream_factory("canary")
    text = config_text(f'"https://localhost:{port}"', canary.url).replace(
        "version: v1}", f"version: v1, tls: {{ca: {ca.cert}}}}}"
    )
    app = await proxy_factory(text)
    for path in ("/one", "/two"):  # the second goes over the pooled TLS connection
        resp = await get(app, path)
        assert (
            resp.status_code == 200
            and resp.text == f"stable {path} - 127.0.0.1:{app.plane.bound_port if app.plane else 0}"
        )
    assert (await get(app, "/c", {"x-canary": "always"})).text.startswith("canary GET /c")
    pool = next(p for p in app.plane.pools.pools.values() if p.endpoint.port == port) if app.plane else None
    assert pool is not None and pool.connects == 1 and pool.server_hostname == "localhost"


async def test_server_name_and_client_certificate(
    tmp_path: Path,
    tls_upstream: StartTLSUpstream,
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_factory: StartProxy,
) -> None:
    ca = CA(tmp_path / "pki")
    clients = CA(tmp_path / "clients", "client-ca")
    me = clients.issue("canary-proxy")
    # The certificate names only "api.internal" (no IP): SNI and verification use server_name.
    port = await tls_upstream("stable", ca.issue("api.internal", dns=["api.internal"], ips=()), clients.cert)
    canary = await upstream_factory("canary")
    tls = f"tls: {{ca: {ca.cert}, server_name: api.internal, cert: {me.cert}, key: {me.key}}}"
    app = await proxy_factory(
        config_text(f'"https://127.0.0.1:{port}"', canary.url).replace("version: v1}", f"version: v1, {tls}}}")
    )
    resp = await get(app, "/x")
    assert resp.status_code == 200 and resp.text.startswith("stable /x canary-proxy ")


async def test_wrong_certificate_gives_502_and_one_clear_line(
    tmp_path: Path,
    tls_upstream: StartTLSUpstream,
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_factory: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    ours = CA(tmp_path / "pki")
    theirs = CA(tmp_path / "other", "other-ca")
    port = await tls_upstream("stable", theirs.issue("localhost", dns=["localhost"]))
    canary = await upstream_factory("canary")
    text = (
        config_text(f'"https://localhost:{port}"', canary.url).replace(
            "version: v1}", f"version: v1, tls: {{ca: {ours.cert}}}}}"
        )
        + "retries: {attempts: 0}\n"
    )
    app = await proxy_factory(text)
    assert (await get(app, "/")).status_code == 502
    assert (await get(app, "/")).status_code == 502
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert lines == [
        f"upstream stable endpoint https://localhost:{port}: certificate verify failed: unable to get local issuer "
        "certificate; answered 502, counted as a connect failure"
    ]
    us = app.stats.upstreams["stable"]
    assert sum(us.errors) == 2  # the upstream's fault: the analysis sees it
    # verify: false accepts it (and says so in the config).
    text = text.replace(f"tls: {{ca: {ours.cert}}}", "tls: {verify: false}")
    app2 = await proxy_factory(text, name="insecure.yaml")
    assert (await get(app2, "/ok")).status_code == 200


async def test_wrong_name_is_refused(
    tmp_path: Path,
    tls_upstream: StartTLSUpstream,
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_factory: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ca = CA(tmp_path / "pki")
    port = await tls_upstream("stable", ca.issue("elsewhere.test", dns=["elsewhere.test"], ips=()))
    canary = await upstream_factory("canary")
    text = config_text(f'"https://127.0.0.1:{port}"', canary.url).replace(
        "version: v1}", f"version: v1, tls: {{ca: {ca.cert}}}}}"
    )
    app = await proxy_factory(text + "retries: {attempts: 0}\n")
    assert (await get(app, "/")).status_code == 502
    assert any("certificate verify failed: IP address mismatch" in r.getMessage() for r in caplog.records)


def test_upstream_context_takes_an_alpn_list(tmp_path: Path) -> None:
    """The HTTP/2 upstream leg asks for ["h2"]; verification stays on by default."""
    from proxy.config.model import UpstreamTLS

    ctx = upstream_context(UpstreamTLS(), alpn=["h2"])
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    off = upstream_context(UpstreamTLS(verify=False))
    assert off.verify_mode == ssl.CERT_NONE and not off.check_hostname
