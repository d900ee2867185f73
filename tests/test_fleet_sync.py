"""Fleet mode against a real redis-server and real proxy processes: replicas step together, pool
their evidence, follow a rollback made on any of them within a second, and survive a leader kill
with no step repeated or skipped."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import ProxyProcess, Upstream
from tests.fleet_support import (
    RedisServer,
    Traffic,
    fleet_config,
    get_json,
    leader_of,
    metric,
    needs_redis,
    poll,
    post,
    redis_server,
    rollout,
    split_weight,
)

pytestmark = [needs_redis, pytest.mark.timeout(120)]
__all__ = ["redis_server"]  # the fixture, imported for pytest

STEPS = "[10, 20, 30, 40, 50]"
StartProxy = Callable[..., ProxyProcess]
StartUpstream = Callable[..., Awaitable[Upstream]]


async def start_replicas(
    proxy_process: StartProxy, server: RedisServer, stable: str, canary: str, spec: str, n: int = 3, **kw: str
) -> list[ProxyProcess]:
    procs = [
        await asyncio.to_thread(
            proxy_process, fleet_config(stable, canary, server.url, f"r{i}", spec, **kw), name=f"r{i}.yaml"
        )
        for i in range(1, n + 1)
    ]
    await poll(lambda: all(metric(pp, "canary_proxy_fleet_state_version", '{rollout="default"}') for pp in procs),
               15, "every replica applies a fleet state")  # fmt: skip
    return procs


async def watch_weights(
    procs: list[ProxyProcess], until: Callable[[], bool], timeout: float
) -> list[dict[float, float]]:
    """For each replica: weight -> when it was first seen (polling all replicas every ~50 ms)."""
    seen: list[dict[float, float]] = [{} for _ in procs]
    order: list[list[float]] = [[] for _ in procs]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until():
        for i, pp in enumerate(procs):
            w = await asyncio.to_thread(split_weight, pp)
            if w is not None and w not in seen[i]:
                seen[i][w] = time.monotonic()
                order[i].append(w)
        if all(100.0 in s for s in seen):
            break
        await asyncio.sleep(0.05)
    for i in range(len(procs)):
        assert order[i] == [10.0, 20.0, 30.0, 40.0, 50.0, 100.0], f"replica r{i + 1} saw {order[i]}"
    return seen


async def test_three_replicas_step_together(
    proxy_process: StartProxy, upstream_factory: StartUpstream, redis_server: RedisServer
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    spec = f"{{canary: canary, baseline: stable, steps: {STEPS}, interval: 1500ms, window: 30s, min_requests: 10}}"
    procs = await start_replicas(proxy_process, redis_server, stable.url, canary.url, spec)
    traffic = Traffic([pp.port for pp in procs], rate=60)
    traffic.start()
    try:
        seen = await watch_weights(procs, lambda: False, timeout=40)
    finally:
        await traffic.stop()
    for weight in (20.0, 30.0, 40.0, 50.0, 100.0):
        times = [s[weight] for s in seen]
        assert max(times) - min(times) < 1.0, f"replicas disagreed on {weight}% for {max(times) - min(times):.2f}s"
    assert not traffic.failures and set(traffic.statuses) == {200}, (traffic.failures[:3], traffic.statuses)


async def test_pooled_evidence_rolls_back_everywhere(
    proxy_process: StartProxy, upstream_factory: StartUpstream, redis_server: RedisServer
) -> None:
    count = 0

    async def half_failing(request: web.Request) -> web.StreamResponse:
        nonlocal count
        count += 1
        return web.Response(status=500 if count % 2 else 200, text="canary", headers={"X-Upstream": "canary"})

    stable, canary = await upstream_factory("stable"), await upstream_factory("canary", handler=half_failing)
    routes = (
        "  - name: beta\n    match: {headers: {x-side: {exact: canary}}}\n    to: canary\n"
        "  - name: default\n    split: {stable: 100, canary: 0}\n"
    )
    # 70 requests per side fleet-wide; each replica only ever sees 30 per side.
    spec = "{canary: canary, baseline: stable, window: 120s, min_requests: 70, fast_fail: {consecutive_errors: 0}}"
    procs = await start_replicas(proxy_process, redis_server, stable.url, canary.url, spec, routes=routes)
    async with aiohttp.ClientSession() as session:
        for pp in procs:
            for i in range(60):
                headers = {"x-side": "canary"} if i % 2 else {"x-side": "no"}
                async with session.get(f"http://127.0.0.1:{pp.port}/", headers=headers) as resp:
                    await resp.read()
    # No replica alone has min_requests of either side...
    for pp in procs:
        status = await asyncio.to_thread(get_json, pp, "/status")
        assert status["upstreams"]["canary"]["window"]["requests"] == 30
        assert status["upstreams"]["stable"]["window"]["requests"] == 30
    # ... the fleet has: the half-failing canary is rolled back on every replica.
    await poll(lambda: all(rollout(pp)["phase"] == "rolled_back" for pp in procs), 15, "rollback on every replica")
    reason = rollout(procs[0])["reason"]
    assert "error rate" in reason, reason
    for pp in procs:
        assert split_weight(pp) == 0.0


async def test_manual_rollback_on_one_replica_reaches_all_within_a_second(
    proxy_process: StartProxy, upstream_factory: StartUpstream, redis_server: RedisServer
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    spec = f"{{canary: canary, baseline: stable, steps: {STEPS}, interval: 1h, min_requests: 10}}"
    procs = await start_replicas(proxy_process, redis_server, stable.url, canary.url, spec)
    assert all(split_weight(pp) == 10.0 for pp in procs)
    started = time.monotonic()
    code, body = await asyncio.to_thread(post, procs[2], "/rollout/rollback", {"reason": "bad canary"})
    assert code == 200 and body["phase"] == "rolled_back", body
    await poll(lambda: all(split_weight(pp) == 0.0 for pp in procs), 5, "weight 0 on every replica", every=0.02)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"took {elapsed:.2f}s"
    for pp in procs:
        ro = rollout(pp)
        assert ro["phase"] == "rolled_back" and "bad canary" in ro["reason"], ro
    # The other commands apply fleet-wide too, from any replica; the CLI verbs use the same API.
    code, body = await asyncio.to_thread(post, procs[0], "/rollout/reset")
    assert code == 200, body
    await poll(lambda: all(split_weight(pp) == 10.0 for pp in procs), 5, "reset everywhere")
    code, body = await asyncio.to_thread(post, procs[1], "/rollout/pause")
    assert code == 200, body
    await poll(lambda: all(rollout(pp)["phase"] == "paused" for pp in procs), 5, "paused everywhere")
    code, body = await asyncio.to_thread(post, procs[2], "/rollout/promote?full=1")
    assert code == 200, body
    await poll(lambda: all(split_weight(pp) == 100.0 for pp in procs), 5, "promoted everywhere")


async def test_leader_killed_is_replaced_with_no_step_repeated_or_skipped(
    proxy_process: StartProxy, upstream_factory: StartUpstream, redis_server: RedisServer
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    spec = f"{{canary: canary, baseline: stable, steps: {STEPS}, interval: 2s, window: 30s, min_requests: 10}}"
    procs = await start_replicas(proxy_process, redis_server, stable.url, canary.url, spec)
    traffic = Traffic([pp.port for pp in procs], rate=60)
    traffic.start()
    try:
        await poll(lambda: all(split_weight(pp) == 20.0 for pp in procs), 20, "step 2 everywhere")
        leader = await poll(lambda: leader_of(procs), 5, "one leader")
        os.killpg(leader.proc.pid, signal.SIGKILL)
        survivors = [pp for pp in procs if pp is not leader]
        traffic.ports = [pp.port for pp in survivors]
        new_leader = await poll(lambda: leader_of(survivors), 10, "a new leader")
        assert new_leader is not leader
        await poll(lambda: all(split_weight(pp) == 100.0 for pp in survivors), 40, "promotion after the takeover")
    finally:
        await traffic.stop()
    for pp in survivors:
        events = (await asyncio.to_thread(get_json, pp, "/status"))["events"]
        steps = [e["data"]["to"] for e in events if e["kind"] == "step"]
        assert steps == [20.0, 30.0, 40.0, 50.0], f"{pp.config.name}: steps {steps}"
        assert [e["kind"] for e in events].count("promoted") == 1
