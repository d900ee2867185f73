"""Process-wide request statistics, recorded on the hot path with plain integer adds.

The data plane never touches prometheus-client objects: it bumps the counters here (children are
resolved once, when a snapshot is compiled), and `proxy.control.metrics` turns them into Prometheus
families at scrape time. The analysis windows live here too, one per upstream.

Objects are kept across config reloads (keyed by route/upstream name), so counters stay monotonic.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

from proxy.analysis.window import UpstreamWindow

ERROR_KINDS = ("connect", "timeout", "reset", "protocol")
KIND_CONNECT, KIND_TIMEOUT, KIND_RESET, KIND_PROTOCOL = range(4)
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class RouteCounts:
    """`canary_proxy_requests_total{route, upstream, code_class}` for one (route, upstream)."""

    __slots__ = ("by_class", "route", "upstream")

    def __init__(self, route: str, upstream: str) -> None:
        self.route = route
        self.upstream = upstream
        self.by_class = [0, 0, 0, 0, 0, 0]  # index = status // 100; 0 unused


# UpstreamStats.trip_at while fast-fail is off: never reached (see proxy.analysis.fastfail).
DISARMED = 1 << 62


class UpstreamStats:
    """Everything recorded about one upstream (all its endpoints)."""

    __slots__ = (
        "buckets",
        "consecutive_errors",
        "duration_count",
        "duration_counts",
        "duration_sum",
        "errors",
        "inflight",
        "name",
        "on_trip",
        "track_inflight",
        "trip_at",
        "try_timeout",
        "window",
    )

    def __init__(self, name: str, buckets: tuple[float, ...], window_horizon: int) -> None:
        self.name = name
        self.buckets = buckets
        self.duration_counts = [0] * (len(buckets) + 1)  # non-cumulative; last = +Inf
        self.duration_sum = 0.0
        self.duration_count = 0
        self.errors = [0, 0, 0, 0]  # by ERROR_KINDS index
        self.consecutive_errors = 0  # for fast_fail: reset by any non-error response
        self.window = UpstreamWindow(window_horizon)
        # fast_fail: when consecutive_errors reaches trip_at, on_trip() runs (set by the controller)
        self.trip_at = DISARMED
        self.on_trip: Callable[[], None] | None = None
        # The canary's tries still outstanding, by tenth of a second they started (monotonic), so
        # the analysis can count a request slower than the bound before it ends (set by the controller).
        self.track_inflight = False
        self.inflight: dict[int, int] = {}
        # Per-try timeout of idempotent tries (0: timeouts.response); the controller sets it for the canary.
        self.try_timeout = 0.0

    def try_started(self, t0: float) -> int:
        """Count a try of a request that started at `t0` (monotonic) as outstanding; returns its key."""
        key = int(t0 * 10.0)
        inflight = self.inflight
        inflight[key] = inflight.get(key, 0) + 1
        return key

    def try_ended(self, key: int) -> None:
        """The try counted under `key` ended (a response, a failure or the client gone)."""
        inflight = self.inflight
        left = inflight.get(key, 0) - 1
        if left > 0:
            inflight[key] = left
        else:
            inflight.pop(key, None)

    def outstanding(self, now: float) -> list[tuple[float, int]]:
        """(age at least, count) of the tries still outstanding at `now` (monotonic)."""
        return [(now - (key + 1) / 10.0, count) for key, count in self.inflight.items()]

    def observe(self, now: float, duration: float, is_error: bool) -> None:
        """Record one finished exchange (a response, or a failure that produced a 5xx)."""
        self.duration_counts[bisect_left(self.buckets, duration)] += 1
        self.duration_sum += duration
        self.duration_count += 1
        if is_error:
            self.consecutive_errors += 1
            if self.consecutive_errors >= self.trip_at and self.on_trip is not None:
                self.on_trip()
        else:
            self.consecutive_errors = 0
        self.window.record(now, is_error, duration)


MIRROR_SKIPS = ("body_too_large", "overloaded")
SKIP_TOO_LARGE, SKIP_OVERLOADED = range(2)
MIRROR_NO_RESPONSE = 6  # by_class index of mirrors that got no response (connect/timeout/reset)


class MirrorStats:
    """`canary_proxy_mirror_*` for one (route, mirror upstream): results by class, skips, latency."""

    __slots__ = (
        "buckets",
        "by_class",
        "duration_count",
        "duration_counts",
        "duration_sum",
        "route",
        "skipped",
        "upstream",
    )

    def __init__(self, route: str, upstream: str, buckets: tuple[float, ...]) -> None:
        self.route = route
        self.upstream = upstream
        self.buckets = buckets
        self.by_class = [0, 0, 0, 0, 0, 0, 0]  # index = status // 100; MIRROR_NO_RESPONSE = failed
        self.skipped = [0, 0]  # by MIRROR_SKIPS index
        self.duration_counts = [0] * (len(buckets) + 1)
        self.duration_sum = 0.0
        self.duration_count = 0

    def observe(self, status: int, duration: float) -> None:
        """One finished mirror exchange (`status` 0: no response)."""
        self.by_class[status // 100 if status else MIRROR_NO_RESPONSE] += 1
        self.duration_counts[bisect_left(self.buckets, duration)] += 1
        self.duration_sum += duration
        self.duration_count += 1


class Stats:
    """All statistics of this process. One instance lives for the process' lifetime."""

    def __init__(self, window_horizon: int = 600) -> None:
        self.window_horizon = window_horizon
        self.in_flight = 0
        self.route_counts: dict[tuple[str, str], RouteCounts] = {}
        self.upstreams: dict[str, UpstreamStats] = {}
        self.reloads = {"success": 0, "failure": 0}
        self.rollbacks: dict[str, int] = {}
        self.retries: dict[str, int] = {}  # by upstream the retry left
        self.ejections: dict[str, int] = {}  # outlier ejections, by upstream
        self.rejected = 0  # malformed client requests answered with 4xx
        self.mirrors: dict[tuple[str, str], MirrorStats] = {}  # by (route, mirror upstream)
        self.local_errors: dict[str, int] = {}  # our own failures, by proxy.faults.LOCAL_KINDS
        self.tls_handshake_errors: dict[str, int] = {}  # failed client TLS handshakes, by reason
        self.grpc: dict[str, list[int]] = {}  # upstream gRPC responses, by upstream, by grpc-status code

    def count_grpc(self, upstream: str, code: int) -> None:
        """Count one response of `upstream` that carried grpc-status `code` (0-16)."""
        counts = self.grpc.get(upstream)
        if counts is None:
            counts = self.grpc[upstream] = [0] * 17
        counts[code] += 1

    def route_counts_for(self, route: str, upstream: str) -> RouteCounts:
        """The (route, upstream) counter, created on first use; bound once per snapshot."""
        key = (route, upstream)
        rc = self.route_counts.get(key)
        if rc is None:
            rc = self.route_counts[key] = RouteCounts(route, upstream)
        return rc

    def mirror_for(self, route: str, upstream: str, buckets: tuple[float, ...]) -> MirrorStats:
        """The (route, mirror upstream) counters; a change of buckets starts a fresh histogram."""
        key = (route, upstream)
        ms = self.mirrors.get(key)
        if ms is None or ms.buckets != buckets:
            old = ms
            ms = self.mirrors[key] = MirrorStats(route, upstream, buckets)
            if old is not None:
                ms.by_class = old.by_class
                ms.skipped = old.skipped
        return ms

    def upstream(self, name: str, buckets: tuple[float, ...]) -> UpstreamStats:
        """The stats of upstream `name`; a change of buckets starts a fresh histogram."""
        us = self.upstreams.get(name)
        if us is None or us.buckets != buckets:
            old = us
            us = self.upstreams[name] = UpstreamStats(name, buckets, self.window_horizon)
            if old is not None:
                us.errors = old.errors
                us.window = old.window
                us.trip_at = old.trip_at
                us.on_trip = old.on_trip
                us.track_inflight = old.track_inflight
                us.inflight = old.inflight
                us.try_timeout = old.try_timeout
        return us
