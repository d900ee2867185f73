"""The verdict: the one-sided error-rate tests, min_requests guarding passing only, the latency tests,
and the error-status table.

The proofs are here, on seeded simulated traffic fed through the real window.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from proxy.analysis.verdict import (
    Breach,
    Evidence,
    Healthy,
    InsufficientData,
    error_classifier,
    error_status_table,
    judge,
    judge_evidence,
    one_proportion_z,
    parse_error_statuses,
    scan_lengths,
    two_proportion_z,
    z_critical,
)
from proxy.analysis.window import UpstreamWindow, WindowStats
from proxy.config.model import Rollout, Thresholds

CFG = Rollout(canary="canary", baseline="stable")  # default thresholds, min_requests 100, 99%


CFG_ERRORS = replace(CFG, thresholds=replace(Thresholds(), max_p99_ratio=None))  # the error checks alone


def ws(requests: int, errors: int, durations: list[float] | None = None) -> WindowStats:
    """Stats of one window; every request took 20 ms unless `durations` says otherwise."""
    return WindowStats.from_counts(requests, errors, [0.02] * requests if durations is None else durations)


def binomial(rng: random.Random, n: int, p: float) -> int:
    return sum(rng.random() < p for _ in range(n))


# -- proof 1: no false rollbacks ------------------------------------------------------------------


def test_proof_same_error_rate_is_never_rolled_back_in_10000_verdicts() -> None:
    """1% vs 1%, 10,000 independent windows at low traffic (the canary right at min_requests up to 4x)."""
    rng = random.Random(20240601)
    worst = 0.0
    for _ in range(10_000):
        nc = rng.randint(100, 400)
        nb = nc * rng.choice((1, 4, 19))  # 50%, 20% and 5% canary shares
        verdict = judge(ws(nc, binomial(rng, nc, 0.01)), ws(nb, binomial(rng, nb, 0.01)), CFG)
        assert not isinstance(verdict, Breach), verdict.reason
        # Healthy, or (a baseline too small for the p99 check's bound) insufficient, never a breach.
        assert isinstance(verdict, Healthy) or "baseline requests for a bound" in verdict.reason
        worst = max(worst, verdict.figures.z_increase or 0.0)
    assert worst < z_critical(0.99)


def test_proof_same_error_rate_streamed_through_the_window() -> None:
    """The same, as a live stream: 2,000 one-second ticks over overlapping 60s windows."""
    rng = random.Random(7)
    canary, baseline = UpstreamWindow(600), UpstreamWindow(600)
    verdicts = 0
    for sec in range(2_000):
        for _ in range(2):  # ~120 canary requests per window: just above min_requests
            canary.record(sec + rng.random(), rng.random() < 0.01, rng.uniform(0.01, 0.05))
        for _ in range(38):
            baseline.record(sec + rng.random(), rng.random() < 0.01, rng.uniform(0.01, 0.05))
        v = judge(canary.stats(sec + 1, 60.0), baseline.stats(sec + 1, 60.0), CFG)
        assert not isinstance(v, Breach), (sec, v.reason)
        verdicts += isinstance(v, Healthy)
    assert verdicts > 1_900  # all but the first minute had enough data


# -- proof 2: a bad canary is caught fast ---------------------------------------------------------


def _requests_until_breach(seed: int, canary_rps: int = 5, baseline_rps: int = 95) -> int | None:
    rng = random.Random(seed)
    canary, baseline = UpstreamWindow(600), UpstreamWindow(600)
    sent = 0
    for sec in range(120):
        for _ in range(canary_rps):
            sent += 1
            canary.record(sec + rng.random(), rng.random() < 0.10, 0.02)
        for _ in range(baseline_rps):
            baseline.record(sec + rng.random(), rng.random() < 0.01, 0.02)
        if isinstance(judge(canary.stats(sec + 1, 60.0), baseline.stats(sec + 1, 60.0), CFG), Breach):
            return sent
    return None


def test_proof_ten_percent_errors_rolled_back_within_300_canary_requests() -> None:
    for seed in range(20):
        sent = _requests_until_breach(seed)
        assert sent is not None and sent <= 300, (seed, sent)


def test_detection_rate_by_300_requests_over_many_runs() -> None:
    """The statistical form of the proof: >= 98.5% of 1,000 runs trip by 300 canary requests (exact
    tests at 1% / 2 per window: the price of scanning several windows soundly)."""
    rng = random.Random(99)
    tripped = 0
    firsts: list[int] = []
    for _ in range(1_000):
        xc = xb = 0
        for sec in range(1, 61):  # 5 canary / 95 baseline rps; 300 requests fit in one window
            xc += binomial(rng, 5, 0.10)
            xb += binomial(rng, 95, 0.01)
            if isinstance(judge(ws(5 * sec, xc), ws(95 * sec, xb), CFG), Breach):
                tripped += 1
                firsts.append(5 * sec)
                break
    assert tripped >= 985
    firsts.sort()
    assert firsts[len(firsts) // 2] <= 150  # typically caught soon after min_requests


# -- proof 3: min_requests guards passing, not failing ---------------------------------------------


@pytest.mark.parametrize(("nc", "nb"), [(99, 5000), (5000, 99), (99, 99), (3, 5000)])
def test_a_proven_breach_trips_below_min_requests(nc: int, nb: int) -> None:
    v = judge(ws(nc, nc, [0.01] * nc), ws(nb, 0, [0.01] * nb), CFG)
    assert isinstance(v, Breach), v.reason
    assert f"canary error rate 100.0% ({nc}/{nc}) > 5.0%" in v.reason
    assert v.figures.canary_requests == nc


def test_the_smallest_evidence_that_trips_is_three_failures_in_three() -> None:
    """The README's figure: with the default 60 s window (7 windows scanned, each test at 1% / 14),
    3 failures in 3 canary requests are proof at 99% (against the 5% limit, and against a baseline
    at 1% plus the 2-point margin); 2 in 2 are not."""

    def scan(n: int) -> Evidence:
        lengths = scan_lengths(60.0)
        canary = tuple(WindowStats.from_counts(n, n, [0.01] * n, window=w) for w in lengths)
        base = tuple(WindowStats.from_counts(5000, 50, [0.01] * 5000, window=w) for w in lengths)
        return Evidence(canary, base)

    assert len(scan_lengths(60.0)) == 7
    assert isinstance(judge_evidence(scan(2), CFG), InsufficientData)
    v = judge_evidence(scan(3), CFG)
    assert isinstance(v, Breach) and "100.0% (3/3) > 5.0%" in v.reason
    # One window alone (judge) tests at 1% / 2: there 2 in 2 already is proof, 1 in 1 is not.
    assert isinstance(judge(ws(1, 1), ws(5000, 50), CFG), InsufficientData)
    assert isinstance(judge(ws(2, 2), ws(5000, 50), CFG), Breach)


@pytest.mark.parametrize(("nc", "nb"), [(99, 5000), (5000, 99), (0, 0), (99, 99)])
def test_fewer_than_min_requests_never_passes(nc: int, nb: int) -> None:
    v = judge(ws(nc, 0, [0.01] * nc), ws(nb, 0, [0.01] * nb), CFG)
    assert isinstance(v, InsufficientData)
    assert "need 100" in v.reason
    assert v.figures.canary_requests == nc


# -- the tests themselves -------------------------------------------------------------------------


def test_breach_reason_reads_well() -> None:
    v = judge(ws(1000, 100), ws(1000, 10), CFG)
    assert isinstance(v, Breach)
    assert "canary error rate 10.0% (100/1000) > 5.0%" in v.reason
    assert "canary error rate 10.0% (100/1000) vs baseline 1.0% (+9.0 pts > +2.0 over the baseline's bound" in v.reason
    assert "at 99%" in v.reason
    f = v.figures
    assert f.z_increase is not None and f.z_critical is not None and f.z_increase > f.z_critical
    assert f.as_dict()["canary_error_rate"] == pytest.approx(0.1)


def test_heavy_traffic_sees_a_small_increase_low_traffic_does_not() -> None:
    cfg = replace(CFG, thresholds=Thresholds(max_error_rate=None, max_error_rate_increase=0.0, max_p99_ratio=None))
    assert isinstance(judge(ws(100_000, 1_500), ws(100_000, 1_000), cfg), Breach)  # 1.5% vs 1.0%
    assert isinstance(judge(ws(200, 3), ws(200, 2), cfg), Healthy)  # too little to tell


def test_increase_margin_is_respected() -> None:
    # +1 point against a +2 margin is healthy however much traffic there is.
    assert isinstance(judge(ws(1_000_000, 20_000), ws(1_000_000, 10_000), CFG), Healthy)
    assert isinstance(judge(ws(1_000_000, 35_000), ws(1_000_000, 10_000), CFG), Breach)


def test_relative_threshold_catches_a_tripled_rate_the_defaults_let_through() -> None:
    """1% -> 3%: +2 points is inside the default absolute margin; 3x is above max_error_rate_ratio 2."""
    canary, base = ws(20_000, 600), ws(100_000, 1_000)
    assert isinstance(judge(canary, base, CFG), Healthy)
    cfg = replace(CFG, thresholds=replace(Thresholds(), max_error_rate_ratio=2.0))
    v = judge(canary, base, cfg)
    assert isinstance(v, Breach) and "> 2x baseline 1.0%" in v.reason
    assert v.figures.z_error_ratio is not None and v.figures.z_error_ratio > (v.figures.z_critical or 0)
    # 1.8x is inside the ratio however much traffic there is.
    assert isinstance(judge(ws(1_000_000, 18_000), ws(1_000_000, 10_000), cfg), Healthy)


def test_absolute_limit_is_a_one_sided_test() -> None:
    cfg = replace(CFG, thresholds=Thresholds(max_error_rate=0.05, max_error_rate_increase=None, max_p99_ratio=None))
    # 8% of 100 is not significantly above 5%; 8% of 2000 is.
    assert isinstance(judge(ws(100, 8), ws(100, 8), cfg), Healthy)
    v = judge(ws(2000, 160), ws(2000, 160), cfg)
    assert isinstance(v, Breach) and "canary error rate 8.0% (160/2000) > 5.0%" in v.reason


def test_disabled_thresholds_never_breach() -> None:
    cfg = replace(CFG, thresholds=Thresholds(None, None, None, None))
    assert isinstance(judge(ws(1000, 1000), ws(1000, 0), cfg), Healthy)


def test_latency_thresholds() -> None:
    cfg = replace(CFG, thresholds=Thresholds(None, None, max_p99=0.8, max_p99_ratio=1.5))
    fast = [0.1] * 2000
    slow = [0.1] * 190 + [1.2] * 10
    v = judge(ws(200, 0, slow), ws(2000, 0, fast), cfg)
    assert isinstance(v, Breach)
    assert "canary p99 above max_p99 800ms: 10 of 200 canary requests (5.0%) slower than 800ms" in v.reason
    assert "canary p99 above 1.5x baseline p99: 10 of 200" in v.reason
    assert v.figures.canary_slow == 10 and v.figures.p99_bound is not None
    assert isinstance(judge(ws(200, 0, fast[:200]), ws(2000, 0, fast), cfg), Healthy)
    # 1.4x slower: inside the ratio.
    assert isinstance(judge(ws(200, 0, [0.14] * 200), ws(2000, 0, fast), cfg), Healthy)


def test_p99_ratio_waits_for_a_baseline_bound() -> None:
    """Too few baseline requests for an upper bound of its p99 at the confidence: no pass, no fail."""
    cfg = replace(CFG, thresholds=Thresholds(None, None, None, max_p99_ratio=1.5))
    v = judge(ws(200, 0, [5.0] * 200), ws(200, 0, [0.01] * 200), cfg)
    assert isinstance(v, InsufficientData) and "baseline requests for a bound" in v.reason


def test_p99_ratio_ignores_differences_below_the_histogram_floor() -> None:
    cfg = replace(CFG, thresholds=Thresholds(None, None, None, max_p99_ratio=1.5))
    assert isinstance(judge(ws(200, 0, [0.0009] * 200), ws(2000, 0, [0.0001] * 2000), cfg), Healthy)


def test_requests_still_in_flight_count_as_slow() -> None:
    """A hung canary: nothing finished slow, but 5 requests are outstanding for longer than the bound."""
    fast = [0.02] * 2000
    healthy = judge(ws(100, 0, fast[:100]), ws(2000, 0, fast), CFG)
    assert isinstance(healthy, Healthy)
    v = judge(ws(100, 0, fast[:100]), ws(2000, 0, fast), CFG, inflight=[(0.5, 5), (0.01, 40)])
    assert isinstance(v, Breach), v.reason
    assert "5 of them still in flight" in v.reason
    assert v.figures.canary_slow_in_flight == 5 and v.figures.canary_latency_requests == 105


def test_median_shift_with_mann_whitney() -> None:
    rng = random.Random(5)
    base = [rng.lognormvariate(-4, 1) for _ in range(2000)]
    same = [rng.lognormvariate(-4, 1) for _ in range(300)]
    doubled = [2 * rng.lognormvariate(-4, 1) for _ in range(300)]
    cfg = replace(CFG, thresholds=Thresholds(None, None, None, None, max_median_ratio=1.5))
    assert isinstance(judge(ws(300, 0, same), ws(2000, 0, base), cfg), Healthy)
    v = judge(ws(300, 0, doubled), ws(2000, 0, base), cfg)
    assert isinstance(v, Breach) and "Mann-Whitney" in v.reason
    assert v.figures.z_median is not None and v.figures.z_median > (v.figures.z_critical or 0)


def test_z_helpers_edge_cases() -> None:
    assert one_proportion_z(1, 100, 0.0) > 50  # any error breaks a zero limit
    assert one_proportion_z(100, 100, 1.0) == 0.0
    assert one_proportion_z(0, 0, 0.05) == 0.0
    assert two_proportion_z(0, 100, 0, 100, 0.0) == pytest.approx(0.0)
    assert two_proportion_z(100, 100, 0, 100, 0.02) > 20  # finite even with no variance
    assert z_critical(0.99) == pytest.approx(2.326, abs=1e-3)


def test_error_status_table() -> None:
    table = error_status_table(("5xx", "429"))
    assert len(table) == 1000
    assert table[500] and table[599] and table[429] and table[503]
    assert not table[200] and not table[404] and not table[600] and not table[428]
    assert error_status_table(("5xx",))[502]
    assert parse_error_statuses(("4XX",)) == frozenset(range(400, 500))
    with pytest.raises(ValueError, match="not a status"):
        parse_error_statuses(("bad",))
    is_error = error_classifier(replace(CFG, error_statuses=("5xx", "429")))
    assert is_error(429) and is_error(502) and not is_error(200) and not is_error(1500)
