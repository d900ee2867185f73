"""Socket-free building blocks for unit tests of the data plane: a compiled snapshot from YAML, a
data-plane stand-in for the pools, and a transport that records what would have been written."""

from __future__ import annotations

from proxy.analysis.stats import Stats
from proxy.config import parse_config
from proxy.dataplane.clock import Clock
from proxy.dataplane.context import PlaneContext
from proxy.dataplane.legs.http1_upstream import UpstreamConnection
from proxy.dataplane.pools import PoolRegistry
from proxy.dataplane.request import Request
from proxy.dataplane.snapshot import Snapshot, compile_snapshot

CONFIG = """
listen: 127.0.0.1:0
access_log: false
upstreams:
  stable: {endpoints: [http://10.0.0.1:80, http://10.0.0.2:80]}
  canary: {endpoints: [http://10.0.0.9:80]}
routes:
  - name: default
    to: stable
"""


class Plane:
    """What pools need from a data plane (pools.DataPlaneLike), with a clock the test sets by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.upstream_conns: set[object] = set()
        self.clock = Clock()
        self.clock.now = now


def snapshot(text: str = CONFIG, extra: str = "") -> tuple[Snapshot, PoolRegistry, Stats]:
    """A real compiled snapshot (routes, balancers, counters) without a listener or a loop."""
    config = parse_config(text + extra)
    stats = Stats()
    registry = PoolRegistry(Plane(), UpstreamConnection)  # type: ignore[arg-type]
    return compile_snapshot(config, stats, registry, None, 0.0), registry, stats


def request(snap: Snapshot, method: bytes = b"GET", target: bytes = b"/", lines: tuple[bytes, ...] = ()) -> Request:
    """A parsed request as the client leg leaves it after the head (Host set, no body)."""
    req = Request(snap)
    req.method = method
    req.target = target
    req.path = target.split(b"?")[0]
    req.host = b"example.test"
    req.lines = [b"Host: example.test\r\n", *lines]
    return req


EXCHANGE_CONFIG = """
listen: 127.0.0.1:0
access_log: false
retries: {attempts: 1, budget_percent: 20, min_concurrent: 3}
upstreams:
  stable: {endpoints: [http://10.0.0.1:80, http://10.0.0.2:80]}
  canary: {endpoints: [http://10.0.0.9:80]}
routes:
  - name: beta
    match: {headers: {x-canary: {exact: always}}}
    to: canary
  - name: default
    to: stable
rollout: {canary: canary, baseline: stable, min_requests: 1000}
"""


class FakeTransport:
    """Records writes; closing is a flag."""

    def __init__(self) -> None:
        self.closing = False
        self.written: list[bytes] = []

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.written.append(data)


class FakeLeg:
    """An upstream leg (legs.base.UpstreamLeg) with no socket behind it."""

    def __init__(self, pool: object = None) -> None:
        self.pool = pool
        self.transport: FakeTransport | None = FakeTransport()
        self.client: object = None
        self.deadline = 0.0
        self.reused = False
        self.started = False
        self.tunnel = False
        self.until_close = False
        self.closed = False

    def released(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.closing = True

    def abort(self) -> None:
        self.close()


class FakeClient:
    """A client leg (context.ClientSide) that records what the exchange asked of it."""

    def __init__(self) -> None:
        self.peer = b"192.0.2.1"
        self.closed = False
        self.queued = False
        self.current: Request | None = None
        self.deadline = 0.0
        self.dkind = 0
        self.paused = 0
        self.write_blocked_at = 0.0
        self.answered: list[int] = []
        self.ready: list[FakeLeg] = []
        self.aborted = False

    def respond_error(self, req: Request, status: int) -> None:
        req.status = status
        self.answered.append(status)

    def upstream_ready(self, leg: FakeLeg) -> None:
        leg.client = self
        self.ready.append(leg)

    def pause_reading_for(self, reason: int) -> None:
        self.paused |= reason

    def is_idle(self) -> bool:
        return self.current is None

    def on_timeout(self, now: float) -> None:
        self.dkind = 0

    def check_gone(self) -> None:
        pass

    def flush_queued(self) -> None:
        self.queued = False

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True


def plane_context(text: str = EXCHANGE_CONFIG, idle: int = 1) -> PlaneContext:
    """A data-plane context with a compiled snapshot and `idle` pooled fake connections per endpoint
    (so the exchange never needs to open a socket)."""
    import asyncio

    config = parse_config(text)
    stats = Stats()
    ctx = PlaneContext(stats, asyncio.new_event_loop(), FakeLeg, rng=lambda: 0.5)
    ctx.snapshot = compile_snapshot(config, stats, ctx.pools, None, 0.0)
    for pool in ctx.pools.pools.values():
        for _ in range(idle):
            pool.release(FakeLeg(pool), True, 60.0)  # type: ignore[arg-type]
    return ctx
