"""Fleet mode when things go wrong: Redis killed under load, a replica started while Redis is down,
the latch across a restart of every replica, namespaces side by side, and garbage under our keys."""

from __future__ import annotations

import asyncio
import json
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
__all__ = ["redis_server"]

StartProxy = Callable[..., ProxyProcess]
StartUpstream = Callable[..., Awaitable[Upstream]]
SPEC = (
    "{canary: canary, baseline: stable, steps: [10, 50], interval: 1h, min_requests: 1000,"
    " fast_fail: {consecutive_errors: 5}}"
)


class Switch:
    def __init__(self) -> None:
        self.fail = False

    async def handler(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=500 if self.fail else 200, text="canary", headers={"X-Upstream": "canary"})


async def start(proxy_process: StartProxy, text: str, name: str) -> ProxyProcess:
    return await asyncio.to_thread(proxy_process, text, name=name)


def version_of(pp: ProxyProcess) -> float | None:
    return metric(pp, "canary_proxy_fleet_state_version", '{rollout="default"}')


async def get(port: int, headers: dict[str, str] | None = None, n: int = 1) -> list[tuple[int, str]]:
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.get(f"http://127.0.0.1:{port}/", headers=headers or {}) as resp:
                await resp.read()
                out.append((resp.status, resp.headers.get("X-Upstream", "?")))
    return out


async def test_redis_outage_under_load(
    proxy_process: StartProxy, upstream_factory: StartUpstream, redis_server: RedisServer
) -> None:
    switch = Switch()
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary", handler=switch.handler)
    procs = [
        await start(proxy_process, fleet_config(stable.url, canary.url, redis_server.url, f"r{i}", SPEC), f"r{i}.yaml")
        for i in (1, 2, 3)
    ]
    await poll(lambda: all(split_weight(pp) == 10.0 for pp in procs), 15, "step 1 everywhere")
    traffic = Traffic([pp.port for pp in procs], rate=80)
    traffic.start()
    try:
        await poll(lambda: sum(traffic.statuses.values()) >= 20, 10, "traffic flowing")
        redis_server.kill()
        await poll(lambda: all(metric(pp, "canary_proxy_fleet_connected") == 0.0 for pp in procs), 10, "disconnected")
        before = sum(traffic.statuses.values())
        await poll(lambda: sum(traffic.statuses.values()) > before + 150, 15, "traffic during the outage")
    finally:
        await traffic.stop()
    # The data plane never failed a request because of Redis; every replica kept its state.
    assert not traffic.failures and set(traffic.statuses) == {200}, (traffic.failures[:3], traffic.statuses)
    assert traffic.upstreams.get("canary", 0) > 0 and traffic.upstreams.get("stable", 0) > 0
    assert all(split_weight(pp) == 10.0 for pp in procs)

    # A replica started while Redis is down never read the fleet state: no split traffic to the canary.
    late = await start(proxy_process, fleet_config(stable.url, canary.url, redis_server.url, "r4", SPEC), "r4.yaml")
    assert rollout(late)["phase"] == "held" and split_weight(late) == 0.0
    answers = await get(late.port, n=40)
    assert answers == [(200, "stable")] * 40
    assert await get(late.port, {"x-canary": "always"}) == [(200, "canary")]  # explicit routes still work

    # A fast-fail during the outage: weight 0 on that replica at once, the others do not know yet.
    switch.fail = True
    answers = await get(procs[0].port, {"x-canary": "always"}, n=5)
    assert [s for s, _ in answers] == [500] * 5
    await poll(lambda: split_weight(procs[0]) == 0.0, 1.0, "local trip", every=0.02)
    assert rollout(procs[0])["phase"] == "rolled_back"
    assert split_weight(procs[1]) == 10.0 and split_weight(procs[2]) == 10.0

    # Redis back (its AOF kept the state): the trip reaches every replica, the late one included.
    redis_server.start()
    everyone = [*procs, late]
    await poll(lambda: all(rollout(pp)["phase"] == "rolled_back" for pp in everyone), 20, "rollback everywhere")
    assert all(split_weight(pp) == 0.0 for pp in everyone)
    assert "fast fail" in rollout(procs[2])["reason"]
    logs = "".join(procs[1].lines)
    assert logs.count("Redis at") <= 3, logs  # one line per connection state change, not per attempt
    assert "Traceback" not in logs


