"""Prometheus exposition of `proxy.stats.Stats` and the app's state, built at scrape time.

The data plane only bumps plain integers in `Stats`; a scrape walks them once and builds metric
families with a custom collector. Every label value comes from config names, error kinds or
status classes, so the number of series stays bounded whatever the traffic looks like.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from proxy import __version__
from proxy.analysis.faults import LOCAL_KINDS
from proxy.analysis.rollout import RolloutState
from proxy.analysis.stats import CODE_CLASSES, ERROR_KINDS, Stats, UpstreamStats
from proxy.control.analysis_metrics import analysis_families
from proxy.control.fleet.report import fleet_metrics
from proxy.control.grpc_metrics import grpc_family
from proxy.control.metrics_mirror import mirror_families
from proxy.dataplane.tls.handshakes import REASONS as TLS_REASONS

if TYPE_CHECKING:
    from proxy.control.view import AppView

# Plain text 0.0.4: every name here is a legacy-valid name, and every scraper understands it.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
PHASES = ("progressing", "steady", "paused", "promoted", "rolled_back", "unknown_state")
FLEET_PHASES = (*PHASES, "held")  # held: fleet mode only (the fleet state not read yet)
UNMATCHED = "(none)"  # route/upstream label of requests no route matched


class ProxyCollector:
    """Reads the app's statistics on every `collect()`; registered in a private registry."""

    def __init__(self, app: AppView) -> None:
        self.app = app

    def describe(self) -> list[Metric]:
        # Registering must not run a full collect (the app may not be started yet).
        return []

    def collect(self) -> Iterator[Metric]:
        """Build every canary_proxy_* family from the current counters."""
        app = self.app
        stats = app.metrics_stats()  # with --workers, the leader adds up every worker
        yield _build_info()
        yield _requests(stats)
        yield _durations(stats.upstreams)
        yield _errors(stats.upstreams)
        yield from mirror_families(stats)
        yield grpc_family(stats)
        yield from _plane_gauges(app)
        yield from _rollout(app)
        yield from _durability(app, stats)
        yield _tls_handshakes(app, stats)
        reloads = CounterMetricFamily(
            "canary_proxy_config_reloads", "Config reloads by result.", labels=["result"]
        )
        for result in ("success", "failure"):
            reloads.add_metric([result], stats.reloads.get(result, 0))
        yield reloads
        yield GaugeMetricFamily(
            "canary_proxy_in_flight_requests", "Requests being proxied right now.", value=stats.in_flight
        )
        names = _upstream_names(app)
        yield _per_upstream(
            "canary_proxy_upstream_ejections",
            "Outlier ejections of an endpoint, by upstream.",
            stats.ejections,
            names,
        )
        yield _per_upstream(
            "canary_proxy_retries", "Retries sent, by the upstream the retry went to.", stats.retries, names
        )
        yield CounterMetricFamily(
            "canary_proxy_requests_rejected",
            "Malformed or over-limit client requests answered with 4xx before routing.",
            value=stats.rejected,
        )
        if app.fleet is not None:
            yield from fleet_metrics(app.fleet)


def make_registry(app: AppView, *, process: bool = True) -> CollectorRegistry:
    """A private registry with the proxy collector (and the process/platform/GC collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(app))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition of `registry` (serve with `CONTENT_TYPE`)."""
    return generate_latest(registry)


# -- families ------------------------------------------------------------------------------------


def _build_info() -> GaugeMetricFamily:
    info = GaugeMetricFamily(
        "canary_proxy_build_info", "Always 1; the version label is the proxy's version.", labels=["version"]
    )
    info.add_metric([__version__], 1.0)
    return info


