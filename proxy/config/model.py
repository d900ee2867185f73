"""The validated configuration, as frozen dataclasses.

Everything here is produced by :func:`proxy.config.loader.load_config` and is never mutated.
Durations are floats in seconds, sizes are ints in bytes, percentages are floats in 0..100.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Literal

from proxy.config.grpc_codes import DEFAULT_ERRORS as GRPC_DEFAULT_ERRORS

MatchKind = Literal["exact", "prefix", "suffix", "contains", "regex", "present"]


@dataclass(frozen=True, slots=True)
class Address:
    """A host:port to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class CertPair:
    """A certificate chain file and its private key file (PEM)."""

    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class ListenerTLS:
    """`tls:`: the listener terminates TLS. `pairs()[0]` is served when no SNI name matches."""

    cert: str | None = None
    key: str | None = None
    certificates: tuple[CertPair, ...] = ()  # more pairs, chosen by SNI
    client_ca: str | None = None  # mutual TLS: clients must present a certificate it signed
    min_version: str = "1.2"  # "1.2" or "1.3"
    alpn: tuple[str, ...] = ("h2", "http/1.1")

    def pairs(self) -> tuple[tuple[str, CertPair], ...]:
        """Every (key path, pair), the top-level `cert`/`key` first."""
        top = (("tls", CertPair(self.cert, self.key)),) if self.cert and self.key else ()
        return top + tuple((f"tls.certificates[{i}]", p) for i, p in enumerate(self.certificates))


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    """`upstreams.NAME.tls:`: how `https://` endpoints are verified (and our client certificate)."""

    ca: str | None = None  # None: the system CAs
    server_name: str | None = None  # SNI and the name verified; None: the endpoint's host
    verify: bool = True
    cert: str | None = None  # client certificate for upstream mutual TLS
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream server, from `http://host:port` or `https://host:port` (`tls` set)."""

    host: str
    port: int
    tls: UpstreamTLS | None = None
    h2: bool = False  # the upstream's `protocol: h2`: HTTP/2 (prior knowledge over cleartext)

    @property
    def key(self) -> str:
        """host:port, as logs, metrics and the default Host header name the endpoint."""
        return f"{self.host}:{self.port}"

    @property
    def pool_key(self) -> str:
        """Stable identity, used to keep connection pools across reloads (TLS settings included);
        HTTP/1.1 and HTTP/2 (`h2`) connections are never shared."""
        prefix = "h2 " if self.h2 else ""
        if self.tls is None:
            return prefix + self.key
        tag = "" if self.tls == UpstreamTLS() else f"#{zlib.crc32(repr(self.tls).encode()):08x}"
        return f"{prefix}https://{self.key}{tag}"


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    endpoints: tuple[Endpoint, ...]
    version: str | None = None
    protocol: Literal["http1", "h2"] = "http1"  # h2: HTTP/2 to every endpoint (gRPC upstreams)


@dataclass(frozen=True, slots=True)
class StringMatch:
    """One header/cookie/query matcher.

    kind "present": `value` is the bool given (`present: true` / `present: false`).
    Other kinds: `value` is the string to compare (regex: the pattern, matched with fullmatch).
    `invert` negates the result (Envoy's invert_match).
    """

    kind: MatchKind
    value: str | bool
    invert: bool = False


@dataclass(frozen=True, slots=True)
class Match:
    """All present parts are ANDed; an empty Match matches every request."""

    headers: tuple[tuple[str, StringMatch], ...] = ()  # names lower-cased
    cookies: tuple[tuple[str, StringMatch], ...] = ()
    query: tuple[tuple[str, StringMatch], ...] = ()
    path_prefix: str | None = None
    methods: tuple[str, ...] = ()  # upper-cased; empty = any
    # Virtual hosts: lower-cased names, or "*.suffix" (any subdomain, not the apex); empty = any.
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CookieIssue:
    """`sticky.issue`: give a visitor without the sticky cookie a random id in a Set-Cookie."""

    max_age: float = 30 * 86400.0  # seconds
    secure: bool = False
    http_only: bool = True
    same_site: Literal["strict", "lax", "none"] = "lax"
    path: str = "/"
    domain: str | None = None


@dataclass(frozen=True, slots=True)
class Sticky:
    """Where the stickiness key comes from: exactly one of header / cookie is set."""

    header: str | None = None  # lower-cased
    cookie: str | None = None
    issue: CookieIssue | None = None  # only with `cookie`


@dataclass(frozen=True, slots=True)
class Mirror:
    """`routes[].mirror`: copy a share of the route's requests to another upstream (shadow traffic)."""

    to: str
    percent: float = 100.0
    max_body: int = 1024 * 1024  # larger request bodies are not mirrored (and counted)
    analyze: bool = False  # the mirror's results are the rollout canary's evidence


@dataclass(frozen=True, slots=True)
class Route:
    """A routing rule. Exactly one of `to` and `split` is set.

    `split` keeps config order (it defines the cumulative bucket layout).
    """

    name: str
    match: Match | None
    to: str | None = None
    split: tuple[tuple[str, float], ...] | None = None
    sticky: Sticky | None = None
    max_body_size: int | None = None  # overrides limits.max_body_size for this route
    mirror: Mirror | None = None


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 2.0
    response: float = 30.0  # request fully sent -> response head received
    idle: float = 60.0  # idle keep-alive (client side and pooled upstream side)
    client_header: float = 10.0  # connection open / previous response done -> request head complete
    client_body: float = 60.0  # max time between two reads of a request body
    send: float = 60.0  # max time a write to the client may stay blocked


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_size: int = 32 * 1024  # request line + headers, bytes
    max_headers: int = 100
    max_url_length: int = 8 * 1024
    max_body_size: int | None = None  # None = unlimited
    max_connections: int = 10_000  # client connections per process
    http2_max_concurrent_streams: int = 100  # SETTINGS_MAX_CONCURRENT_STREAMS per HTTP/2 connection


@dataclass(frozen=True, slots=True)
class Thresholds:
    max_error_rate: float | None = 0.05
    max_error_rate_increase: float | None = 0.02
    max_p99: float | None = None  # seconds
    max_p99_ratio: float | None = 1.5  # tail test against 1.5x the baseline p99's upper bound
    max_error_rate_ratio: float | None = None  # canary rate vs this x the baseline's
    max_median_ratio: float | None = None  # Mann-Whitney shift test of the body


@dataclass(frozen=True, slots=True)
class FastFail:
    consecutive_errors: int = 20  # 0 disables


@dataclass(frozen=True, slots=True)
class Gate:
    """`{gate: {webhook: URL, timeout: 10s}}`: the rollout goes on once the URL answers 2xx."""

    webhook: str
    timeout: float = 10.0


StepKind = Literal["weight", "pause", "gate", "analysis"]


@dataclass(frozen=True, slots=True)
class Step:
    """One rollout step. `weight` is the canary's share while on it (a pause, gate or analysis step
    keeps the weight of the step before it). `pause`: seconds, None = until `promote`."""

    kind: StepKind
    weight: float
    pause: float | None = None
    gate: Gate | None = None
    min_requests: int | None = None


@dataclass(frozen=True, slots=True)
class Check:
    """A Prometheus query judged every interval: the first sample must stay <= max / >= min."""

    name: str
    prometheus: str  # base URL of the Prometheus HTTP API
    query: str  # {rollout}, {canary}, {baseline}, {window} substituted
    max: float | None = None
    min: float | None = None
    timeout: float = 5.0
    failure_limit: int = 3  # failed queries in a row that trip like a breach (0: never)


@dataclass(frozen=True, slots=True)
class Webhook:
    """One notification receiver."""

    url: str
    events: tuple[str, ...] = ()  # empty: every event
    format: Literal["json", "slack"] = "json"
    secret: str | None = None  # HMAC-SHA256 key, read from `secret_file` at load
    secret_file: str | None = None


@dataclass(frozen=True, slots=True)
class Rollout:
    canary: str
    baseline: str
    steps: tuple[float, ...] = ()
    interval: float = 30.0
    window: float = 60.0
    min_requests: int = 100
    error_statuses: tuple[str, ...] = ("5xx",)  # "5xx" classes or exact codes like "429"
    # grpc-status codes (names or numbers) that count as errors, like error_statuses for HTTP
    grpc_error_statuses: tuple[str, ...] = GRPC_DEFAULT_ERRORS
    confidence: float = 0.99
    thresholds: Thresholds = field(default_factory=Thresholds)
    fast_fail: FastFail = field(default_factory=FastFail)
    state_file: str | None = None
    webhook: str | None = None
    name: str = "default"
    step_specs: tuple[Step, ...] = ()  # same length as `steps` (which holds each step's weight)
    progress_deadline: float | None = None
    on_deadline: Literal["stall", "rollback"] = "stall"
    mode: Literal["enforce", "observe"] = "enforce"
    checks: tuple[Check, ...] = ()
    webhooks: tuple[Webhook, ...] = ()
    # per-try timeout of the canary's idempotent tries (they then go to the baseline);
    # None: max(1s, 10x the baseline's p99), once the baseline has a p99
    canary_try_timeout: float | None = None

    def step(self, index: int) -> Step:
        """The step at `index` (clamped); plain weights when `step_specs` was not given."""
        i = min(max(index, 0), len(self.steps) - 1)
        if len(self.step_specs) == len(self.steps):
            return self.step_specs[i]
        return Step("weight", self.steps[i])


@dataclass(frozen=True, slots=True)
class Metrics:
    buckets: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class AccessLog:
    enabled: bool = True
    path: str | None = None  # None = stdout


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int = 1  # extra attempts after the first
    budget_percent: float = 20.0  # Envoy-style: retries in flight <= max(min, pct of active)
    min_concurrent: int = 3


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_failures: int = 5  # 0 disables
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0


@dataclass(frozen=True, slots=True)
class Fleet:
    """`fleet:`: replicas sharing their rollouts through Redis (see proxy/control/fleet)."""

    redis: str  # redis://, rediss:// or redis+sentinel:// URL, validated
    namespace: str
    replica: str = ""  # "" = hostname-pid, filled in at start
    lease: float = 5.0  # seconds


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated config file."""

    listen: Address
    admin: Address
    upstreams: dict[str, Upstream]  # config order kept; never mutated
    routes: tuple[Route, ...]
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    rollout: Rollout | None = None
    metrics: Metrics = field(default_factory=Metrics)
    access_log: AccessLog = field(default_factory=AccessLog)
    retries: Retries = field(default_factory=Retries)
    outlier_detection: OutlierDetection = field(default_factory=OutlierDetection)
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-* we keep
    admin_token: str | None = None  # resolved value (from admin_token_file / env / inline)
    admin_hosts: tuple[str, ...] = ()  # extra Host names the admin API answers to (lower-cased)
    admin_insecure: bool = False  # allow a non-loopback admin listener without a token
    admin_max_connections: int = 64  # the admin listener's own descriptor budget
    admin_header_timeout: float = 10.0  # an admin request head must arrive within this
    max_config_size: int = 4 * 1024 * 1024  # bytes; bigger config files are refused
    shutdown_grace: float = 20.0
    fleet: Fleet | None = None  # None: no Redis anywhere
    via: str | None = None  # Via pseudonym; None: `canary-proxy-` + a per-instance hash, "": no Via
    source_hash: str = ""  # sha256 of the file bytes, first 12 hex digits
    source_path: str = ""
    rollouts: tuple[Rollout, ...] = ()  # every rollout, by name; `rollout` is the first one
    tls: ListenerTLS | None = None  # None: the listener speaks cleartext

    def __post_init__(self) -> None:
        # Keep the two views in step however the Config was built (loader, tests, replace()).
        rollout = self.rollout
        if rollout is None:
            object.__setattr__(self, "rollouts", ())
        elif not self.rollouts or self.rollouts[0] != rollout:
            rest = tuple(r for r in self.rollouts[1:] if r.name != rollout.name)
            object.__setattr__(self, "rollouts", (rollout, *rest))

    def rollout_named(self, name: str) -> Rollout | None:
        """The rollout called `name`, or None."""
        return next((r for r in self.rollouts if r.name == name), None)

    def rollout_of(self, upstream: str) -> Rollout | None:
        """The rollout `upstream` is the canary or the baseline of, or None."""
        return next((r for r in self.rollouts if upstream in (r.canary, r.baseline)), None)
