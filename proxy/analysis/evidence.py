"""Gathering the evidence a verdict is given, and the canary's per-try timeout derived from it.

This is the controller's (impure) edge: it reads the windows and the canary's outstanding tries from
`Stats`; the verdict itself stays a pure function of the `Evidence`.
"""

from __future__ import annotations

from proxy.analysis.rollout import RolloutState
from proxy.analysis.stats import Stats
from proxy.analysis.verdict import Evidence, scan_lengths
from proxy.analysis.window import WindowStats
from proxy.config.model import Rollout

TRY_TIMEOUT_FLOOR = 1.0  # seconds: the derived canary try timeout is never shorter
TRY_TIMEOUT_FACTOR = 10.0  # x the baseline's p99
TRY_TIMEOUT_MIN_REQUESTS = 100  # baseline requests before its p99 means anything


def baseline_lengths(window: float, horizon: float) -> tuple[float, ...]:
    """The canary's scan lengths, then doublings of `window` up to the stats horizon (references
    for the latency bound when the baseline is thin)."""
    lengths = list(scan_lengths(window))
    length = window * 2
    while length < horizon:
        lengths.append(length)
        length *= 2
    if horizon > window:
        lengths.append(horizon)
    return tuple(lengths)


def gather(stats: Stats, rollout: Rollout, state: RolloutState, now: float, mono_now: float) -> Evidence:
    """The canary's trailing windows since its evidence started, the baseline's, and the canary's
    outstanding tries (ages from the monotonic clock `mono_now`)."""
    lengths = scan_lengths(rollout.window)
    horizon = float(stats.window_horizon)
    canary_us = stats.upstreams.get(rollout.canary)
    baseline_us = stats.upstreams.get(rollout.baseline)
    since = state.evidence_since
    if canary_us is None:
        canary = tuple(WindowStats.empty(length) for length in lengths)
        inflight: tuple[tuple[float, int], ...] = ()
    else:
        canary = tuple(canary_us.window.trailing(now, lengths, since))
        inflight = tuple(canary_us.outstanding(mono_now)) if canary_us.track_inflight else ()
    blengths = baseline_lengths(rollout.window, horizon)
    if baseline_us is None:
        baseline = tuple(WindowStats.empty(length) for length in blengths)
    else:
        baseline = tuple(baseline_us.window.trailing(now, blengths))
    return Evidence(canary, baseline, inflight, max(now - since, 0.0) if since else None)


def single(canary: WindowStats, baseline: WindowStats) -> Evidence:
    """Evidence of one window per side (e.g. a fleet's merged windows): no scan, nothing in flight."""
    return Evidence((canary,), (baseline,))


def full_windows(evidence: Evidence) -> tuple[WindowStats, WindowStats]:
    """The canary's full window and the baseline's window of the same length."""
    canary = evidence.canary[-1]
    baseline = next((b for b in evidence.baseline if b.window >= canary.window), evidence.baseline[-1])
    return canary, baseline


def canary_try_timeout(rollout: Rollout, evidence: Evidence, response_timeout: float) -> float:
    """The canary's per-try timeout in seconds (0: only `timeouts.response`).

    `rollout.canary_try_timeout` when set; else max(1s, 10x the baseline's p99) once the baseline has
    enough requests for a p99 (before that a guess could send healthy slow requests to the baseline).
    """
    if rollout.canary_try_timeout is not None:
        value = rollout.canary_try_timeout
    else:
        ref = next(
            (b for b in evidence.baseline if b.window >= rollout.window and b.requests >= TRY_TIMEOUT_MIN_REQUESTS),
            None,
        )
        p99 = ref.quantile(0.99) if ref is not None else None
        if p99 is None:
            return 0.0
        value = max(TRY_TIMEOUT_FLOOR, TRY_TIMEOUT_FACTOR * p99)
    return value if value < response_timeout else 0.0
