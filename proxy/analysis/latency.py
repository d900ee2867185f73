"""Latency tests on the windows' histograms (pure).

Tail (`max_p99_ratio`, `max_p99`): a canary whose p99 is within the limit has at most 1% of its
requests slower than the limit. So the test counts the canary requests that are certainly slower
than the bound (whole histogram buckets above it, plus requests still in flight for longer than it:
right-censored observations) and asks, with an exact one-sided binomial test, whether that count is
more than 1% could explain. For `max_p99_ratio` the bound is `ratio x` an upper confidence bound of
the baseline's p99 (an order statistic: the j-th slowest baseline request, j chosen so that it lies
above the true p99 at the confidence). Until the baseline has enough requests for that bound the
check cannot judge ("insufficient data").

Body (`max_median_ratio`): a Mann-Whitney U test of "canary latency / ratio is not slower than the
baseline" on the histograms (log-spaced buckets, so dividing by the ratio is a shift of buckets).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from proxy.analysis.stattests import binomial_sf, mann_whitney_z, quantile_ucb_rank, z_of
from proxy.analysis.window import LATENCY_BOUNDS, WindowStats

TAIL_Q = 0.99  # the quantile the tail checks are about
TAIL_SHARE = 1.0 - TAIL_Q  # the share of requests a healthy canary has above its p99
BUCKETS_PER_DOUBLING = 8  # see LATENCY_BOUNDS

InFlight = Sequence[tuple[float, int]]  # (age in seconds, count) of canary requests still outstanding


@dataclass(frozen=True, slots=True)
class TailFinding:
    """One tail test on one window."""

    z: float
    slow: int  # canary requests certainly slower than the bound (completed + in flight)
    requests: int  # canary requests in the test (completed + those counted in flight)
    in_flight: int  # of `slow`, the requests still outstanding
    bound: float  # seconds
    baseline_p99_ucb: float | None  # for the ratio check
    window: float


@dataclass(frozen=True, slots=True)
class BodyFinding:
    """One Mann-Whitney test on one window."""

    z: float
    canary_requests: int
    baseline_requests: int
    window: float


F = TypeVar("F", TailFinding, BodyFinding)


def slower_than(counts: Sequence[int], bound: float) -> int:
    """Requests slower than `bound`: whole buckets above it, and the share of the bucket holding it
    that lies above on the log scale (rounded down)."""
    i = bisect_left(LATENCY_BOUNDS, bound)  # bucket i covers (LATENCY_BOUNDS[i-1], LATENCY_BOUNDS[i]]
    if i >= len(LATENCY_BOUNDS):
        return counts[-1] if bound < LATENCY_BOUNDS[-1] else 0
    above = sum(counts[i + 1 :])
    if i > 0 and counts[i]:
        lo, hi = LATENCY_BOUNDS[i - 1], LATENCY_BOUNDS[i]
        above += int(counts[i] * math.log(hi / bound) / math.log(hi / lo))
    return above


def kth_slowest_upper_edge(counts: Sequence[int], j: int) -> float | None:
    """Upper edge of the bucket holding the j-th slowest request (None: j is 0 or it overflowed)."""
    if j <= 0:
        return None
    seen = 0
    for i in range(len(counts) - 1, -1, -1):
        seen += counts[i]
        if seen >= j:
            return LATENCY_BOUNDS[i] if i < len(LATENCY_BOUNDS) else None
    return None


def baseline_needed(alpha: float) -> int:
    """The fewest baseline requests for which a p99 upper bound exists at level alpha."""
    return math.ceil(math.log(alpha) / math.log(TAIL_Q))


def p99_ucb(baseline: WindowStats, alpha: float) -> float | None:
    """Upper confidence bound (level 1 - alpha) of the baseline's p99, or None with too few requests."""
    n = sum(baseline.counts)
    return kth_slowest_upper_edge(baseline.counts, quantile_ucb_rank(n, TAIL_Q, alpha))


def censored_slow(inflight: InFlight, bound: float, window: float | None) -> int:
    """In-flight canary requests already outstanding longer than `bound` (and started within
    `window` seconds, when given)."""
    return sum(c for age, c in inflight if age > bound and (window is None or age <= window))


