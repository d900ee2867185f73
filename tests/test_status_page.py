"""The admin status page in headless Chromium, against the real proxy: it renders, and it shows a
rollback after one happens."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Upstream, config_text

ROLLOUT = """
rollout:
  canary: canary
  baseline: stable
  window: 10s
  min_requests: 20
"""


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is missing: `make system-deps` installs it")
    pytest.skip("no chromium here (apt-get install -y chromium)")


async def dump_dom(url: str, profile: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        chromium_path(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    return out.decode()


async def test_status_page_shows_a_rollback(upstream_factory, proxy_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stable: Upstream = await upstream_factory("stable")
    canary: Upstream = await upstream_factory("canary")
    app = await proxy_factory(config_text(stable.url, canary.url, extra=ROLLOUT))
    assert app.admin is not None
    admin = f"http://127.0.0.1:{app.admin.bound_port}"
    async with aiohttp.ClientSession() as session:
        for i in range(30):
            async with session.get(f"http://127.0.0.1:{app.plane.bound_port}/", headers={"x-user-id": str(i)}):
                pass

        before = await dump_dom(admin + "/", tmp_path / "p1")
        assert 'id="phase"' in before
        assert "steady" in before
        assert "rolled_back" not in before.split('id="phase"', 1)[1][:200]

        async with session.post(admin + "/rollout/rollback", json={"reason": "page test"}) as resp:
            assert resp.status == 200

    after = await dump_dom(admin + "/", tmp_path / "p2")
    phase_el = after.split('id="phase"', 1)[1][:300]
    assert "rolled_back" in phase_el
    events = after.split('id="events"', 1)[1]
    assert "rollback" in events
    assert "page test" in events
    # The routes panel shows the canary at 0%.
    assert 'id="routes"' in after
