"""build_status() and the admin CLI verbs (`status`, `promote`, ...) against a running proxy."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from conftest import ROOT, Upstream, config_text, free_port

from proxy import native
from proxy.cli.admin import describe_rollout, format_status
from proxy.cli.main import main
from proxy.control.app import ProxyApp
from proxy.control.status import build_status

StartProxy = Callable[..., Awaitable[ProxyApp]]
StartUpstream = Callable[..., Awaitable[Upstream]]

ROUTES = (
    "  - name: beta-testers\n    match: {headers: {user-type: {exact: beta-tester}}}\n    to: canary\n"
    "  - name: default\n    split: {stable: 95, canary: 5}\n    sticky: {header: x-user-id}\n"
)
ROLLOUT = "rollout:\n  canary: canary\n  baseline: stable\n  steps: [5, 10, 25, 50, 100]\n  interval: 1h\n"
TOKEN = "cli-token-123"


@pytest.fixture
async def app(proxy_factory: StartProxy, upstream_factory: StartUpstream) -> ProxyApp:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    return await proxy_factory(config_text(stable.url, canary.url, ROLLOUT, ROUTES))


def admin_url(app: ProxyApp) -> str:
    assert app.admin is not None
    return f"http://127.0.0.1:{app.admin.bound_port}"


async def cli(*argv: str) -> int:
    """Run `canary-proxy ARGV` in a thread: the CLI blocks, the proxy serves on this loop."""
    return await asyncio.to_thread(main, list(argv))


async def send(app: ProxyApp, n: int, **headers: str) -> None:
    assert app.plane is not None
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(f"http://127.0.0.1:{app.plane.bound_port}/", headers=headers) as r:
                assert r.status == 200


async def test_status_shape(app: ProxyApp) -> None:
    await send(app, 4, **{"user-type": "beta-tester"})
    doc = build_status(app)
    assert set(doc) == {
        "version", "hot_path", "draining", "now", "config", "upstreams", "routes", "rollout", "rollouts", "events"
    }
    assert doc["hot_path"] == native.state()
    assert doc["version"] == "0.1.0" and doc["draining"] is False
    assert set(doc["config"]) == {"hash", "path", "loaded_at", "last_error", "last_error_at"}
    assert doc["config"]["hash"] == app.config.source_hash and doc["config"]["path"] == app.config.source_path
    canary = doc["upstreams"]["canary"]
    assert {"version", "endpoints", "ejected", "window"} <= set(canary)
    assert canary["version"] == "v2" and canary["ejected"] == []
    assert canary["endpoints"] == [f"127.0.0.1:{ep.port}" for ep in app.config.upstreams["canary"].endpoints]
    window = canary["window"]
    assert {"requests", "errors", "error_rate", "rps", "p50", "p95", "p99"} <= set(window)
    assert window["requests"] == 4 and window["errors"] == 0 and window["error_rate"] == 0.0
    assert window["rps"] == pytest.approx(4 / 60)
    assert 0 < window["p50"] <= window["p95"] <= window["p99"]
    assert doc["upstreams"]["stable"]["window"]["p99"] is None  # no traffic: no quantile
    assert doc["routes"] == [
        {"name": "beta-testers", "to": "canary", "effective_to": "canary", "weights": None, "sticky": None},
        {
            "name": "default",
            "to": None,
            "effective_to": None,
            "weights": {"stable": 95.0, "canary": 5.0},
            "sticky": "header:x-user-id",
        },
    ]
    ro = doc["rollout"]
    assert {
        k: ro[k] for k in ("canary", "baseline", "phase", "step", "steps", "canary_weight", "reason")
    } == {
        "canary": "canary",
        "baseline": "stable",
        "phase": "progressing",
        "step": 0,
        "steps": [5.0, 10.0, 25.0, 50.0, 100.0],
        "canary_weight": 5.0,
        "reason": None,
    }
    assert isinstance(ro["step_started_at"], float)
    json.dumps(doc)  # JSON-ready as is
    assert app.controller is not None
    app.controller.evaluate()  # one analysis tick: too few requests, but a verdict all the same
    app.controller.command("rollback", "from the test")
    doc = build_status(app)
    verdict = doc["rollout"]["last_verdict"]
    assert verdict["result"] == "insufficient_data" and "need 100" in verdict["reason"]
    assert {"result", "reason", "at"} <= set(verdict) and verdict["figures"]["canary_requests"] == 4
    assert doc["routes"][0]["effective_to"] == "stable"
    assert doc["routes"][1]["weights"] == {"stable": 100.0, "canary": 0.0}
    event = doc["events"][-1]
    assert set(event) == {"at", "kind", "message", "data"} and event["kind"] == "rollback"


async def test_status_command_table(app: ProxyApp, capsys: pytest.CaptureFixture[str]) -> None:
    await send(app, 3)
    assert await cli("status", "--admin", admin_url(app)) == 0
    out = capsys.readouterr().out
    assert f"Config:        {app.config.source_hash}" in out
    assert "Status:        ◌ Progressing" in out or "Status:        ~ Progressing" in out
    assert "Step:          1/5" in out
    assert "Canary weight: 5%" in out
    for section in ("ROUTES", "UPSTREAMS (last 60s)", "EVENTS"):
        assert f"\n{section}\n" in out
    assert "beta-testers" in out and "header:x-user-id" in out and "stable 95%, canary 5%" in out
    stable_row = next(line for line in out.splitlines() if line.strip().startswith("stable "))
    assert stable_row.split()[:4] == ["stable", "v1", "1/1", "up"]


async def test_status_json(app: ProxyApp, capsys: pytest.CaptureFixture[str]) -> None:
    assert await cli("status", "--json", "--admin", admin_url(app)) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rollout"]["phase"] == "progressing" and doc["config"]["hash"] == app.config.source_hash


async def test_rollout_verbs(app: ProxyApp, capsys: pytest.CaptureFixture[str]) -> None:
    assert app.controller is not None
    url = admin_url(app)
    steps = [
        ("pause", "paused"),
        ("resume", "progressing"),
        ("rollback", "rolled_back"),
        ("reset", "progressing"),
        ("promote", "promoted"),
    ]
    for verb, phase in steps:
        full = ["--full"] if verb == "promote" else []  # plain promote takes one step
        assert await cli(verb, "--admin", url, "--reason", f"test {verb}", *full) == 0, verb
        state = app.controller.state
        assert state is not None and state.phase == phase, verb
        assert capsys.readouterr().out.startswith(f"{verb}: canary canary is {phase.replace('_', ' ')}")
    assert await cli("pause", "--admin", url) == 1  # cannot pause a promoted rollout
    err = capsys.readouterr().err
    assert "409" in err and "cannot pause" in err
    messages = [e.message for e in app.controller.events]
    assert any("test rollback" in m for m in messages)


async def test_unreachable_admin_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert await cli("status", "--admin", url, "--timeout", "2") == 1
    assert f"cannot reach the admin API at {url}" in capsys.readouterr().err
    assert await cli("promote", "--admin", url, "--timeout", "2") == 1


async def test_token_from_config_file_and_env(
    proxy_factory: StartProxy,
    upstream_factory: StartUpstream,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    app = await proxy_factory(
        config_text(stable.url, canary.url, ROLLOUT + f"admin_token: {TOKEN}\n", ROUTES)
    )
    monkeypatch.delenv("CANARY_PROXY_ADMIN_TOKEN", raising=False)
    url = admin_url(app)
    assert await cli("pause", "--admin", url) == 1
    err = capsys.readouterr().err
    assert "401" in err and "--token" in err
    assert await cli("pause", "--admin", url, "--token", "wrong") == 1
    capsys.readouterr()
    # -c: the admin address comes from the file, which says port 0; so point --admin at the real one
    # and let the token come from the file.
    assert await cli("pause", "-c", app.config.source_path, "--admin", url) == 0
    monkeypatch.setenv("CANARY_PROXY_ADMIN_TOKEN", TOKEN)
    assert await cli("resume", "--admin", url) == 0
    state = app.controller.state if app.controller else None
    assert state is not None and state.phase == "progressing"
    assert await cli("status", "-c", "/nonexistent/canary.yaml") == 1
    assert "cannot read /nonexistent/canary.yaml" in capsys.readouterr().err


async def test_python_m_proxy_status_subprocess(app: ProxyApp) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "status",
        "--admin",
        admin_url(app),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONIOENCODING": "ascii"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    text = out.decode("ascii")  # an ASCII terminal gets ASCII symbols, not an encoding error
    assert "Status:        ~ Progressing" in text and "(None)" not in text


def test_format_status_rolled_back_ascii() -> None:
    doc: dict[str, Any] = {
        "version": "0.1.0",
        "draining": True,
        "now": 1000.0,
        "config": {
            "hash": "abc",
            "path": "/etc/c.yaml",
            "loaded_at": 900.0,
            "last_error": "routes[0].to: unknown upstream",
            "last_error_at": 990.0,
        },
        "upstreams": {
            "stable": {
                "version": None,
                "endpoints": ["a:1", "b:2"],
                "ejected": ["b:2"],
                "window": {
                    "seconds": 30.0,
                    "requests": 200,
                    "errors": 3,
                    "error_rate": 0.015,
                    "rps": 6.67,
                    "p50": 0.004,
                    "p95": 0.02,
                    "p99": 1.5,
                },
            }
        },
        "routes": [
            {"name": "beta", "to": "canary", "effective_to": "stable", "weights": None, "sticky": None}
        ],
        "rollout": {
            "canary": "canary",
            "baseline": "stable",
            "phase": "rolled_back",
            "step": 2,
            "steps": [5, 10, 25],
            "canary_weight": 0.0,
            "step_started_at": 950.0,
            "reason": "error rate 12% > 5%",
            "last_verdict": {"result": "breach", "reason": "error rate 12% > 5%", "at": 995.0},
        },
        "events": [{"at": 900.0 + i, "kind": f"k{i}", "message": f"m{i}", "data": {}} for i in range(8)],
    }
    text = format_status(doc, ascii_only=True)
    text.encode("ascii")
    assert "Draining:" in text
    assert "x last reload failed 10s ago: routes[0].to: unknown upstream" in text
    assert "Status:        x Rolled back" in text
    assert "Step:          3/3  (5 -> 10 -> [25])" in text
    assert "Last verdict:  x breach: error rate 12% > 5% (5s ago)" in text
    assert "Reason:        error rate 12% > 5%" in text
    assert "canary -> stable" in text
    assert "1/2 up" in text and "3 (1.5%)" in text and "4.0ms" in text and "1.50s" in text
    assert "UPSTREAMS (last 30s)" in text
    events = text.split("\nEVENTS\n")[1].splitlines()
    assert [line.split()[1] for line in events[1:]] == ["k7", "k6", "k5", "k4", "k3"]  # newest 5 first
    assert (
        describe_rollout(doc["rollout"]) == "canary canary is rolled back (weight 0%) - error rate 12% > 5%"
    )
    assert describe_rollout(None) == "no rollout configured"


async def test_config_file_gives_address_and_token(
    proxy_process: Callable[..., Any],
    upstream_factory: StartUpstream,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real `canary-proxy run` process; `-c FILE` alone finds its admin port and token."""
    monkeypatch.delenv("CANARY_PROXY_ADMIN_TOKEN", raising=False)
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    text = config_text(stable.url, canary.url, ROLLOUT + f"admin_token: {TOKEN}\n", ROUTES)
    pp = await asyncio.to_thread(proxy_process, text)
    path = str(pp.config)
    assert await cli("pause", "-c", path) == 0
    assert "is paused" in capsys.readouterr().out
    assert await cli("status", "-c", path) == 0
    out = capsys.readouterr().out
    assert f"at http://127.0.0.1:{pp.admin_port}" in out and "Paused" in out


def test_admin_url_for_wildcards() -> None:
    from proxy.config import parse_config
    from proxy.control.status import admin_url as url_for

    base = (
        "listen: 127.0.0.1:8080\nupstreams:\n  a: {endpoints: [http://127.0.0.1:1]}\n"
        "routes:\n  - {name: r, to: a}\n"
    )
    assert url_for(parse_config(base + "admin: 0.0.0.0:9901\n")) == "http://127.0.0.1:9901"
    assert url_for(parse_config(base + "admin: '[::]:9901'\n")) == "http://[::1]:9901"
    assert url_for(parse_config(base + "admin: 10.1.2.3:9000\n")) == "http://10.1.2.3:9000"
    assert url_for(parse_config(base)) == "http://127.0.0.1:9901"


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"], ["promote", "--help"]])
def test_help_renders(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: canary-proxy" in out
    if argv == ["--help"]:
        for verb in ("status", "promote", "rollback", "pause", "resume", "reset"):
            assert verb in out