def tail_test(
    canary: WindowStats,
    bound: float,
    inflight: InFlight,
    ucb: float | None,
    full: bool,
) -> TailFinding:
    """Is the share of canary requests slower than `bound` above 1%? (exact binomial, as a z-score)."""
    stuck = censored_slow(inflight, bound, None if full else canary.window)
    slow = slower_than(canary.counts, bound) + stuck
    n = sum(canary.counts) + stuck
    if n == 0:
        z = 0.0
    elif slow > n * TAIL_SHARE:
        z = z_of(binomial_sf(slow, n, TAIL_SHARE))
    else:
        z = (slow - n * TAIL_SHARE) / math.sqrt(n * TAIL_SHARE * (1 - TAIL_SHARE))
    return TailFinding(z, slow, n, stuck, bound, ucb, canary.window)


def reference(baselines: Sequence[WindowStats], length: float, need: int) -> WindowStats | None:
    """The shortest baseline window at least `length` long with `need` requests (None: none has)."""
    for b in baselines:
        if b.window >= length and sum(b.counts) >= need:
            return b
    return None


def baseline_tail_bound(
    canary_window: float, baselines: Sequence[WindowStats], long_ucb: float | None
) -> float | None:
    """The baseline p99 a canary window is compared with: the upper confidence bound from the
    longest baseline window with enough requests (tight), raised to the baseline's own p99 over the
    same recent window when that is higher (so a slowdown both share does not count against the
    canary)."""
    if long_ucb is None:
        return None
    same = reference(baselines, canary_window, 1)
    recent = same.quantile(TAIL_Q) if same is not None else None
    return max(long_ucb, recent or 0.0)


def p99_ratio_scan(
    canaries: Sequence[WindowStats],
    baselines: Sequence[WindowStats],
    inflight: InFlight,
    ratio: float,
    alpha: float,
) -> list[TailFinding]:
    """Tail findings against `ratio x` the baseline p99 bound, one per canary window (empty: the
    baseline has too few requests for a bound yet)."""
    need = baseline_needed(alpha)
    longest = next((b for b in reversed(baselines) if sum(b.counts) >= need), None)
    long_ucb = p99_ucb(longest, alpha) if longest is not None else None
    out: list[TailFinding] = []
    last = len(canaries) - 1
    for i, c in enumerate(canaries):
        base = baseline_tail_bound(c.window, baselines, long_ucb)
        if base is None:
            continue
        out.append(tail_test(c, ratio * base, inflight, base, i == last))
    return out


def p99_absolute_scan(canaries: Sequence[WindowStats], inflight: InFlight, limit: float) -> list[TailFinding]:
    """Tail findings against the absolute `max_p99`, one per window."""
    last = len(canaries) - 1
    return [tail_test(c, limit, inflight, None, i == last) for i, c in enumerate(canaries)]


def body_scan(
    canaries: Sequence[WindowStats], baselines: Sequence[WindowStats], ratio: float, need: int
) -> list[BodyFinding]:
    """Mann-Whitney findings of "canary slower than `ratio x` the baseline", one per window with data."""
    # Dividing by the ratio = moving down whole buckets; rounding up never makes the canary look slower.
    shift = math.ceil(BUCKETS_PER_DOUBLING * math.log2(ratio) - 1e-9)
    out: list[BodyFinding] = []
    for c in canaries:
        # The same recent window of the baseline (a slowdown both share is not the canary's doing).
        ref = reference(baselines, c.window, need) or (baselines[-1] if baselines else None)
        if ref is None:
            continue
        z, nc, nb = mann_whitney_z(c.counts, ref.counts, shift)
        if nc and nb:
            out.append(BodyFinding(z, nc, nb, c.window))
    return out


def shown(findings: Sequence[F], critical: float) -> F | None:
    """The finding to report: the strongest when it breaches, else the longest window's."""
    if not findings:
        return None
    best = max(findings, key=lambda f: f.z)
    return best if best.z > critical else findings[-1]
