"""REDbot (the HTTP linter) run on an upstream directly and through the proxy: the same findings,
except what the proxy documents adding (an intermediary: Via). Runs offline against loopback."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from conftest import Upstream, config_text

from proxy.control.app import ProxyApp

ProxyFactory = Callable[..., Awaitable[ProxyApp]]
UpFactory = Callable[..., Awaitable[Upstream]]

ROOT = Path(__file__).resolve().parent.parent
# `make redbot` installs it into a venv of its own (see the Makefile); a `redbot` on PATH works too.
REDBOT = shutil.which("redbot", path=str(ROOT / ".venv" / "redbot" / "bin")) or shutil.which("redbot")
pytestmark = pytest.mark.skipif(REDBOT is None, reason="redbot is not installed (make redbot)")

# What REDbot says only because a proxy is in the path (README "HTTP behaviour": Via).
DOCUMENTED = {"One or more intermediaries are present."}
PAGE = b"<!doctype html><title>t</title><p>" + b"hello " * 200


def notes(url: str) -> set[str]:
    assert REDBOT is not None
    out = subprocess.run([REDBOT, "-o", "text", url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    found = {line.strip()[2:] for line in out.stdout.splitlines() if line.strip().startswith("* ")}
    assert found, out.stdout  # REDbot said something: the comparison below means something
    return found


async def page(request: web.Request) -> web.StreamResponse:
    return web.Response(
        body=PAGE,
        content_type="text/html",
        headers={"Cache-Control": "max-age=60", "ETag": '"v1"', "Last-Modified": "Mon, 02 Nov 2026 10:00:00 GMT"},
    )


async def test_redbot_finds_the_same_through_the_proxy(
    upstream_factory: UpFactory, proxy_factory: ProxyFactory
) -> None:
    up = await upstream_factory("stable", handler=page)
    app = await proxy_factory(config_text(up.url, up.url))
    assert app.plane is not None
    direct = await asyncio.to_thread(notes, f"{up.url}/page")
    proxied = await asyncio.to_thread(notes, f"http://127.0.0.1:{app.plane.bound_port}/page")
    assert proxied - direct <= DOCUMENTED, proxied - direct
    assert direct - proxied == set(), direct - proxied


async def test_redbot_on_our_own_error_response(upstream_factory: UpFactory, proxy_factory: ProxyFactory) -> None:
    up = await upstream_factory("stable")
    routes = "  - name: only\n    match: {path_prefix: /app}\n    to: stable\n"
    app = await proxy_factory(config_text(up.url, up.url, routes=routes))
    assert app.plane is not None
    found = await asyncio.to_thread(notes, f"http://127.0.0.1:{app.plane.bound_port}/no-route")
    assert not [n for n in found if "Date" in n], found  # our 404 carries a correct Date
    assert not [n for n in found if "Content-Length" in n and "correct" not in n], found
