"""End to end, against `python -m proxy run`: the rollout's decisions on latency and on changes.

Identical latency is never rolled back (the long test: 90 s), a 3x slower canary is, a hung canary
is rolled back within seconds while no GET waits for `timeouts.response` (its tries time out and go
to the baseline), a canary going bad mid-run is caught within the target, and so is a canary failing
every request at 2 req/s, with the shipped thresholds.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import ProxyProcess, Upstream, config_text
from tests.test_e2e_rollback import phase_is, status, wait_for

HALF = "  - name: default\n    split: {stable: 50, canary: 50}\n"
NINETY_TEN = "  - name: default\n    split: {stable: 90, canary: 10}\n"


@dataclass
class Behaviour:
    """How an upstream answers; the test flips it while traffic runs."""

    name: str
    median: float = 0.005
    sigma: float = 0.5
    scale: float = 1.0
    error_rate: float = 0.0
    hung: bool = False
    rng: random.Random = field(default_factory=lambda: random.Random(11))
    never: asyncio.Event = field(default_factory=asyncio.Event)

    async def handler(self, request: web.Request) -> web.StreamResponse:
        if self.hung:
            await self.never.wait()  # accepted and read, never answered
        delay = min(self.scale * self.median * math.exp(self.rng.gauss(0.0, self.sigma)), 2.0)
        await asyncio.sleep(delay)
        status = 500 if self.rng.random() < self.error_rate else 200
        return web.Response(status=status, text=f"{self.name}\n", headers={"X-Upstream": self.name})


class Load:
    """Open-loop GETs at `rate` per second; records (sent at, status, upstream, seconds waited)."""

    def __init__(self, port: int, rate: float) -> None:
        self.url = f"http://127.0.0.1:{port}/"
        self.rate = rate
        self.records: list[tuple[float, int, str, float]] = []
        self._task: asyncio.Task[None] | None = None

    async def _one(self, session: aiohttp.ClientSession) -> None:
        sent = time.time()
        try:
            async with session.get(self.url) as resp:
                await resp.read()
                self.records.append((sent, resp.status, resp.headers.get("X-Upstream", "?"), time.time() - sent))
        except (aiohttp.ClientError, TimeoutError):
            self.records.append((sent, 0, "error", time.time() - sent))

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), timeout=timeout) as session:
            pending: set[asyncio.Task[None]] = set()
            start = time.monotonic()
            sent = 0
            try:
                while True:
                    due = int((time.monotonic() - start) * self.rate)
                    for _ in range(due - sent):
                        t = asyncio.create_task(self._one(session))
                        pending.add(t)
                        t.add_done_callback(pending.discard)
                    sent = max(sent, due)
                    await asyncio.sleep(0.01)
            finally:
                if pending:
                    await asyncio.wait(pending, timeout=40)
                for t in pending:
                    t.cancel()

    def served(self, upstream: str, after: float = 0.0) -> int:
        return sum(1 for sent, _, up, _ in self.records if up == upstream and sent >= after)

    async def __aenter__(self) -> Load:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _true(value: bool) -> bool:
    return value


async def _healthy(port: int) -> dict[str, object] | None:
    """/status once the verdict is "healthy" (every check, the p99 one included, could judge)."""
    doc = await status(port)
    verdict = doc["rollout"].get("last_verdict") or {}
    return doc if verdict.get("result") == "healthy" else None


def rollout(extra: str = "") -> str:
    """The shipped thresholds (no `thresholds:` key), no steps: the split stays and is watched."""
    return "rollout:\n  canary: canary\n  baseline: stable\n  fast_fail: {consecutive_errors: 0}\n" + extra


async def _start(
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_process: Callable[..., ProxyProcess],
    routes: str,
    stable: Behaviour,
    canary: Behaviour,
    extra: str = "",
) -> ProxyProcess:
    s = await upstream_factory("stable", handler=stable.handler)
    c = await upstream_factory("canary", handler=canary.handler)
    return proxy_process(config_text(s.url, c.url, rollout(extra), routes=routes))


@pytest.mark.timeout(180)
async def test_identical_latency_is_never_rolled_back_in_90_seconds(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_process: Callable[..., ProxyProcess]
) -> None:
    """The issue's false rollback: same heavy-tailed latency (lognormal, median 20 ms, sigma 1), 50/50
    at 30 req/s. The old p99 comparison rolled this back within 90 s."""
    stable = Behaviour("stable", median=0.02, sigma=1.0, rng=random.Random(1))
    canary = Behaviour("canary", median=0.02, sigma=1.0, rng=random.Random(2))
    pp = await _start(upstream_factory, proxy_process, HALF, stable, canary)
    async with Load(pp.port, 30) as load:
        end = time.monotonic() + 90
        while time.monotonic() < end:
            doc = await status(pp.admin_port)
            assert doc["rollout"]["phase"] == "steady", doc["rollout"]
            await asyncio.sleep(0.5)
    doc = await status(pp.admin_port)
    assert doc["rollout"]["phase"] == "steady"
    verdict = doc["rollout"]["last_verdict"]
    assert verdict["result"] == "healthy", verdict  # the p99 check judged (and passed), not just held
    assert verdict["figures"]["p99_bound"] is not None and verdict["figures"]["z_p99"] is not None
    assert load.served("canary") > 1000 and not [r for r in load.records if r[1] != 200]


@pytest.mark.timeout(120)
async def test_three_times_slower_canary_is_rolled_back(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_process: Callable[..., ProxyProcess]
) -> None:
    stable = Behaviour("stable", median=0.01, sigma=0.5, rng=random.Random(3))
    canary = Behaviour("canary", median=0.01, sigma=0.5, rng=random.Random(4))
    pp = await _start(upstream_factory, proxy_process, HALF, stable, canary)
    async with Load(pp.port, 60) as load:
        await wait_for(lambda: _healthy(pp.admin_port), 40, "a healthy verdict")
        canary.scale = 3.0
        slowed = time.time()
        doc = await wait_for(lambda: phase_is(pp.admin_port, "rolled_back"), 40, "the latency rollback")
    reason = doc["rollout"]["reason"]
    assert "canary p99 above 1.5x baseline p99" in reason, reason
    figures = next(e for e in doc["events"] if e["kind"] == "rollback")["data"]
    assert figures["canary_slow"] > 0 and figures["p99_bound"] > 0 and figures["z_p99"] > figures["z_critical"]
    assert load.served("canary", after=slowed) < 3000


@pytest.mark.timeout(120)
async def test_hung_canary_is_rolled_back_within_seconds_and_no_get_waits(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_process: Callable[..., ProxyProcess]
) -> None:
    """The canary accepts and reads requests but never answers: its outstanding requests count as
    slow at once, and each GET's canary try times out (1 s floor) and is answered by the baseline."""
    stable = Behaviour("stable", rng=random.Random(5))
    canary = Behaviour("canary", rng=random.Random(6))
    pp = await _start(upstream_factory, proxy_process, NINETY_TEN, stable, canary)
    async with Load(pp.port, 100) as load:
        await wait_for(lambda: _healthy(pp.admin_port), 40, "a healthy verdict")
        canary.hung = True
        hung = time.time()
        doc = await wait_for(lambda: phase_is(pp.admin_port, "rolled_back"), 10, "the rollback", every=0.05)
        seen = time.time()
        # Requests in flight at the hang finish (on the baseline) before we look at the waits.
        await wait_for(lambda: _true(load.served("stable", after=seen + 2) > 50), 20, "traffic after the rollback")
    canary.never.set()
    assert seen - hung < 3.0
    event = next(e for e in doc["events"] if e["kind"] == "rollback")
    assert event["at"] - hung < 3.0
    assert event["data"]["canary_slow_in_flight"] > 0, event
    after = [r for r in load.records if r[0] >= hung]
    assert after and all(status == 200 for _, status, _, _ in after), [r for r in after if r[1] != 200][:5]
    assert max(wait for *_, wait in after) < 5.0  # timeouts.response is 30 s: nobody waited for it
    metrics_doc = await status(pp.admin_port)
    assert metrics_doc["rollout"]["phase"] == "rolled_back"


