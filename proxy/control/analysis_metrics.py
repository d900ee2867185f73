"""The analysis on /metrics, per rollout and upstream, as of the controller's latest tick: window
requests and errors, error rate, p99, the verdict (one series per result, 1 for the current one),
the last evaluation time, and each Prometheus check's value and status.

The figures are the ones the verdict was computed from (refreshed every tick), so graphs and alerts
agree with /status and with what the rollout did.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from proxy.control.view import AppView

RESULTS = ("healthy", "breach", "insufficient_data")
CHECK_STATUSES = ("pass", "breach", "hold")


def analysis_families(app: AppView) -> Iterator[Metric]:
    """Every canary_proxy_analysis_* family (no series before a rollout's first tick)."""
    requests = _gauge("window_requests", "Requests in the analysis window.", "rollout", "upstream")
    errors = _gauge("window_errors", "Errors in the analysis window.", "rollout", "upstream")
    rate = _gauge("error_rate", "Error rate (0..1) in the analysis window.", "rollout", "upstream")
    p99 = _gauge("p99_seconds", "p99 latency in the analysis window (no series without one).", "rollout", "upstream")
    verdict = _gauge("verdict", "1 for the latest verdict's result, 0 for the others.", "rollout", "result")
    last = _gauge("last_evaluation_timestamp_seconds", "Unix time of the latest evaluation.", "rollout")
    check_value = _gauge("check_value", "The latest value of a Prometheus check.", "rollout", "check")
    check_status = _gauge("check_status", "1 for a Prometheus check's latest status.", "rollout", "check", "status")
    manager = app.controller
    for cfg in app.config.rollouts:
        ctl = manager.controller(cfg.name) if manager is not None else None
        analysis = ctl.analysis if ctl is not None else None
        if ctl is None or analysis is None:
            continue
        for role, stats in ((cfg.canary, analysis.canary), (cfg.baseline, analysis.baseline)):
            requests.add_metric([cfg.name, role], stats.requests)
            errors.add_metric([cfg.name, role], stats.errors)
            rate.add_metric([cfg.name, role], stats.error_rate)
            q = stats.quantile(0.99)
            if q is not None:
                p99.add_metric([cfg.name, role], q)
        for result in RESULTS:
            verdict.add_metric([cfg.name, result], 1.0 if analysis.verdict.kind == result else 0.0)
        last.add_metric([cfg.name], analysis.at)
        for name, res in ctl.check_results.items():
            if res.value is not None:
                check_value.add_metric([cfg.name, name], res.value)
            for status in CHECK_STATUSES:
                check_status.add_metric([cfg.name, name, status], 1.0 if res.status == status else 0.0)
    yield from (requests, errors, rate, p99, verdict, last, check_value, check_status)


def _gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"canary_proxy_analysis_{name}", doc, labels=list(labels))
