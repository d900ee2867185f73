"""The `/status` document: one JSON-ready dict describing config, upstreams, routes and rollout.

The status page (`proxy/static/status.html`) and `canary-proxy status` both read this shape, so
keys are only ever added, never renamed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from proxy import __version__, native
from proxy.analysis.rollout import canary_weight, ladder_weight
from proxy.analysis.window import WindowStats
from proxy.control.fleet.report import fleet_status
from proxy.control.metrics import current_state, current_states
from proxy.dataplane.tls.server import offered_alpn

if TYPE_CHECKING:
    from proxy.analysis.controller import RolloutController
    from proxy.config.certs import CertInfo
    from proxy.config.model import Config, ListenerTLS, Route
    from proxy.control.view import AppView

DEFAULT_WINDOW = 60.0  # seconds of traffic summarised per upstream without a rollout
MAX_EVENTS = 50


def build_status(app: AppView) -> dict[str, Any]:
    """Everything `/status` reports, read from the app at this instant."""
    now = app.clock()
    config = app.config
    doc = {
        "version": __version__,
        "hot_path": native.state(),
        "draining": app.draining,
        "now": now,
        "config": {
            "hash": config.source_hash,
            "path": config.source_path or None,
            "loaded_at": app.loaded_at,
            "last_error": app.last_error,
            "last_error_at": app.last_error_at,
        },
        "upstreams": _upstreams(app, now),
        "routes": _routes(app),
        "rollout": rollout_status(app),
        "rollouts": rollouts_status(app),
        "events": _events(app),
    }
    if app.fleet is not None:  # only in fleet mode
        doc["fleet"] = fleet_status(app.fleet, now)
    listener = getattr(getattr(app, "tls", None), "listener", None)  # a ProxyApp's TLSRuntime
    if listener is not None and config.tls is not None:  # only with `tls:`
        doc["tls"] = tls_status(config.tls, listener.current.infos)
    return doc


def rollouts_status(app: AppView) -> list[dict[str, Any]]:
    """Every rollout's status, in config order (`rollouts` in /status, GET /rollouts)."""
    out: list[dict[str, Any]] = []
    for cfg in app.config.rollouts:
        one = rollout_status(app, cfg.name)
        if one is not None:
            out.append(one)
    return out


def rollout_status(app: AppView, name: str | None = None) -> dict[str, Any] | None:
    """One rollout's status (default: the first; None without one); also the body of the POSTs."""
    cfg = app.config.rollout if name is None else app.config.rollout_named(name)
    if cfg is None:
        return None
    state = current_states(app).get(cfg.name)
    ctl = app.controller.controller(cfg.name) if app.controller is not None else None
    last = _last_verdict(app, cfg.name)
    step = cfg.step(state.step_index) if state is not None and cfg.steps else None
    return {
        "name": cfg.name,
        "mode": cfg.mode,
        "stalled": state.stalled if state is not None else False,
        "step_kind": step.kind if step is not None else None,
        "would_weight": ladder_weight(state, cfg),
        "gate": ctl.status().get("gate") if ctl is not None else None,
        "checks": ctl.status().get("checks", []) if ctl is not None else [],
        "analysis": _analysis(ctl),
        "canary": cfg.canary,
        "baseline": cfg.baseline,
        "phase": state.phase if state is not None else None,
        "step": state.step_index if state is not None else 0,  # 0-based index into `steps`
        "steps": list(cfg.steps),
        "canary_weight": canary_weight(state, cfg),
        "canary_version": state.canary_version if state is not None else None,
        "step_started_at": state.step_started_at if state is not None else None,
        "reason": state.reason if state is not None else None,
        "last_verdict": last,
        # Is the latch on disk? (a failing write is retried every second until it is)
        "state_file": ctl.durability() if ctl is not None else None,
    }


def _analysis(ctl: RolloutController | None) -> dict[str, Any] | None:
    """The latest tick's windows (what /metrics shows as canary_proxy_analysis_*)."""
    analysis = ctl.analysis if ctl is not None else None
    if analysis is None:
        return None
    return {
        "at": analysis.at,
        "verdict": analysis.verdict.kind,
        "canary": window_summary(analysis.canary),
        "baseline": window_summary(analysis.baseline),
    }


