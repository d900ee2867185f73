"""canary_proxy_grpc_responses_total: counted per upstream and code, summed across --workers."""

from __future__ import annotations

import json

from proxy.analysis.stats import Stats
from proxy.control.grpc_metrics import grpc_family
from proxy.control.workers import counters_snapshot, merged_stats


def test_family_labels_code_class_and_name() -> None:
    stats = Stats()
    for code in (0, 0, 14, 5):
        stats.count_grpc("canary", code)
    samples = {tuple(sorted(s.labels.items())): s.value for s in grpc_family(stats).samples}
    assert samples == {
        (("code_class", "ok"), ("grpc_status", "OK"), ("upstream", "canary")): 2,
        (("code_class", "server_error"), ("grpc_status", "UNAVAILABLE"), ("upstream", "canary")): 1,
        (("code_class", "client_error"), ("grpc_status", "NOT_FOUND"), ("upstream", "canary")): 1,
    }
    assert grpc_family(stats).name == "canary_proxy_grpc_responses"  # exposed with _total


def test_workers_counts_are_summed() -> None:
    own, peer = Stats(), Stats()
    own.count_grpc("stable", 0)
    peer.count_grpc("stable", 0)
    peer.count_grpc("canary", 14)
    merged = merged_stats(own, [json.loads(json.dumps(counters_snapshot(peer)))])
    assert merged.grpc["stable"][0] == 2 and merged.grpc["canary"][14] == 1