def _requests(stats: Stats) -> CounterMetricFamily:
    family = CounterMetricFamily(
        "canary_proxy_requests",
        'Responses sent, by route, upstream and status class; route="(none)" when no route matched.',
        labels=["route", "upstream", "code_class"],
    )
    for (route, upstream), rc in sorted(stats.route_counts.items()):
        unmatched = not route and not upstream
        if unmatched and not any(rc.by_class):
            continue
        labels = [UNMATCHED, UNMATCHED] if unmatched else [route, upstream]
        for i, code_class in enumerate(CODE_CLASSES, start=1):
            family.add_metric([*labels, code_class], rc.by_class[i])
    return family


def _durations(upstreams: dict[str, UpstreamStats]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        "canary_proxy_request_duration_seconds",
        "Time from the request head to the end of the response, by upstream.",
        labels=["upstream"],
    )
    for name, us in sorted(upstreams.items()):
        family.add_metric([name], _cumulative(us), us.duration_sum)
    return family


def _cumulative(us: UpstreamStats) -> list[tuple[str, float]]:
    """Non-cumulative counts (last = overflow) -> Prometheus `le` buckets ending with +Inf."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(us.buckets, us.duration_counts, strict=False):
        running += count
        out.append((repr(float(bound)), float(running)))
    out.append(("+Inf", float(running + us.duration_counts[-1])))
    return out


def _errors(upstreams: dict[str, UpstreamStats]) -> CounterMetricFamily:
    family = CounterMetricFamily(
        "canary_proxy_upstream_errors",
        "Failed upstream attempts, by upstream and kind (connect, timeout, reset, protocol).",
        labels=["upstream", "kind"],
    )
    for name, us in sorted(upstreams.items()):
        for kind, count in zip(ERROR_KINDS, us.errors, strict=True):
            family.add_metric([name, kind], count)
    return family


def _rollout(app: AppView) -> Iterator[Metric]:
    rollbacks = CounterMetricFamily(
        "canary_proxy_rollbacks", "Automatic and manual rollbacks, by canary upstream.", labels=["upstream"]
    )
    step = GaugeMetricFamily(
        "canary_proxy_rollout_step",
        "Current rollout step number (1-based) of the canary; 0 when steady or rolled back.",
        labels=["rollout", "upstream"],
    )
    phase = GaugeMetricFamily(
        "canary_proxy_rollout_phase",
        "1 for the rollout's current phase, 0 for the others (no series without a rollout).",
        labels=["rollout", "phase"],
    )
    stalled = GaugeMetricFamily(
        "canary_proxy_rollout_stalled",
        "1 while the rollout has taken no step for its progress_deadline, else 0.",
        labels=["rollout"],
    )
    counts = dict(app.stats.rollbacks)
    states = current_states(app)
    for cfg in app.config.rollouts:
        counts.setdefault(cfg.canary, 0)
        state = states.get(cfg.name)
        if state is not None:
            number = 0 if state.phase in ("steady", "rolled_back", "unknown_state") else state.step_index + 1
            step.add_metric([cfg.name, cfg.canary], number)
            for p in FLEET_PHASES if app.fleet is not None else PHASES:
                phase.add_metric([cfg.name, p], 1.0 if p == state.phase else 0.0)
            stalled.add_metric([cfg.name], 1.0 if state.stalled else 0.0)
    for upstream, n in sorted(counts.items()):
        rollbacks.add_metric([upstream], n)
    return iter((rollbacks, step, phase, stalled, *analysis_families(app)))


def _tls_handshakes(app: AppView, stats: Stats) -> Metric:
    """Failed client TLS handshakes by reason (every known reason shown once the listener has TLS)."""
    family = CounterMetricFamily(
        "canary_proxy_tls_handshake_errors", "Client TLS handshakes that failed, by reason.", labels=["reason"]
    )
    counts = stats.tls_handshake_errors
    reasons = (*TLS_REASONS, *sorted(set(counts) - set(TLS_REASONS))) if app.config.tls is not None else sorted(counts)
    for reason in reasons:
        family.add_metric([reason], counts.get(reason, 0))
    return family


def _durability(app: AppView, stats: Stats) -> Iterator[Metric]:
    """The state file's durability and the proxy's own (local) failures."""
    local = CounterMetricFamily(
        "canary_proxy_local_errors",
        "Requests failed by this proxy's own limits (descriptors, memory, shutdown), not the upstream's.",
        labels=["kind"],
    )
    for kind in LOCAL_KINDS:
        local.add_metric([kind], stats.local_errors.get(kind, 0))
    yield local
    manager = app.controller
    files = [(c.name or "", c.durability()) for c in manager.controllers.values()] if manager is not None else []
    stores = [(name, d) for name, d in files if d is not None]
    if not stores:
        return
    durable = GaugeMetricFamily(
        "canary_proxy_rollout_state_durable",
        "1 when the state file holds the current rollout state; 0 while a write is failing (retried).",
        labels=["rollout"],
    )
    failures = CounterMetricFamily(
        "canary_proxy_rollout_state_write_failures", "Failed writes of the rollout state file.", labels=["rollout"]
    )
    for name, d in stores:
        durable.add_metric([name], 1.0 if d["durable"] else 0.0)
        failures.add_metric([name], d["write_failures"])
    yield durable
    yield failures


def _per_upstream(name: str, doc: str, counts: dict[str, int], names: list[str]) -> CounterMetricFamily:
    """A counter by upstream, with 0 for every configured upstream that has none yet."""
    family = CounterMetricFamily(name, doc, labels=["upstream"])
    merged = dict.fromkeys(names, 0)
    merged.update(counts)
    for upstream, n in sorted(merged.items()):
        family.add_metric([upstream], n)
    return family


def _upstream_names(app: AppView) -> list[str]:
    return list(app.config.upstreams)


def current_states(app: AppView) -> dict[str, RolloutState]:
    """Every rollout's state in force, by name (the controllers', else the snapshot's)."""
    if app.controller is not None:
        return app.controller.states
    if app.plane is not None:
        return dict(app.plane.snapshot.rollout_states)
    return {}