def _last_verdict(app: AppView, name: str | None = None) -> dict[str, Any] | None:
    """The latest analysis tick's verdict; else the one behind the last automatic transition."""
    states = current_states(app)
    state = states.get(name) if name is not None else current_state(app)
    recorded = state.last_verdict if state is not None else None
    controller = app.controller.controller(name) if app.controller is not None and name else app.controller
    verdict = controller.last_verdict if controller is not None else None
    if verdict is None:
        if recorded is None:
            return None
        return {"result": recorded.kind, "reason": recorded.reason, "at": recorded.at}
    at = getattr(controller, "last_verdict_at", None)  # not (yet) part of the controller's API
    same = recorded is not None and (recorded.kind, recorded.reason) == (verdict.kind, verdict.reason)
    if at is None and same and recorded is not None:
        at = recorded.at
    return {"result": verdict.kind, "reason": verdict.reason, "at": at, "figures": verdict.figures.as_dict()}


def window_summary(stats: WindowStats) -> dict[str, Any]:
    """Requests, error rate, rate and latency quantiles of one upstream's window."""
    return {
        "seconds": stats.window,
        "requests": stats.requests,
        "errors": stats.errors,
        "error_rate": stats.error_rate,
        "rps": stats.rps,
        "p50": stats.quantile(0.50),
        "p95": stats.quantile(0.95),
        "p99": stats.quantile(0.99),
    }


def _upstreams(app: AppView, now: float) -> dict[str, Any]:
    config = app.config
    plane = app.plane
    pools = plane.pools.pools if plane is not None else {}
    loop_now = plane.clock.read() if plane is not None else 0.0  # ejections are in the plane clock
    out: dict[str, Any] = {}
    for name, up in config.upstreams.items():
        keys = [ep.key for ep in up.endpoints]
        owner = config.rollout_of(name)
        first = config.rollout
        window = owner.window if owner is not None else first.window if first is not None else DEFAULT_WINDOW
        us = app.stats.upstreams.get(name)
        stats = us.window.stats(now, window) if us is not None else WindowStats.empty(window)
        out[name] = {
            "version": up.version,
            "endpoints": keys,
            "ejected": [
                ep.key for ep in up.endpoints if ep.pool_key in pools and pools[ep.pool_key].ejected_until > loop_now
            ],
            "window": window_summary(stats),
        }
    return out


def _routes(app: AppView) -> list[dict[str, Any]]:
    config = app.config
    effective = {name: (to, split) for name, to, split in app.plane.snapshot.effective} if app.plane else {}
    out: list[dict[str, Any]] = []
    for route in config.routes:
        eff_to, split = effective.get(route.name, (route.to, route.split))
        weights: dict[str, float] | None = None
        if split is not None:
            weights = {}
            for upstream, w in split:
                weights[upstream] = weights.get(upstream, 0.0) + w
        out.append(
            {
                "name": route.name,
                "to": route.to,
                "effective_to": eff_to,
                "weights": weights,
                "sticky": _sticky(route),
            }
        )
    return out


def _sticky(route: Route) -> str | None:
    if route.sticky is None:
        return None
    if route.sticky.header:
        return f"header:{route.sticky.header}"
    return f"cookie:{route.sticky.cookie}"


def _events(app: AppView) -> list[dict[str, Any]]:
    controller = app.controller
    if controller is None:
        return []
    events = list(controller.events)[-MAX_EVENTS:]
    return [{"at": e.at, "kind": e.kind, "message": e.message, "data": dict(e.data)} for e in events]


def admin_url(config: Config) -> str:
    """The admin base URL a local client should use for `config` (wildcard -> loopback)."""
    host = config.admin.host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.admin.port}"


def tls_status(tls: ListenerTLS, infos: Mapping[str, CertInfo]) -> dict[str, Any]:
    """The listener's certificates as served now (after the last successful load)."""
    return {
        "certificates": [
            {
                "key_path": path,
                "cert": pair.cert,
                "serial": info.serial,
                "names": list(info.names),
                "not_after": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.not_after)),
                "expired": info.expired,
            }
            for path, pair in tls.pairs()
            if (info := infos.get(pair.cert)) is not None
        ],
        "client_ca": tls.client_ca,
        "min_version": tls.min_version,
        "alpn": list(tls.alpn),
        "alpn_offered": offered_alpn(tls),  # what the client legs speak of it
    }
