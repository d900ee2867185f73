"""Config + rollout state -> an immutable Snapshot the data plane reads once per request.

Everything the hot path needs is computed here: matcher closures, cumulative bucket tables with the
rollout's effective weights, bound statistics objects, the error-status table.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from proxy.analysis.rollout import RolloutState
from proxy.analysis.splits import effective_split, effective_target
from proxy.analysis.stats import RouteCounts, Stats, UpstreamStats
from proxy.analysis.verdict import error_status_table
from proxy.config import grpc_codes
from proxy.config.model import Config, CookieIssue, Match, Route, StringMatch
from proxy.config.saferegex import compile_fullmatch
from proxy.dataplane.balancer import Balancer
from proxy.dataplane.mirror_rule import MirrorRule
from proxy.routing.router import Predicate, RequestView, RouteRule, SplitTable

if TYPE_CHECKING:
    from proxy.dataplane.pools import EndpointPool, PoolRegistry

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ValueTest = Callable[[bytes | None], bool]


class UpstreamTarget:
    """One upstream as seen by a snapshot: its balancer over endpoint pools and its stats."""

    __slots__ = ("balancer", "name", "stats", "version")

    def __init__(self, name: str, version: str | None, balancer: Balancer, stats: UpstreamStats) -> None:
        self.name = name
        self.version = version
        self.balancer = balancer
        self.stats = stats


class Binding:
    """A route's choice of upstream, with the route/upstream counter bound once."""

    __slots__ = ("counts", "upstream")

    def __init__(self, upstream: UpstreamTarget, counts: RouteCounts) -> None:
        self.upstream = upstream
        self.counts = counts


class Snapshot:
    """Immutable compiled view of one config + one rollout state. Swapped as a whole."""

    __slots__ = (
        "config",
        "effective",
        "fallback",
        "grpc_error",
        "is_error",
        "loaded_at",
        "rollout_state",
        "rollout_states",
        "route_headers",
        "rules",
        "trusted",
        "unmatched",
        "upstreams",
    )

    def __init__(
        self,
        config: Config,
        rules: tuple[RouteRule[Binding], ...],
        upstreams: dict[str, UpstreamTarget],
        route_headers: frozenset[bytes],
        is_error: tuple[bool, ...],
        trusted: tuple[IpNetwork, ...],
        effective: tuple[tuple[str, str | None, tuple[tuple[str, float], ...] | None], ...],
        fallback: dict[str, UpstreamTarget],
        rollout_state: RolloutState | None,
        loaded_at: float,
        unmatched: RouteCounts,
        rollout_states: dict[str, RolloutState] | None = None,
        grpc_error: tuple[bool, ...] = (),
    ) -> None:
        self.config = config
        self.rules = rules
        self.upstreams = upstreams
        self.route_headers = route_headers
        self.is_error = is_error
        self.trusted = trusted
        self.effective = effective  # per route: (name, effective `to`, effective split)
        self.fallback = fallback  # canary -> baseline, for retries of failed canary requests
        self.rollout_state = rollout_state  # the first rollout's (the only one's, mostly)
        self.rollout_states = rollout_states or {}  # by rollout name
        self.loaded_at = loaded_at
        self.unmatched = unmatched
        # grpc_error[code]: a response with that grpc-status counts as an error (grpc_error_statuses)
        self.grpc_error = grpc_error or grpc_codes.error_table(grpc_codes.DEFAULT_ERRORS)


