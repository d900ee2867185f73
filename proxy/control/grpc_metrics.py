"""The gRPC metric family: upstream responses by grpc-status and code class."""

from __future__ import annotations

from prometheus_client.metrics_core import CounterMetricFamily

from proxy.analysis.stats import Stats
from proxy.config.grpc_codes import NAMES, code_class


def grpc_family(stats: Stats) -> CounterMetricFamily:
    """`canary_proxy_grpc_responses_total{upstream, code_class, grpc_status}` (17 codes at most
    per upstream: bounded). Only codes seen so far are exported."""
    family = CounterMetricFamily(
        "canary_proxy_grpc_responses",
        "Upstream gRPC responses (HTTP/2 upstreams), by upstream, code class (ok, client_error,"
        " server_error) and grpc-status name.",
        labels=["upstream", "code_class", "grpc_status"],
    )
    for upstream, counts in sorted(stats.grpc.items()):
        for code, count in enumerate(counts):
            if count:
                family.add_metric([upstream, code_class(code), NAMES[code]], count)
    return family
