"""Pure verdict: the canary's and the baseline's windows + thresholds -> Healthy / Breach / Insufficient.

Error rates are judged with one-sided tests at the configured confidence, so a handful of unlucky
requests at low traffic never trips a rollback, while a real regression under heavy traffic is seen
within seconds:

- absolute: H0 "canary rate <= max_error_rate", one-proportion score test (SE from the limit);
- increase: H0 "canary rate - baseline rate <= max_error_rate_increase", two-proportion Wald test with
  the Agresti-Caffo adjustment (one success and one failure added to each group), which stays sound
  when a group has zero errors.

Latency compares p99s taken from the merged histograms; it needs the same minimum sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from statistics import NormalDist
from typing import ClassVar

from proxy.analysis.window import LATENCY_BOUNDS, WindowStats
from proxy.config.model import Rollout

STATUS_TABLE_SIZE = 1000  # every 3-digit status code indexes it directly
_Z_CAP = 99.0  # keeps z-scores finite (and the JSON valid) when a standard error is 0


@dataclass(frozen=True, slots=True)
class Figures:
    """The numbers behind a verdict (rates are fractions, latencies seconds)."""

    canary_requests: int
    baseline_requests: int
    canary_errors: int
    baseline_errors: int
    canary_error_rate: float
    baseline_error_rate: float
    canary_p99: float | None
    baseline_p99: float | None
    z_error_rate: float | None = None  # canary vs max_error_rate
    z_increase: float | None = None  # canary - baseline vs max_error_rate_increase
    z_critical: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        """Plain dict for logs, webhooks and /status (rounded for readability)."""
        out: dict[str, float | int | None] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = round(value, 6) if isinstance(value, float) else value
        return out


@dataclass(frozen=True, slots=True)
class Healthy:
    figures: Figures
    reason: str = "within thresholds"
    kind: ClassVar[str] = "healthy"


@dataclass(frozen=True, slots=True)
class Breach:
    reason: str
    figures: Figures
    kind: ClassVar[str] = "breach"


@dataclass(frozen=True, slots=True)
class InsufficientData:
    reason: str
    figures: Figures
    kind: ClassVar[str] = "insufficient_data"


Verdict = Healthy | Breach | InsufficientData


def z_critical(confidence: float) -> float:
    """One-sided critical value of the standard normal at `confidence` (e.g. 0.99 -> 2.326)."""
    return NormalDist().inv_cdf(min(max(confidence, 1e-9), 1 - 1e-9))


def one_proportion_z(errors: int, n: int, limit: float) -> float:
    """Score statistic of H0 "rate <= limit"; large positive means the rate is above the limit."""
    if n <= 0:
        return 0.0
    rate = errors / n
    var = limit * (1.0 - limit) / n
    if var <= 0.0:
        # limit 0: any error is significant; limit 1: nothing can exceed it.
        return _cap(math.copysign(math.inf, rate - limit)) if rate != limit else 0.0
    return _cap((rate - limit) / math.sqrt(var))


def two_proportion_z(errors_a: int, n_a: int, errors_b: int, n_b: int, margin: float) -> float:
    """Statistic of H0 "rate_a - rate_b <= margin" (Agresti-Caffo adjusted Wald)."""
    if n_a <= 0 or n_b <= 0:
        return 0.0
    pa = (errors_a + 1) / (n_a + 2)
    pb = (errors_b + 1) / (n_b + 2)
    se = math.sqrt(pa * (1 - pa) / (n_a + 2) + pb * (1 - pb) / (n_b + 2))
    return _cap((pa - pb - margin) / se)


def _cap(z: float) -> float:
    return max(-_Z_CAP, min(_Z_CAP, z))


def judge(canary: WindowStats, baseline: WindowStats, cfg: Rollout) -> Verdict:
    """Compare the canary with the baseline over the same window. Pure."""
    cp99 = canary.quantile(0.99)
    bp99 = baseline.quantile(0.99)
    base = Figures(
        canary.requests,
        baseline.requests,
        canary.errors,
        baseline.errors,
        canary.error_rate,
        baseline.error_rate,
        cp99,
        bp99,
    )
    short = [
        f"{who} has {s.requests} requests in {_secs(s.window)}"
        for who, s in (("canary", canary), ("baseline", baseline))
        if s.requests < cfg.min_requests
    ]
    if short:
        return InsufficientData(f"{' and '.join(short)}, need {cfg.min_requests}", base)

    th = cfg.thresholds
    zc = z_critical(cfg.confidence)
    conf = _pct(cfg.confidence, 0)
    breaches: list[str] = []
    z_abs = z_inc = None
    if th.max_error_rate is not None:
        z_abs = one_proportion_z(canary.errors, canary.requests, th.max_error_rate)
        if z_abs > zc:
            breaches.append(
                f"canary error rate {_pct(canary.error_rate)} > {_pct(th.max_error_rate)}"
                f" (z={z_abs:.1f} at {conf})"
            )
    if th.max_error_rate_increase is not None:
        z_inc = two_proportion_z(
            canary.errors, canary.requests, baseline.errors, baseline.requests, th.max_error_rate_increase
        )
        if z_inc > zc:
            diff = (canary.error_rate - baseline.error_rate) * 100
            breaches.append(
                f"canary error rate {_pct(canary.error_rate)} vs baseline {_pct(baseline.error_rate)}"
                f" ({diff:+.1f} pts > +{th.max_error_rate_increase * 100:.1f}, z={z_inc:.1f} at {conf})"
            )
    if cp99 is not None:
        if th.max_p99 is not None and cp99 > th.max_p99:
            breaches.append(f"canary p99 {_ms(cp99)} > {_ms(th.max_p99)}")
        if th.max_p99_ratio is not None and bp99 is not None:
            # Below the histogram's resolution a ratio means nothing: floor both at the first bound.
            floor = LATENCY_BOUNDS[0]
            ratio = max(cp99, floor) / max(bp99, floor)
            if ratio > th.max_p99_ratio:
                breaches.append(
                    f"canary p99 {_ms(cp99)} is {ratio:.2f}x baseline {_ms(bp99)} (> {th.max_p99_ratio:g}x)"
                )
    figures = Figures(
        canary.requests,
        baseline.requests,
        canary.errors,
        baseline.errors,
        canary.error_rate,
        baseline.error_rate,
        cp99,
        bp99,
        z_abs,
        z_inc,
        zc,
    )
    if breaches:
        return Breach("; ".join(breaches), figures)
    return Healthy(figures)


def parse_error_statuses(error_statuses: tuple[str, ...]) -> frozenset[int]:
    """`("5xx", "429")` -> the set of status codes counted as errors."""
    codes: set[int] = set()
    for item in error_statuses:
        s = str(item).strip().lower()
        if len(s) == 3 and s.endswith("xx") and s[0].isdigit():
            first = int(s[0]) * 100
            codes.update(range(first, first + 100))
        elif s.isdigit():
            codes.add(int(s))
        else:
            raise ValueError(f"not a status code or class: {item!r}")
    return frozenset(codes)


def error_status_table(error_statuses: tuple[str, ...]) -> tuple[bool, ...]:
    """`table[status]` is True when a response with that status counts as an error (hot path).

    The table has STATUS_TABLE_SIZE (1000) entries, so any 3-digit status indexes it directly.
    Connect/timeout/reset failures are errors regardless; the data plane decides those.
    """
    codes = parse_error_statuses(error_statuses)
    return tuple(i in codes for i in range(STATUS_TABLE_SIZE))


def error_classifier(cfg: Rollout) -> Callable[[int], bool]:
    """`status -> is error` for a rollout config (a wrapper over the table, for non-hot paths)."""
    table = error_status_table(cfg.error_statuses)
    return lambda status: 0 <= status < STATUS_TABLE_SIZE and table[status]


def _pct(rate: float, digits: int = 1) -> str:
    return f"{rate * 100:.{digits}f}%"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms" if seconds < 10 else f"{seconds:.1f}s"


def _secs(seconds: float) -> str:
    return f"{seconds:g}s"
