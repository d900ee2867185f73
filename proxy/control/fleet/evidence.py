"""Pooled evidence: every replica adds its completed per-second slices to one hash per second in
Redis (HINCRBY, so the sum is done by Redis); the leader merges the seconds of the window.

A slice is pushed once, about a second after its second ended (two with `--workers`, so the other
workers' slices reached the leader process first). When Redis is down the slices wait in the local
ring and are pushed when it is back (those still inside the window).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from redis.asyncio import Redis

from proxy.analysis.stats import Stats
from proxy.analysis.window import LATENCY_BOUNDS, WindowStats
from proxy.config.model import Config, Rollout
from proxy.control.fleet.keys import EVIDENCE_EXTRA_TTL, Keys

log = logging.getLogger("canary_proxy.fleet")
NBUCKETS = len(LATENCY_BOUNDS) + 1


def canary_version(config: Config, rollout: Rollout) -> str | None:
    """The canary version the config names (evidence belongs to it)."""
    up = config.upstreams.get(rollout.canary)
    return up.version if up is not None else None


class _Sum:
    """Running totals of one upstream while merging."""

    __slots__ = ("errors", "hist", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.hist = [0] * NBUCKETS

    def add(self, other: _Sum) -> None:
        """Add another second's totals."""
        self.requests += other.requests
        self.errors += other.errors
        if other.requests:
            self.hist = [a + b for a, b in zip(self.hist, other.hist, strict=True)]


class EvidencePusher:
    """Ships this replica's completed seconds, once each."""

    def __init__(self, keys: Keys, lag: int) -> None:
        self.keys = keys
        self.lag = lag
        self.sent_upto: dict[tuple[str, str], int] = {}  # (rollout, upstream) -> last second shipped
        self.last_push: float | None = None

    async def push(self, client: Redis, config: Config, rollouts: list[Rollout], stats: Stats) -> int:
        """Send every completed, not yet sent second; returns the number of slices sent."""
        upto = int(time.time()) - self.lag
        pipe = client.pipeline(transaction=True)
        done: dict[tuple[str, str], int] = {}
        count = 0
        for rollout in rollouts:
            version = canary_version(config, rollout)
            ttl = int(rollout.window) + EVIDENCE_EXTRA_TTL
            for upstream in (rollout.canary, rollout.baseline):
                key = (rollout.name, upstream)
                us = stats.upstreams.get(upstream)
                after = max(self.sent_upto.get(key, upto - 1), upto - int(rollout.window))
                done[key] = upto
                if us is None:
                    continue
                for second, requests, errors, hist in us.window.export_slices(after, upto):
                    name = self.keys.evidence(rollout.name, version, second)
                    pipe.hincrby(name, f"{upstream}|r", requests)
                    if errors:
                        pipe.hincrby(name, f"{upstream}|e", errors)
                    for bucket, n in hist.items():
                        pipe.hincrby(name, f"{upstream}|{bucket}", n)
                    pipe.expire(name, ttl)
                    count += 1
        if count:
            await pipe.execute()
        self.sent_upto.update(done)  # only after Redis took them: a failure resends later
        self.last_push = time.time()
        return count


class EvidenceMerger:
    """The leader's view: the fleet's windows, merged from the per-second hashes.

    A second's hash stops changing once every replica pushed it, so only the last RECENT seconds
    are read each time; every FULL_EVERY seconds the whole window is read again (late pushes, e.g.
    after an outage, get in). That keeps the leader's cost flat whatever the window length.
    """

    RECENT = 6
    FULL_EVERY = 10.0

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.windows: dict[str, dict[str, WindowStats]] = {}  # rollout -> upstream -> stats
        self.at: dict[str, float] = {}
        self._complained: set[str] = set()
        self._cache: dict[str, dict[str, dict[str, _Sum]]] = {}  # rollout -> key -> upstream -> parsed
        self._full_at: dict[str, float] = {}

    async def refresh(self, client: Redis, config: Config, rollout: Rollout, now: float) -> None:
        """Read the window's seconds (the recent ones, or all now and then) and merge them per upstream."""
        version = canary_version(config, rollout)
        top = int(now)
        names = [self.keys.evidence(rollout.name, version, s) for s in range(top - int(rollout.window) + 1, top + 1)]
        old = self._cache.get(rollout.name, {})
        full = now - self._full_at.get(rollout.name, -1e9) >= self.FULL_EVERY
        wanted = [n for i, n in enumerate(names) if full or n not in old or i >= len(names) - self.RECENT]
        pipe = client.pipeline(transaction=False)
        for name in wanted:
            pipe.hgetall(name)
        results = await pipe.execute(raise_on_error=False) if wanted else []
        if full:
            self._full_at[rollout.name] = now
        cache = {n: old[n] for n in names if n in old}
        for name, got in zip(wanted, results, strict=True):
            if isinstance(got, BaseException) or not isinstance(got, Mapping):
                self._complain(name, f"not a hash ({got!r:.80})")
                cache.pop(name, None)
                continue
            parsed = {u: _Sum() for u in (rollout.canary, rollout.baseline)}
            self._add(name, got, parsed)
            cache[name] = parsed
        self._cache[rollout.name] = cache
        sums = {u: _Sum() for u in (rollout.canary, rollout.baseline)}
        for per_second in cache.values():
            for upstream, acc in per_second.items():
                total = sums.get(upstream)
                if total is not None:
                    total.add(acc)
        self.windows[rollout.name] = {
            u: WindowStats(acc.requests, acc.errors, tuple(acc.hist), rollout.window) for u, acc in sums.items()
        }
        self.at[rollout.name] = now

    def _add(self, name: str, fields: Mapping[str, str], sums: dict[str, _Sum]) -> None:
        for field, raw in fields.items():
            upstream, _, what = str(field).rpartition("|")
            acc = sums.get(upstream)
            try:
                value = int(raw)
                if acc is None or value < 0:
                    raise ValueError("unknown field or negative count")
                if what == "r":
                    acc.requests += value
                elif what == "e":
                    acc.errors += value
                else:
                    bucket = int(what)
                    if not 0 <= bucket < NBUCKETS:
                        raise ValueError("bucket out of range")
                    acc.hist[bucket] += value
            except (ValueError, TypeError) as exc:
                self._complain(name, f"field {field!r:.60}: {exc}")

    def _complain(self, name: str, what: str) -> None:
        """Foreign data under our keys: logged once per key, then ignored."""
        if name in self._complained:
            return
        if len(self._complained) > 10_000:
            self._complained.clear()
        self._complained.add(name)
        log.warning("fleet: ignoring unexpected data in %s: %s", name, what)

    def window(self, rollout: str, upstream: str, now: float, max_age: float = 3.0) -> WindowStats | None:
        """The merged window, when a fresh one is there."""
        at = self.at.get(rollout)
        if at is None or now - at > max_age:
            return None
        return self.windows.get(rollout, {}).get(upstream)