def compile_snapshot(
    config: Config,
    stats: Stats,
    pools: PoolRegistry,
    rollout_state: RolloutState | Mapping[str, RolloutState] | None,
    loaded_at: float | None = None,
) -> Snapshot:
    """Build the snapshot. Pure apart from creating pools/stats objects in the registries.

    `rollout_state`: the states by rollout name (a bare state is the first rollout's)."""
    states: dict[str, RolloutState] = {}
    if isinstance(rollout_state, RolloutState):
        if config.rollout is not None:
            states[config.rollout.name] = rollout_state
    elif rollout_state is not None:
        states.update(rollout_state)
    buckets = config.metrics.buckets
    upstreams: dict[str, UpstreamTarget] = {}
    for name, up in config.upstreams.items():
        endpoint_pools: tuple[EndpointPool, ...] = tuple(pools.pool_for(ep) for ep in up.endpoints)
        upstreams[name] = UpstreamTarget(
            name, up.version, Balancer(name, endpoint_pools), stats.upstream(name, buckets)
        )

    rollout = config.rollout
    rollouts = [(r, states.get(r.name)) for r in config.rollouts]
    rules: list[RouteRule[Binding]] = []
    needed: set[bytes] = set()
    effective: list[tuple[str, str | None, tuple[tuple[str, float], ...] | None]] = []
    for i, route in enumerate(config.routes):
        predicate = _compile_match(route.match, needed) if route.match is not None else None
        sticky_header = sticky_cookie = issue = None
        if route.sticky is not None:
            if route.sticky.header:
                sticky_header = route.sticky.header.lower().encode("latin-1")
                needed.add(sticky_header)
            elif route.sticky.cookie:
                sticky_cookie = route.sticky.cookie.encode("latin-1")
                needed.add(b"cookie")
                if route.sticky.issue is not None:
                    issue = cookie_attributes(route.sticky.issue)
        mirror = _mirror(config, route, stats, states)
        if route.to is not None:
            to = route.to
            for ro, st in rollouts:
                to = effective_target(to, ro, st)
            target = Binding(upstreams[to], stats.route_counts_for(route.name, to))
            rules.append(RouteRule(i, route.name, predicate, target, None, mirror=mirror))
            effective.append((route.name, to, None))
        else:
            split = _split(route)
            for ro, st in rollouts:
                split = effective_split(split, ro, st)
            table = SplitTable(
                tuple((Binding(upstreams[n], stats.route_counts_for(route.name, n)), w) for n, w in split)
            )
            rules.append(RouteRule(i, route.name, predicate, None, table, sticky_header, sticky_cookie, issue, mirror))
            effective.append((route.name, None, split))

    fallback: dict[str, UpstreamTarget] = {}
    for ro in config.rollouts:
        fallback[ro.canary] = upstreams[ro.baseline]
    error_statuses = rollout.error_statuses if rollout is not None else ("5xx",)
    trusted = tuple(ipaddress.ip_network(c, strict=False) for c in config.trusted_proxies)
    return Snapshot(
        config,
        tuple(rules),
        upstreams,
        frozenset(needed),
        error_status_table(error_statuses),
        trusted,
        tuple(effective),
        fallback,
        states.get(rollout.name) if rollout is not None else None,
        time.time() if loaded_at is None else loaded_at,
        stats.route_counts_for("", ""),
        states,
        grpc_codes.error_table(rollout.grpc_error_statuses if rollout is not None else grpc_codes.DEFAULT_ERRORS),
    )


def cookie_attributes(issue: CookieIssue) -> bytes:
    """What follows `NAME=ID` in the Set-Cookie of an issued sticky cookie."""
    parts = [f"Path={issue.path}", f"Max-Age={int(issue.max_age)}"]
    if issue.domain:
        parts.append(f"Domain={issue.domain}")
    if issue.secure:
        parts.append("Secure")
    if issue.http_only:
        parts.append("HttpOnly")
    parts.append("SameSite=" + issue.same_site.capitalize())
    return ("; " + "; ".join(parts)).encode("ascii")


def _mirror(config: Config, route: Route, stats: Stats, states: Mapping[str, RolloutState]) -> MirrorRule | None:
    """The route's compiled mirror; none while its upstream is a rolled-back canary (a rollback
    means no traffic at all for it, copies included, until a reset or a new version)."""
    m = route.mirror
    if m is None or m.percent <= 0:
        return None
    rollout = config.rollout_of(m.to)
    if rollout is not None and m.to == rollout.canary and rollout.mode != "observe":  # observe: traffic never changes
        state = states.get(rollout.name)
        if state is not None and state.phase == "rolled_back":
            return None
    buckets = config.metrics.buckets
    evidence = stats.upstream(m.to, buckets) if m.analyze else None
    error_statuses = rollout.error_statuses if rollout is not None else ("5xx",)
    return MirrorRule(
        route.name,
        m.to,
        config.upstreams[m.to].endpoints,
        m.percent,
        m.max_body,
        stats.mirror_for(route.name, m.to, buckets),
        evidence,
        error_status_table(error_statuses),
        config.timeouts.connect,
        config.timeouts.response,
    )


