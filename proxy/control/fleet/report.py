"""What fleet mode shows: the `fleet` part of /status, the canary_proxy_fleet_* metric families,
and the FLEET block of `canary-proxy status`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from proxy.control.fleet.member import FleetMember, rollouts_of

DEFAULT_WINDOW = 60.0


def fleet_status(member: FleetMember, now: float | None = None) -> dict[str, Any]:
    """The `fleet` object of /status."""
    now = time.time() if now is None else now
    store = member.store
    config = member.get_config()
    window = config.rollout.window if config.rollout is not None else DEFAULT_WINDOW
    replicas: list[dict[str, Any]] = []
    for name, doc in sorted(member.roster.reports.items()):
        at = doc.get("at")
        replicas.append(
            {
                "replica": name,
                "last_report": at,
                "age": round(now - at, 3) if isinstance(at, int | float) else None,
                "leader": bool(doc.get("leader")),
                "state_versions": doc.get("versions") if isinstance(doc.get("versions"), dict) else {},
                "phases": doc.get("phases") if isinstance(doc.get("phases"), dict) else {},
                "canary_weights": doc.get("weights") if isinstance(doc.get("weights"), dict) else {},
                "evidence_pushed_at": doc.get("evidence_pushed_at"),
            }
        )
    return {
        "namespace": member.fleet.namespace,
        "replica": member.replica,
        "redis": member.link.url,
        "connected": member.link.connected,
        "last_error": member.link.last_error,
        "leader": store.leader if member.link.connected else None,
        "is_leader": store.is_leader(),
        "lease": member.fleet.lease,
        "state_versions": dict(store.applied),
        "pending_latches": sorted(store.latches),
        "replicas": replicas,
        "replicas_reporting": replicas_reporting(member, now, window),
        "verdicts": dict(member.roster.verdicts),
    }


def replicas_reporting(member: FleetMember, now: float, window: float) -> int:
    """Replicas (this one included) whose last report is inside the analysis window."""
    count = 0
    for doc in member.roster.reports.values():
        at = doc.get("at")
        if isinstance(at, int | float) and now - at <= window:
            count += 1
    return count


def fleet_metrics(member: FleetMember) -> Iterator[Metric]:
    """canary_proxy_fleet_connected, _leader, _replicas and _state_version{rollout}."""
    config = member.get_config()
    window = config.rollout.window if config.rollout is not None else DEFAULT_WINDOW
    yield GaugeMetricFamily(
        "canary_proxy_fleet_connected", "1 while Redis (the fleet store) answers, else 0.",
        value=1.0 if member.link.connected else 0.0,
    )  # fmt: skip
    yield GaugeMetricFamily(
        "canary_proxy_fleet_leader", "1 on the replica that holds the fleet's leader lease, else 0.",
        value=1.0 if member.store.is_leader() else 0.0,
    )  # fmt: skip
    yield GaugeMetricFamily(
        "canary_proxy_fleet_replicas", "Replicas of the namespace that reported within the analysis window.",
        value=float(replicas_reporting(member, time.time(), window)),
    )  # fmt: skip
    version = GaugeMetricFamily(
        "canary_proxy_fleet_state_version",
        "Version of the fleet's rollout state this replica applies (0: none read yet).",
        labels=["rollout"],
    )
    for rollout in rollouts_of(config):
        version.add_metric([rollout.name], float(member.store.applied.get(rollout.name, 0)))
    yield version


def format_fleet(fleet: dict[str, Any], now: float) -> list[str]:
    """The FLEET block of `canary-proxy status`."""
    link = "connected" if fleet.get("connected") else f"DISCONNECTED ({fleet.get('last_error') or '?'})"
    lines = [
        f"  namespace {fleet.get('namespace')}  replica {fleet.get('replica')}  redis {fleet.get('redis')} {link}",
        f"  leader {fleet.get('leader') or '-'}{' (this replica)' if fleet.get('is_leader') else ''}"
        f"  replicas reporting {fleet.get('replicas_reporting', 0)}",
    ]
    rows = [["REPLICA", "LAST REPORT", "STATE VERSION", "PHASE", "CANARY WEIGHT", "LEADER"]]
    for r in fleet.get("replicas") or []:
        at = r.get("last_report")
        ago = f"{max(now - float(at), 0):.1f}s ago" if isinstance(at, int | float) else "-"
        versions = r.get("state_versions") or {}
        phases = r.get("phases") or {}
        weights = r.get("canary_weights") or {}
        rows.append(
            [
                str(r.get("replica")),
                ago,
                ", ".join(f"{k} v{v}" for k, v in versions.items()) or "-",
                ", ".join(str(v) for v in phases.values()) or "-",
                ", ".join("-" if v is None else f"{v:g}%" for v in weights.values()) or "-",
                "yes" if r.get("leader") else "",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for name, v in (fleet.get("verdicts") or {}).items():
        fig = v.get("figures") or {}
        lines.append(
            f"  fleet verdict {name}: {v.get('kind')} ({v.get('reason')}); canary {fig.get('canary_requests')} req "
            f"{fig.get('canary_errors')} err, baseline {fig.get('baseline_requests')} req "
            f"{fig.get('baseline_errors')} err (by {v.get('by')})"
        )
    return lines
