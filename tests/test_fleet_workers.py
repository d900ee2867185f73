"""`--workers N` in fleet mode: worker 0 is the replica's one fleet member; the other workers follow
it as before, so their traffic counts in the fleet's evidence and they apply the fleet's state."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import ProxyProcess, Upstream
from tests.fleet_support import (
    RedisServer,
    Traffic,
    fleet_config,
    get_json,
    needs_redis,
    poll,
    post,
    redis_server,
    rollout,
    split_weight,
)

pytestmark = [needs_redis, pytest.mark.timeout(90)]
__all__ = ["redis_server"]


async def test_workers_replica_and_single_replica_share_one_rollout(
    proxy_process: Callable[..., ProxyProcess],
    upstream_factory: Callable[..., Awaitable[Upstream]],
    redis_server: RedisServer,
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    spec = "{canary: canary, baseline: stable, steps: [10, 30, 60], interval: 1s, window: 30s, min_requests: 40}"
    multi = await asyncio.to_thread(
        proxy_process, fleet_config(stable.url, canary.url, redis_server.url, "multi", spec), "multi.yaml",
        ("--workers", "2"),
    )  # fmt: skip
    single = await asyncio.to_thread(
        proxy_process, fleet_config(stable.url, canary.url, redis_server.url, "single", spec), "single.yaml"
    )
    await poll(lambda: split_weight(multi) == 10.0 and split_weight(single) == 10.0, 20, "step 1 on both")
    # Only the workers replica gets traffic: its followers' slices reach the fleet through worker 0.
    traffic = Traffic([multi.port], rate=80)
    traffic.start()
    try:
        await poll(lambda: split_weight(single) == 60.0, 30, "steps driven by the workers replica's evidence")
    finally:
        await traffic.stop()
    assert not traffic.failures and set(traffic.statuses) == {200}
    await poll(lambda: split_weight(multi) == 60.0, 5, "the workers replica at the same step")
    fleet = get_json(single, "/status")["fleet"]
    assert sorted(r["replica"] for r in fleet["replicas"]) == ["multi", "single"]
    code, _ = await asyncio.to_thread(post, single, "/rollout/rollback")
    assert code == 200
    await poll(lambda: rollout(multi)["phase"] == "rolled_back", 5, "rollback reaches the workers replica")
    # Every worker of the replica applies it (GETs on new connections land on both workers).
    await poll(lambda: burst(multi.port) == {"stable"}, 3, "every worker sends the canary nothing")


def burst(port: int, n: int = 30) -> set[str]:
    """Which upstreams answer n GETs, each on a new connection (SO_REUSEPORT spreads them)."""
    seen = set()
    for _ in range(n):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            seen.add(r.headers.get("X-Upstream", "?"))
    return seen