async def test_latch_survives_restart_of_every_replica_and_new_version_clears_it(
    proxy_process: StartProxy, upstream_factory: StartUpstream, redis_server: RedisServer
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")

    async def start_all() -> list[ProxyProcess]:
        texts = [fleet_config(stable.url, canary.url, redis_server.url, f"r{i}", SPEC) for i in (1, 2, 3)]
        return [await start(proxy_process, text, f"r{i}.yaml") for i, text in enumerate(texts, 1)]

    procs = await start_all()
    await poll(lambda: all(split_weight(pp) == 10.0 for pp in procs), 15, "step 1 everywhere")
    code, _ = await asyncio.to_thread(post, procs[1], "/rollout/rollback", {"reason": "latched"})
    assert code == 200
    await poll(lambda: all(rollout(pp)["phase"] == "rolled_back" for pp in procs), 5, "rolled back")
    for pp in procs:
        os.killpg(pp.proc.pid, signal.SIGKILL)
        pp.proc.wait(timeout=10)
    procs = await start_all()
    await poll(lambda: all(version_of(pp) for pp in procs), 15, "fleet state read")
    for pp in procs:
        ro = rollout(pp)
        assert ro["phase"] == "rolled_back" and "latched" in ro["reason"], ro
        assert split_weight(pp) == 0.0
    # A new canary version in the config clears the latch, fleet-wide.
    for pp in procs:
        pp.config.write_text(pp.config.read_text().replace("version: v2", "version: v3"))
        code, body = await asyncio.to_thread(post, pp, "/config/reload")
        assert code == 200, body
    await poll(lambda: all(split_weight(pp) == 10.0 for pp in procs), 10, "new version progressing everywhere")
    assert all(rollout(pp)["canary_version"] == "v3" for pp in procs)


async def test_two_namespaces_on_one_redis_stay_independent(
    proxy_process: StartProxy, upstream_factory: StartUpstream, redis_server: RedisServer
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    def text(replica: str, namespace: str) -> str:
        return fleet_config(stable.url, canary.url, redis_server.url, replica, SPEC, namespace=namespace)

    a = [await start(proxy_process, text(f"a{i}", "team-a"), f"a{i}.yaml") for i in (1, 2)]
    b = await start(proxy_process, text("b1", "team-b"), "b1.yaml")
    await poll(lambda: all(split_weight(pp) == 10.0 for pp in [*a, b]), 15, "step 1 everywhere")
    await poll(lambda: leader_of(a) is not None and leader_of([b]) is b, 10, "a leader in each namespace")
    code, _ = await asyncio.to_thread(post, a[0], "/rollout/rollback")
    assert code == 200
    await poll(lambda: rollout(a[1])["phase"] == "rolled_back", 5, "rollback in team-a")
    assert rollout(b)["phase"] == "progressing" and split_weight(b) == 10.0
    fleet_b = (await asyncio.to_thread(get_json, b, "/status"))["fleet"]
    assert fleet_b["namespace"] == "team-b" and [r["replica"] for r in fleet_b["replicas"]] == ["b1"]
    fleet_a = await poll(lambda: get_json(a[0], "/status")["fleet"], 5, "fleet status")
    await poll(lambda: len(get_json(a[0], "/status")["fleet"]["replicas"]) == 2, 5, "both team-a replicas reported")
    assert fleet_a["namespace"] == "team-a"


async def test_garbage_under_our_keys_is_survived(
    proxy_process: StartProxy, upstream_factory: StartUpstream, redis_server: RedisServer
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    procs = [
        await start(proxy_process, fleet_config(stable.url, canary.url, redis_server.url, f"r{i}", SPEC), f"r{i}.yaml")
        for i in (1, 2)
    ]
    await poll(lambda: all(split_weight(pp) == 10.0 for pp in procs), 15, "step 1 everywhere")
    r = redis_server.client()
    base = "canary-proxy:shop"
    r.set(f"{base}:rollout:default:state", "{not json")
    r.delete(f"{base}:rollout:default:verdict")
    r.rpush(f"{base}:rollout:default:verdict", "a list")
    r.hset(f"{base}:replicas", mapping={"intruder": "[1, 2", "other": json.dumps({"at": "soon"})})
    for second in range(int(time.time()) - 5, int(time.time()) + 5):
        r.hset(f"{base}:rollout:default:ev:v2:{second}", mapping={"canary|r": "lots", "canary|999": "1", "x": "y"})
    r.publish(f"{base}:events", "\x00garbage")
    traffic = Traffic([pp.port for pp in procs], rate=40)
    traffic.start()
    try:
        # The leader replaces the unreadable state with the one it applies: routing never changed.
        await poll(lambda: r.get(f"{base}:rollout:default:state").startswith('{"v":'), 10, "state rewritten")
        assert all(split_weight(pp) == 10.0 for pp in procs)
        r.delete(f"{base}:leader")
        r.hset(f"{base}:leader", mapping={"not": "a lease"})
        r.set(f"{base}:fence", "not a number")
        await poll(lambda: r.type(f"{base}:leader") == "string", 10, "lease taken back")
        await poll(lambda: leader_of(procs) is not None, 10, "a leader again")
    finally:
        await traffic.stop()
    assert not traffic.failures and set(traffic.statuses) == {200}, traffic.statuses
    # Still a working fleet: a rollback on one replica reaches the other.
    code, _ = await asyncio.to_thread(post, procs[0], "/rollout/rollback")
    assert code == 200
    await poll(lambda: rollout(procs[1])["phase"] == "rolled_back", 5, "rollback after the garbage")
    for pp in procs:
        logs = "".join(pp.lines)
        assert "Traceback" not in logs, logs[-3000:]
        assert pp.proc.poll() is None
    assert "ignoring unexpected data" in "".join(procs[0].lines + procs[1].lines)
