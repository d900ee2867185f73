"""Decision quality: false rollbacks and detection speed of the rollout analysis, by simulation.

Seeded synthetic traffic (Poisson arrivals, lognormal latencies, Bernoulli errors) is recorded into
the REAL per-upstream windows (`proxy.stats.Stats`), and every simulated second the REAL evidence
gathering and verdict (`proxy.analysis.evidence.gather`, `proxy.analysis.verdict.judge_evidence`)
run, as the controller's tick does. Nothing is mocked but the clock and the traffic.

    python -m loadtests.decision_quality                  # every table, the seeds of RESULTS.md
    python -m loadtests.decision_quality --quick          # fewer seeds
    python -m loadtests.decision_quality --only errors

Tables: false rollbacks with identical canary and baseline; p99 / median regressions; an error
rate rising mid-run; a canary failing every request at low traffic.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from proxy.analysis.evidence import gather
from proxy.analysis.rollout import initial_state
from proxy.analysis.stats import Stats
from proxy.analysis.verdict import Breach, judge_evidence
from proxy.config.model import Metrics, Rollout, Thresholds

MEDIAN = 0.020  # seconds
BUCKETS = Metrics().buckets
DEFAULT = Rollout(canary="canary", baseline="stable")  # the shipped defaults

Latency = Callable[[random.Random], float]
ErrorRate = Callable[[float], float]  # seconds since start -> error probability


def lognormal(median: float, sigma: float, scale: float = 1.0) -> Latency:
    mu = math.log(median)
    return lambda rng: scale * rng.lognormvariate(mu, sigma)


def constant(rate: float) -> ErrorRate:
    return lambda t: rate


@dataclass(frozen=True)
class Arm:
    rps: float
    latency: Latency
    errors: ErrorRate


@dataclass
class Run:
    verdicts: int = 0
    breaches: int = 0
    first_breach: float | None = None  # seconds since start
    canary_after_change: int = 0  # canary requests from the change to the first breach
    reason: str = ""


def simulate(
    seed: int,
    cfg: Rollout,
    canary: Arm,
    baseline: Arm,
    seconds: int,
    change_at: float = 0.0,
    bad: Arm | None = None,
    stop_at_breach: bool = True,
) -> Run:
    """One seeded run; `bad` replaces the canary from `change_at` on."""
    rng = random.Random(seed)
    stats = Stats(window_horizon=600)
    t0 = 1_000_000.0
    state = initial_state(cfg, None, t0)
    cw = stats.upstream(cfg.canary, BUCKETS).window
    bw = stats.upstream(cfg.baseline, BUCKETS).window
    next_c = rng.expovariate(canary.rps)
    next_b = rng.expovariate(baseline.rps)
    run = Run()
    for sec in range(seconds):
        end = sec + 1.0
        while next_b < end:
            bw.record(t0 + next_b, rng.random() < baseline.errors(next_b), baseline.latency(rng))
            next_b += rng.expovariate(baseline.rps)
        while next_c < end:
            arm = bad if bad is not None and next_c >= change_at else canary
            cw.record(t0 + next_c, rng.random() < arm.errors(next_c), arm.latency(rng))
            if next_c >= change_at:
                run.canary_after_change += 1
            next_c += rng.expovariate(arm.rps)
        verdict = judge_evidence(gather(stats, cfg, state, t0 + end, 0.0), cfg)
        run.verdicts += 1
        if isinstance(verdict, Breach):
            run.breaches += 1
            if run.first_breach is None:
                run.first_breach = end
                run.reason = verdict.reason
                if stop_at_breach:
                    return run
    if run.first_breach is None:
        run.canary_after_change = -1  # never caught
    return run


# -- tables -----------------------------------------------------------------------------------------


FP_HEADER = [
    "| latency sigma | canary req/s | runs x verdicts | breaching verdicts | runs with a false rollback |",
    "|---|---|---|---|---|",
]


def false_positives(seeds: int, seconds: int) -> list[str]:
    lines = list(FP_HEADER)
    for sigma in (0.5, 1.0, 1.5):
        for rps in (5.0, 30.0, 200.0):
            arm = Arm(rps, lognormal(MEDIAN, sigma), constant(0.01))
            verdicts = breaches = runs_hit = 0
            for seed in range(seeds):
                r = simulate(seed, DEFAULT, arm, arm, seconds, stop_at_breach=False)
                verdicts += r.verdicts
                breaches += r.breaches
                runs_hit += r.breaches > 0
            lines.append(
                f"| {sigma:g} | {rps:g} (50/50) | {seeds} x {seconds} | {breaches} of {verdicts}"
                f" ({100 * breaches / verdicts:.3f}%) | {runs_hit} of {seeds} |"
            )
            print(lines[-1], flush=True)
    return lines


def _detect(name: str, seeds: int, cfg: Rollout, good: Arm, bad: Arm, base: Arm, change_at: float, seconds: int) -> str:
    reqs: list[int] = []
    secs: list[float] = []
    missed = 0
    for seed in range(seeds):
        r = simulate(1000 + seed, cfg, good, base, seconds, change_at, bad)
        if r.first_breach is None or r.first_breach < change_at:
            missed += 1
            continue
        reqs.append(r.canary_after_change)
        secs.append(r.first_breach - change_at)
    if reqs:
        q = sorted(reqs)
        s = sorted(secs)
        med_r, med_s = statistics.median(q), statistics.median(s)
        span_r = f"{q[0]}-{q[-1]}"
        span_s = f"{s[0]:.0f}-{s[-1]:.0f}"
        caught = f"{len(reqs)} of {seeds}"
        line = f"| {name} | {caught} | {med_r:.0f} ({span_r}) | {med_s:.0f} ({span_s}) |"
    else:
        line = f"| {name} | 0 of {seeds} in {seconds - change_at:.0f} s | - | - |"
    print(line, flush=True)
    return line


HEADER = [
    "| case | caught | canary requests to rollback, median (range) | seconds, median (range) |",
    "|---|---|---|---|",
]


def latency_detection(seeds: int) -> list[str]:
    lines = list(HEADER)
    sigma = 1.0
    base = Arm(200.0, lognormal(MEDIAN, sigma), constant(0.01))
    tail = lambda factor: lognormal(MEDIAN, sigma + math.log(factor) / 2.326)  # noqa: E731 - same median
    cases = [
        ("p99 +100%, median same; default max_p99_ratio 1.5", DEFAULT, tail(2.0)),
        ("p99 +50%, median same; default max_p99_ratio 1.5 (at the threshold)", DEFAULT, tail(1.5)),
        ("p99 +50%, median same; max_p99_ratio 1.25", _th(max_p99_ratio=1.25), tail(1.5)),
        ("p99 +200%, median same; default", DEFAULT, tail(3.0)),
        ("everything 2x (median and p99); default", DEFAULT, lognormal(MEDIAN, sigma, 2.0)),
        (
            "everything 2x; max_median_ratio 1.5, p99 check off",
            _th(max_p99_ratio=None, max_median_ratio=1.5),
            lognormal(MEDIAN, sigma, 2.0),
        ),
        ("everything 3x; default", DEFAULT, lognormal(MEDIAN, sigma, 3.0)),
    ]
    for name, cfg, lat in cases:
        bad = Arm(200.0, lat, constant(0.01))
        lines.append(_detect(f"{name} (200 req/s each, 50/50)", seeds, cfg, base, bad, base, 60.0, 240))
    return lines


def error_detection(seeds: int) -> list[str]:
    lines = list(HEADER)
    lat = lognormal(MEDIAN, 1.0)
    base = Arm(180.0, lat, constant(0.01))
    good = Arm(20.0, lat, constant(0.01))
    for to, cfg, label in (
        (0.10, DEFAULT, "defaults"),
        (0.05, DEFAULT, "defaults"),
        (0.03, DEFAULT, "defaults"),
        (0.03, _th(max_error_rate_ratio=2.0), "max_error_rate_ratio 2"),
        (0.03, replace(_th(max_error_rate_ratio=2.0), window=300.0), "max_error_rate_ratio 2, window 5m"),
    ):
        bad = Arm(20.0, lat, constant(to))
        name = f"1% -> {to:.0%} errors after 60 s, 200 req/s 90/10; {label}"
        lines.append(_detect(name, seeds, cfg, good, bad, base, 60.0, 360))
    slow = lognormal(MEDIAN, 1.0)
    for rate, cfg, label in ((1.0, DEFAULT, "defaults"), (0.3, DEFAULT, "defaults")):
        bad = Arm(0.2, slow, constant(rate))
        name = f"canary failing {rate:.0%} of requests from the start, 2 req/s 90/10; {label}"
        lines.append(_detect(name, seeds, cfg, bad, bad, Arm(1.8, slow, constant(0.0)), 0.0, 600))
    return lines


def _th(**kw: float | None) -> Rollout:
    return replace(DEFAULT, thresholds=replace(Thresholds(), **kw))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer seeds")
    ap.add_argument("--only", choices=("fp", "latency", "errors"))
    args = ap.parse_args()
    started = time.monotonic()
    fp_seeds, fp_secs, det_seeds = (4, 120, 10) if args.quick else (20, 300, 40)
    if args.only in (None, "fp"):
        print("\n## False rollbacks: identical canary and baseline (1% errors, lognormal median 20 ms)\n")
        print("\n".join(FP_HEADER))
        false_positives(fp_seeds, fp_secs)
    if args.only in (None, "latency"):
        print("\n## Latency regressions from t = 60 s\n")
        print("\n".join(HEADER))
        latency_detection(det_seeds)
    if args.only in (None, "errors"):
        print("\n## Errors\n")
        print("\n".join(HEADER))
        error_detection(det_seeds)
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
