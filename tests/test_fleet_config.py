"""The `fleet:` section (validation, URL forms, Sentinel), the Lua scripts' guarantees against a real
redis-server, and that without `fleet:` nothing changes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from proxy.config import ConfigError, parse_config
from proxy.config.fleet import parse_redis_url
from proxy.control.app import ProxyApp
from proxy.control.fleet import keys as K
from tests.conftest import ROOT, ProxyProcess, Upstream, config_text, free_port
from tests.fleet_support import (
    REDIS_SERVER,
    RedisServer,
    fleet_config,
    get_json,
    metric,
    needs_redis,
    poll,
    redis_server,
    rollout,
)

pytestmark = pytest.mark.timeout(60)
__all__ = ["redis_server"]
BASE = config_text("http://127.0.0.1:9", "http://127.0.0.1:10")


def errors(extra: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + extra)
    return info.value.errors


def test_fleet_section_is_validated_with_key_paths() -> None:
    cfg = parse_config(BASE + "fleet: {redis: 'redis://r:6379/2', namespace: shop, replica: pod-a, lease: 2s}\n")
    assert cfg.fleet is not None and (cfg.fleet.namespace, cfg.fleet.replica, cfg.fleet.lease) == ("shop", "pod-a", 2.0)
    assert cfg.rollout is None and parse_config(BASE).fleet is None
    assert errors("fleet: {namespace: shop}\n") == ['fleet: missing required key "redis" (line 13)']
    [msg] = errors("fleet: {redis: 'http://r:6379', namespace: shop}\n")
    assert msg.startswith("fleet.redis: unsupported URL") and msg.endswith("(line 13)")
    [msg] = errors("fleet:\n  redis: redis://r\n  namespace: 'a b'\n")
    assert msg.startswith("fleet.namespace: invalid name") and "(line 15)" in msg
    [msg] = errors("fleet: {redis: redis://r, namespace: x, lease: 10ms}\n")
    assert msg.startswith("fleet.lease: must be between")
    [msg] = errors("fleet: {redis: redis://r, namespace: x, leader: yes}\n")
    assert msg.startswith("fleet.leader: unknown key")
    [msg] = errors("fleet: {redis: 'redis+sentinel://s1:26379', namespace: x}\n")
    assert "master name" in msg
    [msg] = errors("fleet: {redis: 'redis://u:secret@r:1/x', namespace: x}\n")
    assert "secret" not in msg and "database must be a number" in msg


def test_url_forms() -> None:
    t = parse_redis_url("rediss://user:p%40ss@redis.example:6380/3")
    assert (t.tls, t.sentinel, t.hosts, t.db, t.username, t.password) == (
        True, False, (("redis.example", 6380),), 3, "user", "p@ss")  # fmt: skip
    t = parse_redis_url("redis+sentinel://:pw@s1,s2:26380,[::1]/mymaster/1")
    assert t.sentinel and t.service == "mymaster" and t.db == 1 and t.password == "pw"
    assert t.hosts == (("s1", 26379), ("s2", 26380), ("::1", 26379))
    with pytest.raises(ValueError):
        parse_redis_url("redis://a,b/0")


async def test_without_fleet_no_redis_anywhere(
    proxy_factory: Callable[..., Awaitable[ProxyApp]], upstream_factory: Callable[..., Awaitable[Upstream]]
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    app = await proxy_factory(config_text(stable.url, canary.url, "rollout: {canary: canary, baseline: stable}\n"))
    assert app.fleet is None
    from proxy.control.status import build_status

    assert "fleet" not in build_status(app)
    assert app.admin is not None
    from proxy.control.metrics import render

    assert b"canary_proxy_fleet_" not in render(app.admin.registry)


@needs_redis
def test_scripts_fence_and_latch(redis_server: RedisServer) -> None:
    r = redis_server.client()
    keys = K.Keys("t")
    state = keys.state("default")
    lease = r.eval(K.LEASE, 2, keys.leader, keys.fence, "a i1", 5000, "")
    assert lease == "a i1 1"
    assert r.eval(K.LEASE, 2, keys.leader, keys.fence, "b i2", 5000, "") == lease  # b sees a's lease
    doc = json.dumps({"state": {"phase": "progressing", "canary": "c", "canary_version": "v2", "step_index": 0,
                                "step_started_at": 1.0, "changed_at": 1.0}, "by": "a", "events": []})  # fmt: skip
    assert r.eval(K.WRITE, 2, state, keys.leader, 0, lease, doc, keys.channel, "default") == [1, "ok"]
    assert r.eval(K.WRITE, 2, state, keys.leader, 0, lease, doc, keys.channel, "default") == [-3, "1"]  # stale
    # A deposed leader can never write: the lease in Redis is someone else's now.
    r.set(keys.leader, "b i2 2", px=5000)
    assert r.eval(K.WRITE, 2, state, keys.leader, 1, lease, doc, keys.channel, "default") == [-1, "lease lost"]
    # The latch only latches, on top of whatever version is current, and never for another version.
    latch = ["c", "v2", "bad", 2.0, "[]", "x", doc, keys.channel, "default", 3.0]
    assert r.eval(K.LATCH, 1, state, "c", "v1", *latch[2:]) == [-3, "another canary version"]
    assert r.eval(K.LATCH, 1, state, *latch) == [2, "ok"]
    assert json.loads(r.get(state))["state"]["phase"] == "rolled_back"
    assert r.eval(K.LATCH, 1, state, *latch) == [2, "already"]
    r.set(state, "garbage")
    assert r.eval(K.LATCH, 1, state, *latch)[0] == -2
    assert r.eval(K.WRITE, 2, state, keys.leader, 2, "", doc, keys.channel, "default")[0] == -2  # only a leader


@needs_redis
async def test_sentinel_url(
    tmp_path: Path,
    redis_server: RedisServer,
    proxy_process: Callable[..., ProxyProcess],
    upstream_factory: Callable[..., Awaitable[Upstream]],
) -> None:
    assert REDIS_SERVER is not None
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {redis_server.port} 1\n")
    sentinel = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = subprocess.run(["redis-cli", "-p", str(port), "sentinel", "get-master-addr-by-name", "mymaster"],
                                 capture_output=True, text=True).stdout  # fmt: skip
            if str(redis_server.port) in out:
                break
            await asyncio.sleep(0.1)
        stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
        url = f"redis+sentinel://127.0.0.1:{port}/mymaster/0"
        spec = "{canary: canary, baseline: stable, steps: [10, 50], interval: 1h}"
        pp = await asyncio.to_thread(proxy_process, fleet_config(stable.url, canary.url, url, "s1", spec))
        await poll(lambda: metric(pp, "canary_proxy_fleet_leader") == 1.0, 15, "leader through Sentinel")
        await poll(lambda: rollout(pp)["phase"] == "progressing", 5, "the state written through Sentinel")
        assert redis_server.client().exists("canary-proxy:shop:rollout:default:state")
        assert get_json(pp, "/status")["fleet"]["connected"] is True
    finally:
        sentinel.kill()
        sentinel.wait(timeout=10)


def test_compose_example_is_consistent() -> None:
    import yaml

    from proxy.config import load_config

    here = ROOT / "config" / "compose"
    cfg = load_config(str(here / "canary.yaml"))
    assert cfg.fleet is not None and cfg.rollout is not None
    compose = yaml.safe_load((here / "docker-compose.yaml").read_text())
    services = compose["services"]
    proxies = [s for s in services.values() if "run" in s.get("command", [])]
    assert len(proxies) == 3 and len({s["hostname"] for s in proxies}) == 3
    host, port = parse_redis_url(cfg.fleet.redis).hosts[0]
    assert host in services and port == 6379 and "--appendonly" in services[host]["command"]
    for up in cfg.upstreams.values():
        assert all(ep.host in services for ep in up.endpoints)
