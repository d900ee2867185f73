"""Pure verdict: the canary's and the baseline's evidence + thresholds -> Healthy / Breach / Insufficient.

The evidence is a scan of trailing windows ending now (1, 2, 4, ... seconds up to `window`, none
reaching back before the canary's evidence started: a reset, a new version or a promotion). Every
check runs on every window, so a change is judged on the evidence since it happened, not diluted by
the healthy minute before it: detection time depends on how much bad evidence has arrived. Each test
runs at level (1 - confidence) / (2 K) for K windows (half for the baseline's confidence bound, half
for the canary's test), so a verdict's false-positive rate per check stays below 1 - confidence.

Errors, with exact one-sided binomial tests on the canary's count:
- absolute: H0 "canary rate <= max_error_rate";
- increase: H0 "canary rate <= baseline upper bound + max_error_rate_increase";
- ratio: H0 "canary rate <= max_error_rate_ratio x baseline upper bound" (Clopper-Pearson bounds).
Latency: see :mod:`proxy.analysis.latency` (tail count test with in-flight requests, Mann-Whitney).

`min_requests` guards passing only: below it the verdict is "insufficient data" (no step, no
promotion), but a breach proven at the confidence trips at any sample size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from statistics import NormalDist
from typing import ClassVar

from proxy.analysis.latency import (
    TAIL_SHARE,
    BodyFinding,
    InFlight,
    TailFinding,
    baseline_needed,
    body_scan,
    p99_absolute_scan,
    p99_ratio_scan,
    reference,
    shown,
)
from proxy.analysis.stattests import binomial_sf, proportion_ucb, z_of
from proxy.analysis.window import WindowStats
from proxy.config.model import Rollout

STATUS_TABLE_SIZE = 1000  # every 3-digit status code indexes it directly
_Z_CAP = 99.0  # keeps z-scores finite (and the JSON valid) when a standard error is 0


@dataclass(frozen=True, slots=True)
class Figures:
    """The numbers behind a verdict (rates are fractions, latencies seconds).

    Per check, the figures are those of the window with the strongest evidence (`*_window`, seconds).
    """

    canary_requests: int
    baseline_requests: int
    canary_errors: int
    baseline_errors: int
    canary_error_rate: float
    baseline_error_rate: float
    canary_p99: float | None
    baseline_p99: float | None
    z_error_rate: float | None = None  # canary vs max_error_rate
    z_increase: float | None = None  # canary vs baseline bound + max_error_rate_increase
    z_critical: float | None = None
    z_error_ratio: float | None = None  # canary vs max_error_rate_ratio x baseline bound
    error_window: float | None = None
    # tail: canary requests certainly slower than the bound (with those still in flight) vs 1%
    p99_bound: float | None = None
    baseline_p99_ucb: float | None = None
    canary_slow: int | None = None
    canary_slow_in_flight: int | None = None
    canary_latency_requests: int | None = None
    z_p99: float | None = None
    p99_window: float | None = None
    z_max_p99: float | None = None
    max_p99_slow: int | None = None
    # body: Mann-Whitney of canary / max_median_ratio vs baseline
    canary_median: float | None = None
    baseline_median: float | None = None
    z_median: float | None = None
    median_window: float | None = None
    evidence_seconds: float | None = None  # how far back the canary's evidence reaches

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


@dataclass(frozen=True, slots=True)
class Evidence:
    """What one verdict is given.

    `canary`: trailing windows ending now, shortest first, the last being the full `window` (none
    reaching before the canary's evidence started). `baseline`: trailing windows of the same lengths
    first, possibly followed by longer ones (references for the latency bound at low traffic).
    `inflight`: (age seconds, count) of canary requests still outstanding.
    """

    canary: tuple[WindowStats, ...]
    baseline: tuple[WindowStats, ...]
    inflight: tuple[tuple[float, int], ...] = ()
    evidence_seconds: float | None = None


def scan_lengths(window: float) -> tuple[float, ...]:
    """The trailing windows judged each tick: 1, 2, 4, ... seconds below `window`, then `window`."""
    out: list[float] = []
    length = 1.0
    while length < window:
        out.append(length)
        length *= 2
    out.append(float(window))
    return tuple(out)


def z_critical(confidence: float) -> float:
    """One-sided critical value of the standard normal at `confidence` (e.g. 0.99 -> 2.326)."""
    return NormalDist().inv_cdf(min(max(confidence, 1e-9), 1 - 1e-9))


def test_level(confidence: float, windows: int) -> float:
    """The level of each single test: (1 - confidence) / (2 x windows)."""
    return (1.0 - confidence) / (2 * max(windows, 1))


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


def rate_z(errors: int, n: int, limit: float) -> float:
    """Exact test of H0 "rate <= limit" as a one-sided z-score (the score statistic when not above)."""
    if n <= 0 or limit >= 1.0:
        return 0.0 if n <= 0 else -_Z_CAP
    if errors > n * limit:
        return z_of(binomial_sf(errors, n, limit))
    return one_proportion_z(errors, n, limit)


def _cap(z: float) -> float:
    return max(-_Z_CAP, min(_Z_CAP, z))


def judge(
    canary: WindowStats, baseline: WindowStats, cfg: Rollout, inflight: InFlight = ()
) -> Verdict:
    """Compare the canary with the baseline over one window. Pure."""
    return judge_evidence(Evidence((canary,), (baseline,), tuple(inflight)), cfg)


@dataclass(frozen=True, slots=True)
class _Found:
    z: float
    window: float
    reason: str


def _pick(found: list[_Found], zc: float) -> _Found | None:
    """The finding to report: the strongest when it breaches, else the longest window's."""
    if not found:
        return None
    best = max(found, key=lambda f: f.z)
    return best if best.z > zc else found[-1]


def _z(found: _Found | None) -> float | None:
    return None if found is None else found.z


def judge_evidence(ev: Evidence, cfg: Rollout) -> Verdict:
    """The verdict on a scan of windows (see `Evidence`). Pure."""
    canary, baseline = ev.canary[-1], _same(ev.baseline, ev.canary[-1].window)
    th = cfg.thresholds
    alpha = test_level(cfg.confidence, len(ev.canary))
    zc = z_of(alpha)
    at = f"{_pct(cfg.confidence, 0)}"
    breaches: list[str] = []

    # -- errors ----------------------------------------------------------------------------------
    ab: list[_Found] = []
    inc: list[_Found] = []
    rel: list[_Found] = []
    for c in ev.canary:
        b = _same(ev.baseline, c.window)
        where = f"over the last {_secs(c.window)}"
        seen = f"{_pct(c.error_rate)} ({c.errors}/{c.requests})"
        if th.max_error_rate is not None:
            z = rate_z(c.errors, c.requests, th.max_error_rate)
            ab.append(_Found(z, c.window, f"canary error rate {seen} > {_pct(th.max_error_rate)}"
                             f" (z={z:.1f} > {zc:.2f} at {at}, {where})"))
        if th.max_error_rate_increase is None and th.max_error_rate_ratio is None:
            continue
        bucb = proportion_ucb(b.errors, b.requests, alpha)
        if th.max_error_rate_increase is not None:
            z = rate_z(c.errors, c.requests, min(bucb + th.max_error_rate_increase, 1.0))
            diff = (c.error_rate - b.error_rate) * 100
            inc.append(_Found(z, c.window, f"canary error rate {seen} vs baseline {_pct(b.error_rate)}"
                              f" ({diff:+.1f} pts > +{th.max_error_rate_increase * 100:.1f} over the baseline's"
                              f" bound {_pct(bucb, 2)}, z={z:.1f} > {zc:.2f} at {at}, {where})"))
        if th.max_error_rate_ratio is not None:
            z = rate_z(c.errors, c.requests, min(th.max_error_rate_ratio * bucb, 1.0))
            rel.append(_Found(z, c.window, f"canary error rate {seen} > {th.max_error_rate_ratio:g}x baseline"
                              f" {_pct(b.error_rate)} (its bound {_pct(bucb, 2)},"
                              f" z={z:.1f} > {zc:.2f} at {at}, {where})"))
    err_shown = [_pick(found, zc) for found in (ab, inc, rel)]
    breaches += [f.reason for f in err_shown if f is not None and f.z > zc]
    err_window = max((f for f in err_shown if f is not None), key=lambda f: f.z, default=None)

    # -- latency ---------------------------------------------------------------------------------
    undecided: list[str] = []
    tail: TailFinding | None = None
    if th.max_p99_ratio is not None:
        tail = shown(p99_ratio_scan(ev.canary, ev.baseline, ev.inflight, th.max_p99_ratio, alpha), zc)
        if tail is None:
            need = baseline_needed(alpha)
            longest = ev.baseline[-1]
            undecided.append(
                f"the p99 check needs {need} baseline requests for a bound at {at}"
                f" (has {longest.requests} in {_secs(longest.window)})"
            )
        elif tail.z > zc:
            breaches.append(_tail_reason(tail, f"{th.max_p99_ratio:g}x baseline p99", zc, at))
    absolute: TailFinding | None = None
    if th.max_p99 is not None:
        absolute = shown(p99_absolute_scan(ev.canary, ev.inflight, th.max_p99), zc)
        if absolute is not None and absolute.z > zc:
            breaches.append(_tail_reason(absolute, f"max_p99 {_ms(th.max_p99)}", zc, at))
    body: BodyFinding | None = None
    if th.max_median_ratio is not None:
        body = shown(body_scan(ev.canary, ev.baseline, th.max_median_ratio, 1), zc)
        if body is not None and body.z > zc:
            cm = canary.quantile(0.5)
            bm = baseline.quantile(0.5)
            breaches.append(
                f"canary latency is more than {th.max_median_ratio:g}x the baseline's"
                f" (median {_ms(cm or 0.0)} vs {_ms(bm or 0.0)}; Mann-Whitney z={body.z:.1f} > {zc:.2f} at {at},"
                f" {body.canary_requests} vs {body.baseline_requests} requests over the last {_secs(body.window)})"
            )

    figures = Figures(
        canary.requests,
        baseline.requests,
        canary.errors,
        baseline.errors,
        canary.error_rate,
        baseline.error_rate,
        canary.quantile(0.99),
        baseline.quantile(0.99),
        _z(err_shown[0]),
        _z(err_shown[1]),
        zc,
        _z(err_shown[2]),
        err_window.window if err_window is not None else None,
        tail.bound if tail else None,
        tail.baseline_p99_ucb if tail else None,
        tail.slow if tail else None,
        tail.in_flight if tail else None,
        tail.requests if tail else None,
        tail.z if tail else None,
        tail.window if tail else None,
        absolute.z if absolute else None,
        absolute.slow if absolute else None,
        canary.quantile(0.5) if body else None,
        baseline.quantile(0.5) if body else None,
        body.z if body else None,
        body.window if body else None,
        ev.evidence_seconds,
    )
    if breaches:
        return Breach("; ".join(breaches), figures)
    short = [
        f"{who} has {s.requests} requests in {_secs(s.window)}"
        for who, s in (("canary", canary), ("baseline", baseline))
        if s.requests < cfg.min_requests
    ]
    if short:
        return InsufficientData(f"{' and '.join(short)}, need {cfg.min_requests}", figures)
    if undecided:
        return InsufficientData("; ".join(undecided), figures)
    return Healthy(figures)


def _same(windows: Sequence[WindowStats], length: float) -> WindowStats:
    """The window of exactly `length` (else the first longer, else the longest)."""
    found = reference(windows, length, 0)
    return found if found is not None else windows[-1]


def _tail_reason(f: TailFinding, what: str, zc: float, at: str) -> str:
    stuck = f", {f.in_flight} of them still in flight" if f.in_flight else ""
    bound = f"{_ms(f.bound)}"
    if f.baseline_p99_ucb is not None:
        bound += f", from the baseline p99's upper bound {_ms(f.baseline_p99_ucb)}"
    share = f.slow / f.requests if f.requests else 0.0
    return (
        f"canary p99 above {what}: {f.slow} of {f.requests} canary requests ({_pct(share)}) slower than"
        f" {bound}{stuck}; a healthy canary has {_pct(TAIL_SHARE, 0)} (z={f.z:.1f} > {zc:.2f} at {at},"
        f" over the last {_secs(f.window)})"
    )


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

