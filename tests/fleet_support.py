"""Fleet-mode test support: a real redis-server per test, several real proxy processes against it,
and small helpers to read their state. Everything waits by polling with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import ProxyProcess, free_port

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed (.ci/system-deps.sh)")


class RedisServer:
    """redis-server on a free port with its own directory; AOF on, so a restart keeps the data."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
               "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no",
               "--logfile", str(self.dir / "redis.log")]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if self.client().ping():
                    return
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: an outage, not a shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=2)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server for one test, killed at the end."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


def fleet_config(
    stable: str,
    canary: str,
    redis_url: str,
    replica: str,
    rollout: str,
    namespace: str = "shop",
    lease: str = "1s",
    routes: str | None = None,
    canary_version: str = "v2",
) -> str:
    """A replica's config: the two upstreams, routes, the rollout and the fleet section."""
    routes = routes or (
        "  - name: beta\n    match: {headers: {x-canary: {exact: always}}}\n    to: canary\n"
        "  - name: default\n    split: {stable: 50, canary: 50}\n"
    )
    return (
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\naccess_log: false\n"
        f"upstreams:\n  stable: {{endpoints: [{stable}], version: v1}}\n"
        f"  canary: {{endpoints: [{canary}], version: {canary_version}}}\n"
        f"routes:\n{routes}rollout: {rollout}\n"
        f'fleet: {{redis: "{redis_url}", namespace: {namespace}, replica: {replica}, lease: {lease}}}\n'
    )


def get_json(pp: ProxyProcess, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{pp.admin_port}{path}", timeout=5) as r:
        return json.loads(r.read())


def post(pp: ProxyProcess, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{pp.admin_port}{path}", data=data, method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def rollout(pp: ProxyProcess) -> dict[str, Any]:
    doc: dict[str, Any] = get_json(pp, "/status")["rollout"]
    return doc


def metric(pp: ProxyProcess, name: str, labels: str = "") -> float | None:
    """One sample of /metrics (`labels` as written in the exposition, e.g. '{rollout="default"}')."""
    with urllib.request.urlopen(f"http://127.0.0.1:{pp.admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    prefix = f"{name}{labels} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return None


def split_weight(pp: ProxyProcess) -> float | None:
    return metric(pp, "canary_proxy_upstream_weight", '{route="default",upstream="canary"}')


async def poll(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll a blocking `check` in a thread until truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(check)
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def leader_of(replicas: list[ProxyProcess]) -> ProxyProcess | None:
    """The replica whose canary_proxy_fleet_leader is 1 (exactly one), else None."""
    leaders = [pp for pp in replicas if metric(pp, "canary_proxy_fleet_leader") == 1.0]
    return leaders[0] if len(leaders) == 1 else None


class Traffic:
    """Steady GETs against some ports from one task; counts statuses and which upstream answered."""

    def __init__(self, ports: list[int], rate: float, headers: dict[str, str] | None = None) -> None:
        self.ports = ports
        self.rate = rate
        self.headers = headers or {}
        self.statuses: dict[int, int] = {}
        self.upstreams: dict[str, int] = {}
        self.failures: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        import aiohttp

        gap = 1.0 / self.rate
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            i = 0
            while True:
                port = self.ports[i % len(self.ports)]
                i += 1
                try:
                    async with session.get(f"http://127.0.0.1:{port}/", headers=self.headers) as resp:
                        await resp.read()
                        self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
                        up = resp.headers.get("X-Upstream", "?")
                        self.upstreams[up] = self.upstreams.get(up, 0) + 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.failures.append(f"{port}: {exc!r}")
                await asyncio.sleep(gap)
