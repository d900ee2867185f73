"""The admin listener against a real ProxyApp, real upstreams and a real HTTP client."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Upstream, config_text

from proxy.config import parse_config
from proxy.control.app import ProxyApp

StartProxy = Callable[..., Awaitable[ProxyApp]]
StartUpstream = Callable[..., Awaitable[Upstream]]

ROUTES = (
    "  - name: beta\n    match: {headers: {x-canary: {exact: always}}}\n    to: canary\n"
    "  - name: default\n    split: {stable: 90, canary: 10}\n    sticky: {header: x-user-id}\n"
)
ROLLOUT = "rollout:\n  canary: canary\n  baseline: stable\n  steps: [5, 25, 50]\n  interval: 1h\n"
TOKEN = "s3cret-admin-token"


def admin(app: ProxyApp, path: str) -> str:
    assert app.admin is not None
    return f"http://127.0.0.1:{app.admin.bound_port}{path}"


def data(app: ProxyApp, path: str) -> str:
    assert app.plane is not None
    return f"http://127.0.0.1:{app.plane.bound_port}{path}"


async def fetch(method: str, url: str, **kw: Any) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as s, s.request(method, url, **kw) as r:
        return r.status, dict(r.headers), await r.text()


@pytest.fixture
async def pair(upstream_factory: StartUpstream) -> tuple[Upstream, Upstream]:
    return await upstream_factory("stable"), await upstream_factory("canary")


async def start(proxy_factory: StartProxy, pair: tuple[Upstream, Upstream], extra: str = ROLLOUT) -> ProxyApp:
    stable, canary = pair
    return await proxy_factory(config_text(stable.url, canary.url, extra, ROUTES))


async def test_separate_listener_with_real_ports(
    proxy_factory: StartProxy, pair: tuple[Upstream, Upstream]
) -> None:
    app = await start(proxy_factory, pair)
    assert app.admin is not None and app.plane is not None
    assert app.admin.bound_port > 0 and app.plane.bound_port > 0
    assert app.admin.bound_port != app.plane.bound_port
    status, _, body = await fetch("GET", admin(app, "/healthz"))
    assert (status, body) == (200, "ok")
    # The data port routes /status to an upstream like any other path: admin is not reachable there.
    status, headers, body = await fetch("GET", data(app, "/status"))
    assert status == 200 and headers["X-Upstream"] in ("stable", "canary")
    assert body.startswith(("stable GET /status", "canary GET /status"))


async def test_readyz_ready_then_503_while_draining(
    proxy_factory: StartProxy, pair: tuple[Upstream, Upstream]
) -> None:
    app = await start(proxy_factory, pair)
    assert app.plane is not None
    status, _, body = await fetch("GET", admin(app, "/readyz"))
    assert (status, body) == (200, "ready")
    assert await app.plane.drain(0.5)  # what SIGTERM does first; admin stays up meanwhile
    status, _, body = await fetch("GET", admin(app, "/readyz"))
    assert (status, body) == (503, "draining")
    status, _, text = await fetch("GET", admin(app, "/status"))
    assert status == 200 and '"draining": true' in text


async def test_method_and_path_errors(proxy_factory: StartProxy, pair: tuple[Upstream, Upstream]) -> None:
    app = await start(proxy_factory, pair)
    for path in ("/rollout/pause", "/rollout/promote", "/config/reload"):
        status, headers, _ = await fetch("GET", admin(app, path))
        assert status == 405, path
        assert headers["Allow"] == "POST"
    assert (await fetch("GET", admin(app, "/nope")))[0] == 404
    assert (await fetch("POST", admin(app, "/rollout/explode")))[0] == 404
    assert (await fetch("POST", admin(app, "/status")))[0] == 405


async def test_token_required_for_posts_only(
    proxy_factory: StartProxy, pair: tuple[Upstream, Upstream]
) -> None:
    app = await start(proxy_factory, pair, ROLLOUT + f"admin_token: {TOKEN}\n")
    assert app.controller is not None and app.controller.state is not None
    url = admin(app, "/rollout/pause")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        status, got, body = await fetch("POST", url, headers=headers)
        assert status == 401, headers
        assert got["WWW-Authenticate"].startswith("Bearer")
        assert '"ok": false' in body
    assert app.controller.state.phase == "progressing"  # nothing happened
    status, _, body = await fetch("POST", url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, body
    assert app.controller.state.phase == "paused"
    # Another site's page in an operator's browser cannot post, token or not.
    evil = {"Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"}
    assert (await fetch("POST", admin(app, "/rollout/resume"), headers=evil))[0] == 403
    assert app.controller.state.phase == "paused"
    same = {"Authorization": f"Bearer {TOKEN}", "Origin": admin(app, "")}
    assert (await fetch("POST", admin(app, "/rollout/resume"), headers=same))[0] == 200
    assert app.controller.state.phase == "progressing"
    # GETs stay open: probes and Prometheus have no token.
    assert (await fetch("GET", admin(app, "/status")))[0] == 200
    assert (await fetch("GET", admin(app, "/metrics")))[0] == 200


async def test_rollout_commands_change_routing(
    proxy_factory: StartProxy, pair: tuple[Upstream, Upstream]
) -> None:
    app = await start(proxy_factory, pair)

    async def post(cmd: str, **kw: Any) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.post(admin(app, f"/rollout/{cmd}"), **kw) as r:
            return r.status, await r.json()

    status, ro = await post("pause", json={"reason": "looking at dashboards"})
    assert status == 200 and ro["phase"] == "paused" and ro["canary_weight"] == 5.0
    status, ro = await post("resume")
    assert status == 200 and ro["phase"] == "progressing"
    status, ro = await post("rollback", params={"reason": "bad deploy"})
    assert status == 200 and ro["phase"] == "rolled_back" and ro["canary_weight"] == 0.0
    assert ro["reason"] == "manual rollback: bad deploy"
    # The beta route's canary target now goes to the baseline.
    status, headers, _ = await fetch("GET", data(app, "/x"), headers={"x-canary": "always"})
    assert (status, headers["X-Upstream"]) == (200, "stable")
    status, err = await post("resume")
    assert status == 409 and "reset first" in err["error"] and err["rollout"]["phase"] == "rolled_back"
    status, ro = await post("reset")
    assert status == 200 and ro["phase"] == "progressing" and ro["step"] == 0
    status, ro = await post("promote?full=1")
    assert status == 200 and ro["phase"] == "promoted" and ro["canary_weight"] == 100.0
    async with aiohttp.ClientSession() as s, s.get(admin(app, "/status")) as r:
        doc = await r.json()
    assert [e["kind"] for e in doc["events"]] == ["paused", "resumed", "rollback", "reset", "promoted"]
    assert doc["routes"][1]["weights"] == {"stable": 0.0, "canary": 100.0}
    status, _, _ = await fetch("POST", admin(app, "/rollout/pause"), data=b"{not json")
    assert status == 400


async def test_rollout_command_without_rollout_is_409(
    proxy_factory: StartProxy, pair: tuple[Upstream, Upstream]
) -> None:
    app = await start(proxy_factory, pair, extra="")
    async with aiohttp.ClientSession() as s, s.post(admin(app, "/rollout/promote")) as r:
        assert r.status == 409
        assert (await r.json()) == {"ok": False, "error": "no rollout is configured"}


async def test_config_reload(proxy_factory: StartProxy, pair: tuple[Upstream, Upstream]) -> None:
    app = await start(proxy_factory, pair)
    path = Path(app.config.source_path)
    old_hash = app.config.source_hash
    path.write_text(path.read_text().replace("steps: [5, 25, 50]", "steps: [5, 20, 50]"))
    async with aiohttp.ClientSession() as s:
        async with s.post(admin(app, "/config/reload")) as r:
            assert r.status == 200
            body = await r.json()
        assert body["ok"] is True and body["hash"] == app.config.source_hash != old_hash
        assert app.config.rollout is not None and app.config.rollout.steps == (5.0, 20.0, 50.0)

        path.write_text(path.read_text().replace("to: canary", "to: nowhere"))
        async with s.post(admin(app, "/config/reload")) as r:
            assert r.status == 422
            body = await r.json()
        assert body["ok"] is False and "routes" in body["error"] and "nowhere" in body["error"]
        async with s.get(admin(app, "/status")) as r:
            doc = await r.json()
    assert doc["config"]["last_error"] == body["error"]
    assert doc["config"]["hash"] == app.config.source_hash  # the old config keeps serving
    assert app.stats.reloads == {"success": 1, "failure": 1}


async def test_reload_of_inline_config_is_400(pair: tuple[Upstream, Upstream]) -> None:
    stable, canary = pair
    app = ProxyApp(parse_config(config_text(stable.url, canary.url, ROLLOUT, ROUTES)), watch=False)
    await app.start()
    try:
        status, _, body = await fetch("POST", admin(app, "/config/reload"))
        assert status == 400 and "not loaded from a file" in body
    finally:
        await app.stop()


async def test_status_page(proxy_factory: StartProxy, pair: tuple[Upstream, Upstream]) -> None:
    app = await start(proxy_factory, pair)
    status, headers, body = await fetch("GET", admin(app, "/"))
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "<html" in body.lower()


async def test_admin_stop_frees_port(proxy_factory: StartProxy, pair: tuple[Upstream, Upstream]) -> None:
    app = await start(proxy_factory, pair)
    assert app.admin is not None
    url = admin(app, "/healthz")
    await app.admin.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await fetch("GET", url)
    app.admin = None  # already stopped; the fixture's app.stop() must not stop it twice
