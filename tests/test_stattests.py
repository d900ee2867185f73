"""The exact tests behind the verdict, against brute force and known values."""

from __future__ import annotations

import math
import random

import pytest

from proxy.analysis.latency import kth_slowest_upper_edge, slower_than
from proxy.analysis.stattests import (
    binomial_cdf,
    binomial_sf,
    mann_whitney_z,
    proportion_ucb,
    quantile_ucb_rank,
    z_of,
)
from proxy.analysis.window import LATENCY_BOUNDS, WindowStats


def brute_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize(("k", "n", "p"), [(0, 10, 0.1), (3, 10, 0.3), (5, 100, 0.01), (50, 100, 0.5), (9, 10, 0.99)])
def test_binomial_tails_match_brute_force(k: int, n: int, p: float) -> None:
    assert binomial_cdf(k, n, p) == pytest.approx(brute_cdf(k, n, p), rel=1e-9)
    if k > n * p:
        assert binomial_sf(k, n, p) == pytest.approx(1 - brute_cdf(k - 1, n, p), rel=1e-9)
    else:
        assert binomial_sf(k, n, p) >= 0.5


def test_clopper_pearson_upper_bound() -> None:
    for k, n in [(1, 10), (5, 100), (108, 10_800), (0, 90)]:
        u = proportion_ucb(k, n, 0.001)
        assert brute_cdf(k, n, u) == pytest.approx(0.001, rel=1e-3)
    assert proportion_ucb(0, 0, 0.01) == 1.0 and proportion_ucb(5, 5, 0.01) == 1.0


def test_quantile_bound_rank_covers_the_p99() -> None:
    # 0.99^n <= alpha is the fewest samples for any bound: below it there is none.
    assert quantile_ucb_rank(458, 0.99, 0.01) == 0
    assert quantile_ucb_rank(459, 0.99, 0.01) == 1
    # Coverage by simulation: the j-th slowest of n exceeds the true p99 nearly always.
    rng = random.Random(1)
    n, alpha = 2000, 0.01
    j = quantile_ucb_rank(n, 0.99, alpha)
    true_p99 = math.exp(2.326)  # lognormal(0, 1)
    misses = sum(
        sorted((rng.lognormvariate(0, 1) for _ in range(n)), reverse=True)[j - 1] < true_p99 for _ in range(300)
    )
    assert misses <= 9  # expected <= 3 (1%)


def test_mann_whitney_on_histograms() -> None:
    same = [0, 10, 20, 10, 0]
    assert mann_whitney_z(same, same, 0)[0] == pytest.approx(0.0)
    slower = [0, 0, 10, 20, 10]
    assert mann_whitney_z(slower, same, 0)[0] > 3
    assert mann_whitney_z(slower, same, 1)[0] == pytest.approx(0.0)  # shifted back: the same
    assert mann_whitney_z([], same, 0) == (0.0, 0, 40)


def test_histogram_helpers() -> None:
    stats = WindowStats.from_counts(4, 0, [0.01, 0.02, 0.5, 2.0])
    assert slower_than(stats.counts, 0.1) == 2
    assert slower_than(stats.counts, 10.0) == 0
    top = kth_slowest_upper_edge(stats.counts, 1)
    assert top is not None and 2.0 <= top < 2.0 * 1.1
    assert kth_slowest_upper_edge(stats.counts, 0) is None
    assert LATENCY_BOUNDS[0] == 0.001
    assert z_of(0.5) == pytest.approx(0.0) and z_of(0.0) == 99.0 and z_of(1.0) == -99.0