def _split(route: Route) -> tuple[tuple[str, float], ...]:
    assert route.split is not None
    return route.split


def _value_test(m: StringMatch) -> ValueTest:
    """Compile one matcher to a test on the (possibly missing) value."""
    if m.kind == "present":
        want = bool(m.value)
        return lambda v: (v is not None) is want
    raw = str(m.value).encode("utf-8")
    test: ValueTest
    if m.kind == "exact":
        test = lambda v: v == raw  # noqa: E731
    elif m.kind == "prefix":
        test = lambda v: v is not None and v.startswith(raw)  # noqa: E731
    elif m.kind == "suffix":
        test = lambda v: v is not None and v.endswith(raw)  # noqa: E731
    elif m.kind == "contains":
        test = lambda v: v is not None and raw in v  # noqa: E731
    else:
        rx = compile_fullmatch(str(m.value))  # RE2: linear time whatever the input
        test = lambda v: v is not None and rx(v)  # noqa: E731
    if m.invert:
        inner = test
        # A missing value never matches, inverted or not (Envoy's behaviour).
        return lambda v: v is not None and not inner(v)
    return test


def _compile_match(match: Match, needed: set[bytes]) -> Predicate:
    """AND of every part of a Match, as one predicate."""
    parts: list[Predicate] = []
    for name, m in match.headers:
        key = name.lower().encode("latin-1")
        needed.add(key)
        parts.append(_header_pred(key, _value_test(m)))
    for name, m in match.cookies:
        needed.add(b"cookie")
        parts.append(_cookie_pred(name.encode("latin-1"), _value_test(m)))
    for name, m in match.query:
        parts.append(_query_pred(name.encode("utf-8"), _value_test(m)))
    if match.path_prefix is not None:
        prefix = match.path_prefix.encode("utf-8")
        parts.append(lambda v: v.normalized_path().startswith(prefix))  # `/beta/../x` is not under /beta
    if match.methods:
        methods = frozenset(m.encode("ascii") for m in match.methods)
        parts.append(lambda v: v.method in methods)
    if match.hosts:
        parts.append(_host_pred(match.hosts))
    if len(parts) == 1:
        return parts[0]
    all_parts = tuple(parts)

    def every(view: RequestView) -> bool:
        for p in all_parts:  # noqa: SIM110 - a plain loop beats all(genexpr) on the hot path
            if not p(view):
                return False
        return True

    return every


def _host_pred(hosts: tuple[str, ...]) -> Predicate:
    """Virtual hosts: exact names, and `*.suffix` patterns matching any subdomain (not the apex)."""
    exact = frozenset(h.encode("ascii") for h in hosts if not h.startswith("*."))
    suffixes = tuple(h[1:].encode("ascii") for h in hosts if h.startswith("*."))  # ".example.com"

    def test(view: RequestView) -> bool:
        host = view.vhost()
        if host is None:
            return False
        if host in exact:
            return True
        for suffix in suffixes:  # noqa: SIM110 - a plain loop beats any(genexpr) on the hot path
            if host.endswith(suffix) and len(host) > len(suffix):
                return True
        return False

    return test


def _header_pred(key: bytes, test: ValueTest) -> Predicate:
    return lambda v: test(v.headers.get(key))


def _cookie_pred(name: bytes, test: ValueTest) -> Predicate:
    return lambda v: test(v.cookie(name))


def _query_pred(name: bytes, test: ValueTest) -> Predicate:
    return lambda v: test(v.query_param(name))
