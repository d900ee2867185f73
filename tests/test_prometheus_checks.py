"""Prometheus checks against a REAL Prometheus server (the Debian `prometheus` binary), scraping a
tiny exporter this test controls: an empty result holds, a value within bounds lets the rollout
go on, a value out of bounds rolls back; a query that times out holds and, repeated, trips -
while the proxy keeps serving and the controller keeps ticking."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import free_port
from tests.test_e2e_rollback import admin, metrics, sample, wait_for
from tests.test_rollouts_e2e import (
    Load,
    ProxyFactory,
    UpstreamFactory,
    one_rollout_config,
    ports,
    rollout_doc,
    ticks,
    until,
)

pytestmark = pytest.mark.timeout(120)


class Exporter:
    """Serves `canary_test_latency_seconds{canary="canary"} <value>` (no series while value is None)."""

    def __init__(self) -> None:
        self.value: float | None = None
        self.scrapes = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        lines = ["# TYPE canary_test_latency_seconds gauge"]
        if self.value is not None:
            lines.append(f'canary_test_latency_seconds{{canary="canary"}} {self.value}')
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[tuple[str, Exporter]]:
    """A real Prometheus (1 s scrapes) on a free port scraping the exporter; yields (URL, exporter)."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: apt-get install -y prometheus (.ci/system-deps.sh installs it)")
    exporter = Exporter()
    await exporter.start()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: exporter\n    static_configs: [{{targets: ['127.0.0.1:{exporter.port}']}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        async def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
            try:
                async with aiohttp.ClientSession() as s, s.get(f"{url}/-/ready") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(ready, 30, "prometheus ready")
        await wait_for(lambda: _async(exporter.scrapes >= 1), 15, "the first scrape")
        yield url, exporter
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        assert exporter.runner is not None
        await exporter.runner.cleanup()


async def _async(value: bool) -> bool:
    return value


async def query(url: str, promql: str) -> list[object]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/api/v1/query", params={"query": promql}) as r:
        doc = await r.json()
    result: list[object] = doc["data"]["result"]
    return result


QUERY = 'max(canary_test_latency_seconds{canary="{canary}"})'


async def test_check_holds_on_empty_passes_then_trips_on_breach(
    prometheus: tuple[str, Exporter], upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    prom_url, exporter = prometheus
    stable = await upstream_factory("stable")
    canary = await upstream_factory("canary")
    rollout = (
        "  canary: canary\n  baseline: stable\n  interval: 1s\n  window: 4s\n  min_requests: 10\n"
        "  steps: [20, 30, 40, 50, 60, 70, 80, 90]\n"
        f"  checks: [{{name: latency, prometheus: '{prom_url}', query: '{QUERY}', max: 0.5, timeout: 2s}}]\n"
    )
    app = await proxy_factory(one_rollout_config(stable.url, canary.url, rollout))
    port, admin_port = ports(app)
    async with Load(port, rate=100):
        # Empty result: the check holds, so a healthy canary still does not move on.
        ro = await until(admin_port, "default", "an empty result", lambda ro: _check(ro)["detail"] == "empty result")
        assert _check(ro)["status"] == "hold"
        await until(admin_port, "default", "a held verdict", lambda ro: "check latency holds" in _reason(ro))
        assert (await rollout_doc(admin_port, "default"))["step"] == 0

        exporter.value = 0.1
        await wait_for(lambda: query(prom_url, QUERY.replace("{canary}", "canary")), 15, "the series in Prometheus")
        ro = await until(admin_port, "default", "steps once the check passes", lambda ro: ro["step"] >= 2)
        assert _check(ro)["status"] == "pass" and _check(ro)["value"] == pytest.approx(0.1)
        m = await metrics(admin_port)
        assert sample(m, "canary_proxy_analysis_check_value", rollout="default", check="latency") == pytest.approx(0.1)
        assert sample(m, "canary_proxy_analysis_check_status", rollout="default", check="latency", status="pass") == 1

        exporter.value = 2.0
        ro = await until(admin_port, "default", "the rollback", lambda ro: ro["phase"] == "rolled_back")
    assert ro["reason"] == "check latency: 2 > max 0.5", ro["reason"]


def _check(ro: dict[str, object]) -> dict[str, object]:
    checks = ro["checks"]
    assert isinstance(checks, list) and len(checks) == 1
    check = checks[0]
    assert isinstance(check, dict)
    return check


def _reason(ro: dict[str, object]) -> str:
    verdict = ro.get("last_verdict")
    return str(verdict.get("reason")) if isinstance(verdict, dict) else ""


async def test_query_timeouts_hold_then_trip_without_stalling_anything(
    prometheus: tuple[str, Exporter], upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    prom_url, exporter = prometheus
    exporter.value = 0.1  # the real Prometheus check passes; the hanging one decides

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        return web.Response(text="{}")

    slow = web.Application()
    slow.router.add_get("/api/v1/query", hang)
    runner = web.AppRunner(slow, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    slow_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        stable = await upstream_factory("stable")
        canary = await upstream_factory("canary")
        rollout = (
            "  canary: canary\n  baseline: stable\n  interval: 1s\n  window: 4s\n  min_requests: 10\n"
            "  steps: [20, 50]\n  checks:\n"
            f"    - {{name: real, prometheus: '{prom_url}', query: '{QUERY}', max: 0.5}}\n"
            f"    - {{name: slow, prometheus: '{slow_url}', query: up, max: 1, timeout: 300ms, failure_limit: 3}}\n"
        )
        app = await proxy_factory(one_rollout_config(stable.url, canary.url, rollout))
        port, admin_port = ports(app)
        async with Load(port, rate=100) as load:

            def slow_check(ro: dict[str, object]) -> dict[str, object]:
                checks = ro["checks"]
                assert isinstance(checks, list)
                found = [c for c in checks if isinstance(c, dict) and c["name"] == "slow"]
                return found[0]

            ro = await until(admin_port, "default", "a timed-out query", lambda ro: slow_check(ro)["failures"] == 1)
            assert slow_check(ro)["status"] == "hold" and "TimeoutError" in str(slow_check(ro)["detail"])
            assert ro["phase"] == "progressing" and ro["step"] == 0  # held, neither passed nor failed
            served = sum(load.served.values())
            started = time.monotonic()
            ro = await until(admin_port, "default", "the trip", lambda ro: ro["phase"] == "rolled_back")
            assert "check slow: query failed (3 in a row)" in str(ro["reason"])
            # Meanwhile the proxy kept serving: about 100 req/s, far above anything a stall would allow.
            elapsed = time.monotonic() - started
            assert sum(load.served.values()) - served > 30 * max(elapsed, 1.0) or elapsed < 0.5
            # A reset starts the checks afresh: the old failures do not trip the new start.
            code, body = await admin(admin_port, "POST", "/rollout/reset")
            assert code == 200 and body["phase"] == "progressing", body
            await ticks(admin_port, "default", 2)
            ro = await rollout_doc(admin_port, "default")
            assert ro["phase"] == "progressing" and int(str(slow_check(ro)["failures"])) < 3, ro
    finally:
        await runner.cleanup()
