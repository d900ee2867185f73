"""Small exact tests on counts and histograms (pure, no dependencies).

- `binomial_sf`: P(X >= k) for X ~ Binomial(n, p), summed exactly in log space;
- `proportion_ucb`: one-sided Clopper-Pearson upper confidence bound of a proportion;
- `quantile_ucb_rank`: how many of n samples lie, at a confidence, at or above the q-quantile
  (an order statistic that is an upper confidence bound of the quantile);
- `mann_whitney_z`: the Mann-Whitney U statistic of two log-spaced histograms, one shifted.

Tests return p-values; `z_of` turns a p-value into the equivalent one-sided normal score so
figures stay comparable with the critical value shown next to them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

_N = NormalDist()
_Z_CAP = 99.0  # keeps scores finite (and the JSON valid)


def _log_pmf(n: int, k: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the p-value of k "successes" under H0 "rate <= p"."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if k <= n * p:
        # Not above the mean: the p-value is about 0.5 or more; the exact figure is not needed.
        return max(0.5, 1.0 - binomial_cdf(k - 1, n, p))
    total = 0.0
    for i in range(k, n + 1):  # terms fall from k on (k is above the mode)
        term = math.exp(_log_pmf(n, i, p))
        total += term
        if term < total * 1e-12:
            break
    return min(total, 1.0)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    mode = int(n * p)
    # The largest term in [0, k] first, then downwards by the pmf recurrence until it is negligible.
    top = min(k, mode)
    total = 0.0
    term = math.exp(_log_pmf(n, k, p))
    down = (1.0 - p) / p
    i = k
    while i >= 0:
        total += term
        if i <= top and term < total * 1e-12:
            break
        term *= i / (n - i + 1) * down
        i -= 1
    return min(total, 1.0)


def proportion_ucb(k: int, n: int, alpha: float) -> float:
    """Clopper-Pearson upper bound: the largest p with P(X <= k | n, p) >= alpha (1.0 when n is 0)."""
    if n <= 0 or k >= n:
        return 1.0
    if k == 0:
        return float(1.0 - alpha ** (1.0 / n))
    lo = k / n
    hi = min(1.0, (k + 10.0 * math.sqrt(k + 1) + 40.0) / n)  # well above the bound for any alpha used
    if binomial_cdf(k, n, hi) > alpha:
        hi = 1.0
    while hi - lo > 1e-7 * hi:
        mid = (lo + hi) / 2
        if binomial_cdf(k, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def quantile_ucb_rank(n: int, q: float, alpha: float) -> int:
    """The j such that the j-th largest of n samples is >= the q-quantile with probability >= 1 - alpha.

    The number of samples at or above the quantile is Binomial(n, 1 - q); j is the largest count it
    reaches with probability >= 1 - alpha. 0 means n is too small for any bound at this confidence.
    """
    if n <= 0:
        return 0
    tail = 1.0 - q
    cumulative = 0.0
    # Start 8 standard deviations below the mean: the mass left out is far below any alpha used.
    mean = n * tail
    j = max(int(mean - 8.0 * math.sqrt(mean * q) - 1.0), 0)
    while j <= n:
        cumulative += math.exp(_log_pmf(n, j, tail))  # P(M <= j)
        if cumulative > alpha:
            return j  # P(M >= j) = 1 - P(M <= j - 1) >= 1 - alpha
        j += 1
    return n  # pragma: no cover - the cumulative reaches 1


def mann_whitney_z(canary: Sequence[int], baseline: Sequence[int], shift: int) -> tuple[float, int, int]:
    """Score of H0 "canary / ratio is not slower than the baseline" on two histograms.

    `shift` buckets are taken off every canary bucket index (dividing by the ratio on log-spaced
    buckets). Ties count half; the variance is the untied one, which is larger than the tied one,
    so the test errs on the side of "not slower". Returns (z, n_canary, n_baseline).
    """
    nb = sum(baseline)
    nc = sum(canary)
    if nb == 0 or nc == 0:
        return 0.0, nc, nb
    below = [0] * (len(baseline) + 1)  # below[i] = baseline samples in buckets < i
    for i, c in enumerate(baseline):
        below[i + 1] = below[i] + c
    last = len(baseline) - 1
    u = 0.0
    for i, c in enumerate(canary):
        if c:
            j = min(max(i - shift, 0), last)
            u += c * (below[j] + 0.5 * baseline[j])
    mean = nc * nb / 2.0
    sd = math.sqrt(nc * nb * (nc + nb + 1) / 12.0)
    return cap((u - mean) / sd), nc, nb


def z_of(p_value: float) -> float:
    """The one-sided normal score with upper tail `p_value` (capped)."""
    if p_value <= 0.0:
        return _Z_CAP
    if p_value >= 1.0:
        return -_Z_CAP
    return cap(-_N.inv_cdf(p_value))


def cap(z: float) -> float:
    """Clamp a score into [-99, 99]."""
    return max(-_Z_CAP, min(_Z_CAP, z))
