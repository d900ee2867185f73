"""Per-upstream sliding window: a ring of per-second slices (requests, errors, latency histogram).

`UpstreamWindow.record` runs once per proxied request, so it is a handful of integer operations on
preallocated lists. `UpstreamWindow.stats` merges the slices of the last `window` seconds into an
immutable `WindowStats`, which the verdict reads once per tick.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass

# Upper bounds (seconds) of the latency buckets: 8 per doubling from 1ms to 65.5s. A bucket is
# ~9% wide, and interpolating inside it keeps a quantile within a few percent. Index len(...) is the
# overflow bucket (> 65.5s); index 0 holds everything up to 1ms.
LATENCY_BOUNDS: tuple[float, ...] = tuple(0.001 * 2 ** (i / 8) for i in range(16 * 8 + 1))
_NBUCKETS = len(LATENCY_BOUNDS) + 1


def bucket_index(duration: float) -> int:
    """The histogram bucket of a duration in seconds (Prometheus `le` semantics)."""
    return bisect_left(LATENCY_BOUNDS, duration)


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Merged counts of one upstream over a window.

    `counts[i]` is the number of requests whose duration fell in bucket i of `LATENCY_BOUNDS`
    (the last entry is the overflow bucket). `window` is the length in seconds the counts cover.
    """

    requests: int
    errors: int
    counts: tuple[int, ...]
    window: float

    @classmethod
    def empty(cls, window: float = 60.0) -> WindowStats:
        """No traffic at all (e.g. an upstream that has not been used yet)."""
        return cls(0, 0, (0,) * _NBUCKETS, window)

    @classmethod
    def from_counts(
        cls, requests: int, errors: int, durations: Iterable[float] = (), window: float = 60.0
    ) -> WindowStats:
        """Build stats directly, for tests and simulations. `durations` fill the histogram only."""
        counts = [0] * _NBUCKETS
        for d in durations:
            counts[bisect_left(LATENCY_BOUNDS, d)] += 1
        return cls(requests, errors, tuple(counts), window)

    @property
    def error_rate(self) -> float:
        """errors / requests, 0.0 without requests."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def rps(self) -> float:
        """Mean requests per second over the window."""
        return self.requests / self.window if self.window > 0 else 0.0

    def quantile(self, q: float) -> float | None:
        """The q-quantile of the latency in seconds, or None when the histogram is empty.

        Interpolates geometrically inside the bucket (the buckets are log-spaced); the first bucket
        is linear from 0, and the overflow bucket reports the last bound.
        """
        total = sum(self.counts)
        if total == 0:
            return None
        rank = min(max(q, 0.0), 1.0) * total
        cumulative = 0
        for i, c in enumerate(self.counts):
            if c == 0 or cumulative + c < rank:
                cumulative += c
                continue
            if i >= len(LATENCY_BOUNDS):
                return LATENCY_BOUNDS[-1]
            fraction = max(rank - cumulative, 0.0) / c
            upper = LATENCY_BOUNDS[i]
            if i == 0:
                return upper * fraction
            lower = LATENCY_BOUNDS[i - 1]
            return lower * math.pow(upper / lower, fraction)
        return LATENCY_BOUNDS[-1]  # pragma: no cover - rank <= total always finds a bucket


class UpstreamWindow:
    """Ring of per-second slices covering the last `horizon_seconds` seconds."""

    __slots__ = ("_errors", "_hists", "_n", "_requests", "_stamps", "_zeros", "horizon")

    def __init__(self, horizon_seconds: int) -> None:
        self.horizon = max(int(horizon_seconds), 1)
        # One extra slice: the current (partial) second plus `horizon` full ones.
        self._n = n = self.horizon + 1
        self._stamps = [-1] * n
        self._requests = [0] * n
        self._errors = [0] * n
        self._hists = [[0] * _NBUCKETS for _ in range(n)]
        self._zeros = [0] * _NBUCKETS

    def record(self, now: float, is_error: bool, duration: float) -> None:
        """Count one finished request at time `now` (hot path: no allocation)."""
        sec = int(now)
        i = sec % self._n
        if self._stamps[i] != sec:
            # The slice holds an old second: reuse it for this one.
            self._stamps[i] = sec
            self._requests[i] = 0
            self._errors[i] = 0
            self._hists[i][:] = self._zeros
        self._requests[i] += 1
        if is_error:
            self._errors[i] += 1
        self._hists[i][bisect_left(LATENCY_BOUNDS, duration)] += 1

    def stats(self, now: float, window: float, since: float = -1.0) -> WindowStats:
        """Merge the slices whose second lies in (now - window, now] and after `since`.

        `since` (a time) starts the evidence afresh: the second it falls in is left out, so nothing
        recorded before it is counted (at the cost of up to one second of new evidence).
        """
        window = min(window, float(self.horizon))
        lo = max(now - window, since)
        requests = errors = 0
        hists: list[list[int]] = []
        for i, stamp in enumerate(self._stamps):
            if lo < stamp <= now and self._requests[i]:
                requests += self._requests[i]
                errors += self._errors[i]
                hists.append(self._hists[i])
        # Column sums in C: one tuple per bucket across the selected slices.
        counts = tuple(map(sum, zip(*hists, strict=True))) if hists else (0,) * _NBUCKETS
        return WindowStats(requests, errors, counts, window)

    def trailing(self, now: float, lengths: tuple[float, ...], since: float = -1.0) -> list[WindowStats]:
        """Stats of several trailing windows ending at `now` (lengths ascending), in one pass.

        Each is what `stats(now, length, since)` returns; the slices are merged newest first and a
        copy is taken at every length, so scanning many windows costs about as much as one.
        """
        picked = sorted(
            ((stamp, i) for i, stamp in enumerate(self._stamps) if since < stamp <= now and self._requests[i]),
            reverse=True,
        )
        out: list[WindowStats] = []
        requests = errors = 0
        acc: tuple[int, ...] = (0,) * _NBUCKETS
        k = 0
        for length in lengths:
            window = min(length, float(self.horizon))
            lo = now - window
            segment: list[list[int]] = []
            while k < len(picked) and picked[k][0] > lo:
                i = picked[k][1]
                requests += self._requests[i]
                errors += self._errors[i]
                segment.append(self._hists[i])
                k += 1
            if segment:
                # Column sums in C: the segment's slices, plus what the shorter windows held.
                acc = tuple(map(sum, zip(acc, *segment, strict=True)))
            out.append(WindowStats(requests, errors, acc, window))
        return out

    # -- cross-process merging (`run --workers N`: followers ship completed seconds to the leader) --

    def export_slices(self, after: int, upto: int) -> list[tuple[int, int, int, dict[int, int]]]:
        """Slices with `after < second <= upto` as (second, requests, errors, {bucket: count}).

        For shipping a worker's completed seconds to the leader process (sparse, JSON-friendly).
        """
        out: list[tuple[int, int, int, dict[int, int]]] = []
        for i, stamp in enumerate(self._stamps):
            if after < stamp <= upto and self._requests[i]:
                hist = {b: c for b, c in enumerate(self._hists[i]) if c}
                out.append((stamp, self._requests[i], self._errors[i], hist))
        out.sort(key=lambda s: s[0])
        return out

    def merge_slice(self, second: int, requests: int, errors: int, hist: dict[int, int]) -> None:
        """Add another process' counts for one second (see `export_slices`).

        A second older than the one its ring slot now holds is dropped: it left the horizon.
        """
        i = second % self._n
        stamp = self._stamps[i]
        if stamp > second:
            return
        if stamp != second:
            self._stamps[i] = second
            self._requests[i] = 0
            self._errors[i] = 0
            self._hists[i][:] = self._zeros
        self._requests[i] += requests
        self._errors[i] += errors
        target = self._hists[i]
        for bucket, count in hist.items():
            if 0 <= bucket < _NBUCKETS:
                target[bucket] += count
