"""A one-screen, human summary of a valid Config, printed by `canary-proxy validate`."""

from __future__ import annotations

from collections.abc import Callable

from proxy.config.fleet import redact
from proxy.config.model import Config, Match, Rollout, Route, StringMatch
from proxy.config.units import fmt_duration, fmt_number, fmt_size

_OPS = {"exact": "==", "prefix": "starts with", "suffix": "ends with", "contains": "contains", "regex": "~"}
_NOT_OPS = {"exact": "!=", "regex": "!~"}


def summarize(cfg: Config) -> str:
    """Listen/admin, hash, upstreams, routes in order (match -> target or weights), rollout."""
    lines = [
        f"config {cfg.source_path or '<string>'} (sha256 {cfg.source_hash})",
        f"listen {cfg.listen}   admin {cfg.admin} (token {'set' if cfg.admin_token else 'not set'})",
        "upstreams:",
    ]
    width = max((len(name) for name in cfg.upstreams), default=0)
    for name, up in cfg.upstreams.items():
        endpoints = ", ".join(f"http://{_host(ep.host)}:{ep.port}" for ep in up.endpoints)
        lines.append(f"  {name:<{width}}  {up.version or '-'}  {endpoints}")
    lines.append("routes (first match wins):")
    width = max((len(r.name) for r in cfg.routes), default=0)
    for i, route in enumerate(cfg.routes, 1):
        lines.append(f"  {i}. {route.name:<{width}}  {describe_match(route.match)} -> {describe_target(route)}")
    if cfg.limits.max_body_size is not None:
        lines.append(f"max body size {fmt_size(cfg.limits.max_body_size)}")
    if cfg.rollout is not None:
        for rollout in cfg.rollouts:
            lines.extend(_rollout(rollout))
    else:
        lines.append("rollout: none (weights stay as configured)")
    if cfg.fleet is not None:
        f = cfg.fleet
        lines.append(
            f"fleet: namespace {f.namespace}, replica {f.replica or '(hostname-pid)'}, redis {redact(f.redis)},"
            f" lease {fmt_duration(f.lease)}"
        )
    return "\n".join(lines)


def describe_match(match: Match | None) -> str:
    """`header user-type == "beta-tester" and path starts with "/api"`; no match: `every request`."""
    if match is None:
        return "every request"
    parts = [f"host in {', '.join(match.hosts)}"] if match.hosts else []
    parts += [_matcher("header", n, m) for n, m in match.headers]
    parts += [_matcher("cookie", n, m) for n, m in match.cookies]
    parts += [_matcher("query", n, m) for n, m in match.query]
    if match.path_prefix is not None:
        parts.append(f'path starts with "{match.path_prefix}"')
    if match.methods:
        parts.append(f"method in {'/'.join(match.methods)}")
    return " and ".join(parts)


def describe_target(route: Route) -> str:
    """`canary`, or `stable 95% / canary 5% (sticky on header x-user-id)`."""
    mirror = ""
    if route.mirror is not None:
        m = route.mirror
        mirror = f", mirror {fmt_number(m.percent)}% to {m.to} (bodies up to {fmt_size(m.max_body)})"
        if m.analyze:
            mirror += " as rollout evidence"
    if route.split is None:
        return (route.to or "?") + mirror
    text = " / ".join(f"{name} {fmt_number(weight)}%" for name, weight in route.split)
    sticky = route.sticky
    if sticky is None:
        return f"{text} (random per request){mirror}"
    key = f"header {sticky.header}" if sticky.header else f"cookie {sticky.cookie}"
    if sticky.issue is not None:
        key += f", issued for {fmt_duration(sticky.issue.max_age)}"
    return f"{text} (sticky on {key}){mirror}"


def _matcher(what: str, name: str, m: StringMatch) -> str:
    if m.kind == "present":
        return f"{what} {name} {'present' if bool(m.value) != m.invert else 'absent'}"
    op = _NOT_OPS.get(m.kind, f"not {_OPS[m.kind]}") if m.invert else _OPS[m.kind]
    value = f"/{m.value}/" if m.kind == "regex" else f'"{m.value}"'
    return f"{what} {name} {op} {value}"


def _step(r: Rollout, i: int) -> str:
    step = r.step(i)
    if step.kind == "pause":
        return f"pause {fmt_duration(step.pause)}" if step.pause is not None else "pause until promote"
    if step.kind == "gate":
        return "gate"
    if step.kind == "analysis":
        return f"analysis (min {step.min_requests} requests)"
    return f"{fmt_number(step.weight)}%"


def _rollout(r: Rollout) -> list[str]:
    steps = " -> ".join(_step(r, i) for i in range(len(r.steps))) or "none"
    t = r.thresholds
    # Each configured threshold as "what rolls back": (value or None, how it reads).
    limits: list[tuple[float | None, Callable[[float], str]]] = [
        (t.max_error_rate, lambda x: f"error rate > {fmt_number(x * 100)}%"),
        (t.max_error_rate_increase, lambda x: f"error rate > baseline + {fmt_number(x * 100)} pts"),
        (t.max_error_rate_ratio, lambda x: f"error rate > {fmt_number(x)}x baseline"),
        (t.max_p99, lambda x: f"p99 > {fmt_duration(x)}"),
        (t.max_p99_ratio, lambda x: f"p99 > {fmt_number(x)}x baseline"),
        (t.max_median_ratio, lambda x: f"latency > {fmt_number(x)}x baseline (Mann-Whitney)"),
    ]
    checks = [say(x) for x, say in limits if x is not None]
    if r.fast_fail.consecutive_errors:
        checks.append(f"{r.fast_fail.consecutive_errors} consecutive errors")
    named = f' "{r.name}"' if r.name != "default" else ""
    checks += [f"check {c.name}" for c in r.checks]
    lines = [
        f'rollout{named}: canary "{r.canary}" vs baseline "{r.baseline}"'
        + (" (observe mode: weights never change)" if r.mode == "observe" else ""),
        f"  steps {steps}, every {fmt_duration(r.interval)} over a {fmt_duration(r.window)} window,"
        f" at least {r.min_requests} requests, confidence {fmt_number(r.confidence)}",
        f"  errors: {', '.join(r.error_statuses)}; roll back on: {', '.join(checks) or 'nothing'}",
    ]
    if r.state_file:
        lines.append(f"  state file {r.state_file}")
    if r.webhook:
        lines.append(f"  webhook {r.webhook}")
    for hook in r.webhooks:
        lines.append(f"  webhook {hook.url} ({hook.format}{', signed' if hook.secret else ''})")
    if r.progress_deadline is not None:
        lines.append(f"  progress deadline {fmt_duration(r.progress_deadline)}, then {r.on_deadline}")
    return lines


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