def current_state(app: AppView) -> RolloutState | None:
    """The rollout state in force: the controller's, else the one compiled into the snapshot."""
    controller = app.controller
    if controller is not None and app.config.rollout is not None:
        state: RolloutState | None = controller.state
        return state
    if app.plane is not None:
        return app.plane.snapshot.rollout_state
    return None


def _plane_gauges(app: AppView) -> Iterator[GaugeMetricFamily]:
    """What the data plane routes to right now: each upstream's weight per route (rollout applied;
    a `to` route: 100), and which endpoints outlier detection has ejected (endpoints from config)."""
    weights = GaugeMetricFamily(
        "canary_proxy_upstream_weight",
        "Percent of a route's traffic an upstream gets now, rollout applied (a `to` route: 100).",
        labels=["route", "upstream"],
    )
    ejected = GaugeMetricFamily(
        "canary_proxy_endpoint_ejected",
        "1 while outlier detection has ejected the endpoint, else 0.",
        labels=["upstream", "endpoint"],
    )
    plane = app.plane
    if plane is not None:
        snap = plane.snapshot
        configured = {r.name: r.to for r in snap.config.routes}
        for route, to, split in snap.effective:
            if to is not None:
                weights.add_metric([route, to], 100.0)
                wanted = configured.get(route)
                if wanted is not None and wanted != to:
                    # e.g. `to: canary` after a rollback: show the canary at 0 rather than dropping it
                    weights.add_metric([route, wanted], 0.0)
            elif split is not None:
                seen: set[str] = set()
                for upstream, weight in split:
                    if upstream not in seen:  # a name twice in a split: the first entry carries it
                        seen.add(upstream)
                        weights.add_metric([route, upstream], weight)
        now = plane.clock.read()
        for name, target in snap.upstreams.items():
            for pool in target.balancer.pools:
                ejected.add_metric([name, pool.endpoint.key], 1.0 if pool.ejected_until > now else 0.0)
    yield weights
    yield ejected
