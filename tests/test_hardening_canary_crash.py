"""The canary process dies (SIGKILL) under load with the rollout on. Everything is real: the proxy
(`python -m proxy run`), the canary (its own process), the baseline, the clients.

Expected: GET traffic sees zero failed requests (the canary's failures are retried on the
baseline), the automatic rollback trips, and the state file records it. The figures (requests,
failures, time to rollback) are printed for the report."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from conftest import ProxyProcess, Upstream, config_text, free_port, wait_until

pytestmark = pytest.mark.timeout(40)

CANARY_SERVER = """
import sys
from aiohttp import web

async def handle(request):
    return web.Response(text="canary ok\\n", headers={"X-Upstream": "canary"})

app = web.Application()
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""
WORKERS = 16


def listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def admin_status(session: aiohttp.ClientSession, pp: ProxyProcess) -> dict[str, object]:
    async with session.get(f"http://127.0.0.1:{pp.admin_port}/status") as r:
        doc: dict[str, object] = await r.json()
        return doc


async def test_canary_killed_under_load_no_failed_get_and_rollback(
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_process: Callable[..., ProxyProcess],
    tmp_path: Path,
) -> None:
    stable = await upstream_factory("stable")
    port = free_port()
    canary = subprocess.Popen([sys.executable, "-c", CANARY_SERVER, str(port)], start_new_session=True)
    try:
        await wait_until(lambda: listening(port), timeout=15, what="canary process listening")
        state_file = tmp_path / "state.json"
        rollout = (
            "rollout:\n  canary: canary\n  baseline: stable\n  window: 10s\n  min_requests: 50\n"
            f"  fast_fail: {{consecutive_errors: 5}}\n  state_file: {state_file}\n"
        )
        routes = "  - name: default\n    split: {stable: 80, canary: 20}\n"
        pp = proxy_process(config_text(stable.url, f"http://127.0.0.1:{port}", rollout, routes=routes))
        results: Counter[tuple[str, int | str]] = Counter()
        stop = asyncio.Event()

        async def worker(session: aiohttp.ClientSession) -> None:
            while not stop.is_set():
                try:
                    async with session.get(f"http://127.0.0.1:{pp.port}/") as r:
                        await r.read()
                        results[(r.headers.get("X-Upstream", "?"), r.status)] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    results[("error", type(exc).__name__)] += 1

        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=WORKERS), timeout=timeout) as session,
            aiohttp.ClientSession(timeout=timeout) as admin_session,
        ):
            tasks = [asyncio.create_task(worker(session)) for _ in range(WORKERS)]
            try:
                await wait_until(lambda: results[("canary", 200)] >= 200, timeout=20, what="canary traffic")
            except AssertionError:
                stop.set()
                await asyncio.gather(*tasks)
                raise AssertionError(f"{dict(results)}\n{''.join(pp.lines[-20:])}") from None
            before = sum(results.values())
            os.kill(canary.pid, signal.SIGKILL)
            killed = time.monotonic()
            phase = ""
            deadline = killed + 20
            while time.monotonic() < deadline:
                doc = await admin_status(admin_session, pp)
                rollout = doc["rollout"]
                assert isinstance(rollout, dict)
                phase = rollout["phase"]
                if phase == "rolled_back":
                    break
                await asyncio.sleep(0.02)
            to_rollback = time.monotonic() - killed
            n_at_rollback = sum(results.values())
            await asyncio.sleep(1.0)  # traffic goes on after the rollback
            stop.set()
            await asyncio.gather(*tasks)
        total = sum(results.values())
        failed = total - results[("stable", 200)] - results[("canary", 200)]
        print(
            f"\ncanary crash: {total} GETs ({before} before the kill, {n_at_rollback - before} between kill and"
            f" rollback), {failed} failed, rollback {to_rollback * 1000:.0f} ms after SIGKILL; {dict(results)}"
        )
        assert phase == "rolled_back"
        assert failed == 0, dict(results)
        saved = json.loads(state_file.read_text())
        assert saved["phase"] == "rolled_back" and "canary" in json.dumps(saved)
        retries = await_metric(pp, "canary_proxy_retries_total")
        assert retries.get("stable", 0) >= 1  # the failures were absorbed by retries on the baseline
    finally:
        if canary.poll() is None:
            canary.kill()
        canary.wait(timeout=10)


def await_metric(pp: ProxyProcess, family: str) -> dict[str, float]:
    """A per-upstream counter from the process's /metrics, by upstream."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{pp.admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(family + "{"):
            labels, value = line.rsplit(" ", 1)
            upstream = labels.split('upstream="', 1)[1].split('"', 1)[0]
            out[upstream] = float(value)
    return out