@pytest.mark.timeout(150)
async def test_mid_run_error_rise_is_caught_within_300_canary_requests(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_process: Callable[..., ProxyProcess]
) -> None:
    """1% -> 10% errors after a healthy run (90/10): judged on the evidence since the change."""
    stable = Behaviour("stable", error_rate=0.01, rng=random.Random(7))
    canary = Behaviour("canary", error_rate=0.01, rng=random.Random(8))
    pp = await _start(upstream_factory, proxy_process, NINETY_TEN, stable, canary)
    async with Load(pp.port, 150) as load:
        await wait_for(lambda: _healthy(pp.admin_port), 40, "a healthy verdict")
        await wait_for(lambda: _true(load.served("canary") > 600), 60, "a healthy minute's worth of canary traffic")
        canary.error_rate = 0.10
        changed = time.time()
        doc = await wait_for(lambda: phase_is(pp.admin_port, "rolled_back"), 60, "the rollback")
    at = next(e for e in doc["events"] if e["kind"] == "rollback")["at"]
    assert "canary error rate" in doc["rollout"]["reason"]
    caught_after = sum(1 for sent, _, up, _ in load.records if up == "canary" and changed <= sent <= at)
    # The simulation (loadtests/decision_quality.py) puts the median at 179 and the worst of 40 at 386.
    assert caught_after < 500, caught_after


