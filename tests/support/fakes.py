"""Socket-free building blocks for unit tests of the data plane: a compiled snapshot from YAML, a
data-plane stand-in for the pools, and a transport that records what would have been written."""

from __future__ import annotations

from proxy.analysis.stats import Stats
from proxy.config import parse_config
from proxy.dataplane.clock import Clock
from proxy.dataplane.legs.http1_upstream import UpstreamConnection
from proxy.dataplane.pools import PoolRegistry
from proxy.dataplane.request import Request
from proxy.routing.snapshot import Snapshot, compile_snapshot

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
