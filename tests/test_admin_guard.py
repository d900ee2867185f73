"""An admin API a browser cannot be tricked into, and config errors without tracebacks (issue 12)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import ROOT, Upstream, config_text

from proxy.control.app import ProxyApp
from tests.test_admin import ROLLOUT, ROUTES, TOKEN, admin, fetch

StartProxy = Callable[..., Awaitable[ProxyApp]]
StartUpstream = Callable[..., Awaitable[Upstream]]


async def start(proxy_factory: StartProxy, upstream_factory: StartUpstream, extra: str = "") -> ProxyApp:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    return await proxy_factory(config_text(stable.url, canary.url, ROLLOUT + extra, ROUTES))


async def phase(app: ProxyApp) -> str:
    _, _, body = await fetch("GET", admin(app, "/status"))
    return str(json.loads(body)["rollout"]["phase"])


async def test_dns_rebinding_post_is_refused(proxy_factory: StartProxy, upstream_factory: StartUpstream) -> None:
    app = await start(proxy_factory, upstream_factory)
    assert app.admin is not None
    port = app.admin.bound_port
    # The attacker's page at http://rebind.attacker.example:PORT: Origin and Host agree, the name is theirs.
    evil = {"Host": f"rebind.attacker.example:{port}", "Origin": f"http://rebind.attacker.example:{port}"}
    code, _, body = await fetch("POST", admin(app, "/rollout/promote"), headers=evil)
    assert code == 403 and "Host" in json.loads(body)["error"], body
    assert await phase(app) == "progressing"
    # Same without Origin (a form POST from a rebound page still carries Host).
    code, _, _ = await fetch("POST", admin(app, "/rollout/promote"), headers={"Host": evil["Host"]})
    assert code == 403
    # The listener's own address, loopback names and IP literals work.
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        code, _, body = await fetch("POST", admin(app, "/rollout/pause"), headers={"Host": host})
        assert code == 200, body
        code, _, body = await fetch("POST", admin(app, "/rollout/resume"), headers={"Host": host})
        assert code == 200, body


async def test_admin_hosts_names_are_accepted(proxy_factory: StartProxy, upstream_factory: StartUpstream) -> None:
    app = await start(proxy_factory, upstream_factory, "admin_hosts: [proxy-1.example.internal]\n")
    code, _, body = await fetch("POST", admin(app, "/rollout/pause"), headers={"Host": "proxy-1.example.internal:9901"})
    assert code == 200, body
    code, _, _ = await fetch("POST", admin(app, "/rollout/resume"), headers={"Host": "proxy-2.example.internal"})
    assert code == 403


async def test_cross_site_referer_without_origin_is_refused(
    proxy_factory: StartProxy, upstream_factory: StartUpstream
) -> None:
    app = await start(proxy_factory, upstream_factory)
    code, _, body = await fetch("POST", admin(app, "/rollout/promote"), headers={"Referer": "https://evil.example/x"})
    assert code == 403 and "Referer" in json.loads(body)["error"], body
    assert await phase(app) == "progressing"
    code, _, body = await fetch("POST", admin(app, "/rollout/pause"), headers={"Referer": admin(app, "/")})
    assert code == 200, body  # the status page itself


async def test_bad_token_bytes_and_nested_reason_are_json_4xx(
    proxy_factory: StartProxy, upstream_factory: StartUpstream
) -> None:
    app = await start(proxy_factory, upstream_factory, f"admin_token: {TOKEN}\n")
    assert app.admin is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", app.admin.bound_port)
    writer.write(
        b"POST /rollout/promote HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\xc3(\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 401"), raw[:200]
    assert b"Traceback" not in raw

    nested = "[" * 30_000 + "]" * 30_000
    body = '{"reason": ' + nested + "}"
    assert len(body) <= 64 * 1024
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    code, headers, text = await fetch("POST", admin(app, "/rollout/pause"), data=body, headers=auth)
    assert code == 400 and headers["Content-Type"].startswith("application/json"), (code, text[:200])
    code, headers, text = await fetch("POST", admin(app, "/rollout/pause"), data="x" * 70_000, headers=auth)
    assert code == 413 and json.loads(text)["ok"] is False
    code, headers, text = await fetch("GET", admin(app, "/nope"))
    assert code == 404 and json.loads(text)["ok"] is False


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**{k: v for k, v in os.environ.items() if k != "CANARY_PROXY_ADMIN_TOKEN"}, **(env or {})},
    )


BASE = (
    "listen: 127.0.0.1:0\nupstreams:\n  stable: {endpoints: [http://127.0.0.1:9]}\n"
    "routes:\n  - name: d\n    to: stable\n"
)


def test_open_admin_without_token_refuses_to_start(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BASE + "admin: 0.0.0.0:0\n")
    done = run_cli("run", "-c", str(cfg))
    assert done.returncode == 1
    assert "no admin token is set" in done.stderr and "Traceback" not in done.stderr, done.stderr
    # validate says so too (as a warning: `run` may get the token from its environment)
    done = run_cli("validate", "-c", str(cfg))
    assert done.returncode == 0 and "refuses this without a token" in done.stderr


def test_admin_insecure_starts_with_a_warning(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BASE + "admin: 0.0.0.0:0\nadmin_insecure: true\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "-c", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "listening on" in line:
                break
        assert any("admin_insecure is true" in line for line in lines), lines
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("listen: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("listen: 1" + "0" * 5000 + "\n", "listen: invalid value: Exceeds the limit (4300 digits)"),
        (BASE + "x-obj: !!python/object:os.system {a: 1}\n", "unknown or unsupported YAML tag"),
        (
            "x-a: &a {" + ", ".join(f"k{i}: 1" for i in range(50)) + "}\n"
            + "".join(f"x-{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else '*a'] * 9)}]\n" for i in range(8))
            + BASE,
            "too many nodes",
        ),
    ],
)
def test_config_errors_are_one_line_without_traceback(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    for verb in ("validate", "run"):
        t0 = time.monotonic()
        done = run_cli(verb, "-c", str(cfg))
        assert time.monotonic() - t0 < 20  # an alias bomb would take minutes; generous for a busy machine
        assert done.returncode == 1, (verb, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        assert needle in done.stderr, (verb, done.stderr[-2000:])