@pytest.mark.timeout(150)
async def test_low_traffic_total_failure_is_caught_within_10_canary_requests(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_process: Callable[..., ProxyProcess]
) -> None:
    """2 req/s, 90/10, every canary request a 500, fast_fail off: min_requests (100) no longer
    shields it; the exact test needs 3 failures."""
    stable = Behaviour("stable", rng=random.Random(9))
    canary = Behaviour("canary", error_rate=1.0, rng=random.Random(10))
    pp = await _start(upstream_factory, proxy_process, NINETY_TEN, stable, canary)
    async with Load(pp.port, 2) as load:
        doc = await wait_for(lambda: phase_is(pp.admin_port, "rolled_back"), 120, "the rollback")
    at = next(e for e in doc["events"] if e["kind"] == "rollback")["at"]
    failed = sum(1 for sent, code, up, _ in load.records if up == "canary" and code == 500 and sent <= at)
    assert 1 <= failed < 10, failed
    assert "consecutive" not in doc["rollout"]["reason"]


@pytest.mark.timeout(60)
async def test_canary_try_timeout_sends_gets_to_the_baseline_and_keeps_posts_on_the_canary(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_process: Callable[..., ProxyProcess]
) -> None:
    """`rollout.canary_try_timeout`: an idempotent request whose canary try times out is answered by
    the baseline; a POST may have reached the application, so it keeps `timeouts.response` (504)."""
    stable = Behaviour("stable", rng=random.Random(12))
    canary = Behaviour("canary", hung=True, rng=random.Random(13))
    off = "  thresholds: {max_error_rate: null, max_error_rate_increase: null, max_p99_ratio: null}\n"
    routes = (
        "  - name: beta\n    match: {headers: {x-canary: {exact: always}}}\n    to: canary\n"
        "  - name: default\n    split: {stable: 100, canary: 0}\n"
    )
    extra = "  canary_try_timeout: 500ms\ntimeouts: {response: 3s}\n"
    pp = await _start(upstream_factory, proxy_process, routes, stable, canary, off + extra)
    url = f"http://127.0.0.1:{pp.port}/"
    async with aiohttp.ClientSession() as session:

        async def timed(method: str) -> tuple[int, str, float]:
            t = time.monotonic()
            async with session.request(method, url, headers={"x-canary": "always"}) as resp:
                await resp.read()
                return resp.status, resp.headers.get("X-Upstream", "-"), time.monotonic() - t

        # The controller sets the timeout on its first tick (within a second of the start).
        deadline = time.monotonic() + 10
        while True:
            code, up, took = await timed("GET")
            if (code, up) == (200, "stable") or time.monotonic() > deadline:
                break
        assert (code, up) == (200, "stable") and took < 2.0, (code, up, took)
        code, up, took = await timed("POST")
        assert code == 504 and took >= 2.5, (code, up, took)
    canary.never.set()
