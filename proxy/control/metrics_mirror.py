"""Prometheus families of request mirroring (see :mod:`proxy.dataplane.mirror`), built at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric

from proxy.analysis.stats import CODE_CLASSES, MIRROR_NO_RESPONSE, MIRROR_SKIPS, MirrorStats, Stats

NO_RESPONSE = "error"  # code_class of a mirror that got no response (connect, timeout, reset)


def mirror_families(stats: Stats) -> Iterator[Metric]:
    """`canary_proxy_mirror_requests_total`, `..._skipped_total` and `..._request_duration_seconds`."""
    requests = CounterMetricFamily(
        "canary_proxy_mirror_requests",
        "Mirrored request copies sent, by route, mirror upstream and the mirror's status class;"
        ' code_class="error" when it gave no response (connect failure, timeout, reset).',
        labels=["route", "upstream", "code_class"],
    )
    skipped = CounterMetricFamily(
        "canary_proxy_mirror_skipped",
        "Requests chosen for mirroring that were not mirrored, by reason (body_too_large, overloaded).",
        labels=["route", "upstream", "reason"],
    )
    durations = HistogramMetricFamily(
        "canary_proxy_mirror_request_duration_seconds",
        "Time from sending a mirrored copy to the end of the mirror's response, by mirror upstream.",
        labels=["upstream"],
    )
    by_upstream: dict[str, list[MirrorStats]] = {}
    for (route, upstream), ms in sorted(stats.mirrors.items()):
        for i, code_class in enumerate(CODE_CLASSES, start=1):
            requests.add_metric([route, upstream, code_class], ms.by_class[i])
        requests.add_metric([route, upstream, NO_RESPONSE], ms.by_class[MIRROR_NO_RESPONSE])
        for reason, n in zip(MIRROR_SKIPS, ms.skipped, strict=True):
            skipped.add_metric([route, upstream, reason], n)
        by_upstream.setdefault(upstream, []).append(ms)
    for upstream, group in sorted(by_upstream.items()):
        buckets = group[0].buckets
        counts = [0] * (len(buckets) + 1)
        total = 0.0
        for ms in group:
            if ms.buckets == buckets:
                counts = [a + b for a, b in zip(counts, ms.duration_counts, strict=True)]
                total += ms.duration_sum
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(buckets, counts, strict=False):
            running += count
            out.append((repr(float(bound)), float(running)))
        out.append(("+Inf", float(running + counts[-1])))
        durations.add_metric([upstream], out, total)
    yield requests
    yield skipped
    yield durations
