"""UpstreamWindow: per-second slices, the sliding merge, and histogram quantiles."""

from __future__ import annotations

import math
import random

import pytest

from proxy.analysis.window import LATENCY_BOUNDS, UpstreamWindow, WindowStats, bucket_index


def test_counts_requests_and_errors_in_the_window() -> None:
    w = UpstreamWindow(600)
    for i in range(100):
        w.record(1000.0 + i * 0.5, i % 10 == 0, 0.02)  # 50 seconds, 2 per second
    s = w.stats(1050.0, 60.0)
    assert (s.requests, s.errors) == (100, 10)
    assert s.error_rate == pytest.approx(0.1)
    assert s.rps == pytest.approx(100 / 60)
    assert sum(s.counts) == 100


def test_window_keeps_only_seconds_in_now_minus_window_to_now() -> None:
    w = UpstreamWindow(600)
    for sec in range(100, 200):
        w.record(sec + 0.25, sec < 150, 0.01)
    s = w.stats(199.5, 10.0)  # stamps 190..199
    assert (s.requests, s.errors) == (10, 0)
    s = w.stats(159.9, 20.0)  # stamps 140..159: 10 error seconds, 10 good ones
    assert (s.requests, s.errors) == (20, 10)
    # Nothing recorded after the evaluation time counts.
    assert w.stats(120.0, 10.0).requests == 10


def test_ring_reuses_slices_after_the_horizon() -> None:
    w = UpstreamWindow(10)
    w.record(5.0, True, 0.1)
    w.record(5.0 + 11, False, 0.1)  # same ring slot, eleven seconds later
    s = w.stats(16.0, 10.0)
    assert (s.requests, s.errors) == (1, 0)
    assert sum(s.counts) == 1
    # A window longer than the horizon is clamped to it.
    assert w.stats(16.0, 1000.0).window == 10.0


def test_empty_window_has_no_quantile() -> None:
    s = UpstreamWindow(60).stats(100.0, 60.0)
    assert s.requests == 0 and s.error_rate == 0.0
    assert s.quantile(0.99) is None
    assert WindowStats.empty().quantile(0.5) is None


@pytest.mark.parametrize("dist", ["uniform", "lognormal", "bimodal"])
def test_p99_is_within_a_few_percent(dist: str) -> None:
    rng = random.Random(42)
    samples: list[float] = []
    for _ in range(20_000):
        if dist == "uniform":
            d = rng.uniform(0.005, 0.4)
        elif dist == "lognormal":
            d = rng.lognormvariate(math.log(0.05), 0.6)
        else:
            d = rng.choice((rng.uniform(0.002, 0.004), rng.uniform(0.3, 0.5)))
        samples.append(d)
    w = UpstreamWindow(120)
    for i, d in enumerate(samples):
        w.record(i / 200, False, d)
    s = w.stats(100.0, 120.0)
    samples.sort()
    for q in (0.5, 0.9, 0.99):
        exact = samples[math.ceil(q * len(samples)) - 1]
        got = s.quantile(q)
        assert got is not None
        assert abs(got - exact) / exact < 0.05, (q, got, exact)


def test_quantile_edges() -> None:
    # Below the first bound: linear from 0; above the last: the last bound.
    tiny = WindowStats.from_counts(10, 0, [0.0001] * 10)
    q = tiny.quantile(0.5)
    assert q is not None and 0 < q <= LATENCY_BOUNDS[0]
    huge = WindowStats.from_counts(10, 0, [1000.0] * 10)
    assert huge.quantile(0.99) == LATENCY_BOUNDS[-1]
    assert bucket_index(LATENCY_BOUNDS[3]) == 3  # bounds are inclusive upper limits


def test_from_counts_builds_the_same_histogram_as_recording() -> None:
    durations = [0.01, 0.2, 0.2, 3.0]
    w = UpstreamWindow(60)
    for d in durations:
        w.record(10.0, False, d)
    assert w.stats(10.0, 60.0) == WindowStats.from_counts(4, 0, durations, window=60.0)


def test_export_and_merge_slices_between_processes() -> None:
    worker, leader = UpstreamWindow(60), UpstreamWindow(60)
    for sec in range(100, 110):
        worker.record(sec + 0.5, sec % 2 == 0, 0.05)
        worker.record(sec + 0.7, False, 2.0)
        leader.record(sec + 0.1, False, 0.05)
    exported = worker.export_slices(104, 108)  # completed seconds 105..108 only
    assert [s[0] for s in exported] == [105, 106, 107, 108]
    assert exported[0][1:3] == (2, 0) and sum(exported[0][3].values()) == 2
    for second, requests, errors, hist in exported:
        leader.merge_slice(second, requests, errors, hist)
    merged = leader.stats(108.5, 4.0)  # seconds 105..108
    assert (merged.requests, merged.errors) == (4 + 8, 2)
    assert sum(merged.counts) == 12
    # Too old for the ring slot (it now holds a newer second): dropped.
    leader.merge_slice(108 - 61, 5, 5, {0: 5})
    assert leader.stats(108.5, 60.0).errors == 2


def test_trailing_windows_match_stats_and_start_after_since() -> None:
    w = UpstreamWindow(600)
    for sec in range(100):
        for i in range(sec % 7 + 1):
            w.record(1000 + sec + i / 10, i == 0, 0.001 * (i + 1))
    lengths = (1.0, 2.0, 4.0, 8.0, 60.0, 600.0)
    got = w.trailing(1100.0, lengths)
    assert [g.window for g in got] == list(lengths)
    for g, length in zip(got, lengths, strict=True):
        assert g == w.stats(1100.0, length)
    # Evidence since 1090.5: the second it falls in and everything before are left out.
    since = w.trailing(1100.0, (60.0,), since=1090.5)[0]
    assert since == w.stats(1100.0, 60.0, since=1090.5)
    assert since.requests == sum(sec % 7 + 1 for sec in range(91, 100))
