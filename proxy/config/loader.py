"""YAML file -> validated :class:`~proxy.config.model.Config`, or a ConfigError listing every problem.

Each message is `"<key path>: <message> (line N)"`, e.g.
`routes[1].split: weights sum to 95, expected 100 (line 14)`. Like `nginx -t`, we keep going after
the first problem so one run shows them all.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, TypeVar

from yaml.nodes import ScalarNode

from proxy.config.errors import ConfigError
from proxy.config.fleet import read_fleet
from proxy.config.grpc_reader import grpc_error_statuses, upstream_protocol
from proxy.config.model import (
    AccessLog,
    Address,
    Config,
    Endpoint,
    FastFail,
    Limits,
    Metrics,
    OutlierDetection,
    Retries,
    Rollout,
    Step,
    Thresholds,
    Timeouts,
    Upstream,
)
from proxy.config.readfile import MAX_CONFIG_SIZE, read_config_bytes
from proxy.config.rollouts import RolloutKeys
from proxy.config.routes_reader import TOKEN, RouteReader
from proxy.config.tls_reader import read_listener_tls, read_upstream_tls
from proxy.config.units import (
    fmt_duration,
    parse_address,
    parse_endpoint,
    parse_network,
    parse_status,
    parse_webhook,
    same_socket,
)
from proxy.config.yamlnodes import Reader
from proxy.config.yamltree import Errors, Readers, Value, compose, root_value

T = TypeVar("T")
TOKEN_ENV = "CANARY_PROXY_ADMIN_TOKEN"
DEFAULT_ADMIN = Address("127.0.0.1", 9901)
TOP_KEYS = (
    "listen", "admin", "upstreams", "routes", "timeouts", "limits", "rollout", "metrics", "access_log",
    "retries", "outlier_detection", "trusted_proxies", "admin_token", "admin_token_file",
    "admin_hosts", "admin_insecure", "admin_max_connections", "admin_header_timeout", "shutdown_grace",
    "rollouts", "fleet", "via", "max_config_size", "tls",
)  # fmt: skip

_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?")


def _host_name(text: str) -> str:
    """An `admin_hosts` entry: a DNS name or an IP address, without port."""
    name = text.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(name))
    if len(name) > 253 or not _HOST_NAME.fullmatch(name):
        raise ValueError(f'invalid host name "{text}" (a DNS name or IP address, without port)')
    return name.rstrip(".")


def load_config(path: str, env: Mapping[str, str] | None = None, max_size: int | None = None) -> Config:
    """Read and validate the config file at `path`. Raises ConfigError only.

    `env` (default os.environ) supplies CANARY_PROXY_ADMIN_TOKEN when the file sets no token.
    `max_size` caps the file (default: CANARY_PROXY_MAX_CONFIG_SIZE, else 4 MiB).
    """
    data = read_config_bytes(path, max_size)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError([f"config file is not valid UTF-8 (byte {e.start})"], path) from None
    return replace(_parse(text, path, env), source_hash=_hash(data), source_path=path)


def parse_config(text: str, source: str = "<string>", env: Mapping[str, str] | None = None) -> Config:
    """Validate config text; `source` names it in the ConfigError. Raises ConfigError only."""
    return replace(_parse(text, source, env), source_hash=_hash(text.encode("utf-8")))


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def _parse(text: str, source: str, env: Mapping[str, str] | None) -> Config:
    try:
        return _parse_unguarded(text, source, env)
    except RecursionError:
        raise ConfigError(["config nested too deeply"], source) from None
    except (ValueError, OverflowError, MemoryError) as e:  # e.g. an int beyond Python's digit limit
        raise ConfigError([f"invalid value: {str(e)[:200]}"], source) from None


def _parse_unguarded(text: str, source: str, env: Mapping[str, str] | None) -> Config:
    errors = Errors()
    node = compose(text, errors)
    if node is None or root_value(node).is_null:
        raise ConfigError(errors.messages() or ["config is empty"], source)
    cfg = _Parser(Reader(errors), os.environ if env is None else env).config(root_value(node))
    if errors or cfg is None:
        raise ConfigError(errors.messages(), source)
    return cfg


class _Parser(RouteReader):
    """One method per section; each records its errors and falls back to defaults to keep going."""

    def __init__(self, reader: Reader, env: Mapping[str, str]) -> None:
        self.r = reader
        self.env = env
        self.upstream_names: list[str] | None = None  # None: section unusable, skip name lookups
        self.baselines: dict[str, str] = {}  # baseline upstream -> rollout name (read before routes)
        self.h2_upstreams: set[str] = set()

    def config(self, root: Value) -> Config | None:
        r = self.r
        top = r.mapping(root, TOP_KEYS, required=("listen", "upstreams", "routes"), extensions=True)
        if top is None:
            return None
        listen = self.address(top["listen"]) if "listen" in top else None
        admin = self.address(top["admin"]) if "admin" in top else DEFAULT_ADMIN
        if listen and admin and same_socket(listen, admin):
            r.error(top.get("admin", top["listen"]), f"must differ from listen ({listen})")
        upstreams = self.upstreams(top["upstreams"]) if "upstreams" in top else {}
        rollouts = self.rollouts(top)
        self.baselines = {ro.baseline: ro.name for ro in rollouts}
        return Config(
            listen=listen or Address("", 0),
            admin=admin or DEFAULT_ADMIN,
            upstreams=upstreams,
            routes=self.routes(top["routes"]) if "routes" in top else (),
            timeouts=r.record(top.get("timeouts"), Timeouts, {f.name: r.duration for f in fields(Timeouts)})
            or Timeouts(),
            limits=self.limits(top.get("limits")),
            rollout=rollouts[0] if rollouts else None,
            rollouts=rollouts,
            metrics=r.record(top.get("metrics"), Metrics, {"buckets": self.buckets}) or Metrics(),
            access_log=self.access_log(top.get("access_log")),
            retries=self.retries(top.get("retries")),
            outlier_detection=self.outlier_detection(top.get("outlier_detection")),
            trusted_proxies=self.opt(top.get("trusted_proxies"), (), lambda x: r.list_of(x, parse_network)),
            admin_token=self.admin_token(top.get("admin_token"), top.get("admin_token_file")),
            shutdown_grace=self.opt(top.get("shutdown_grace"), 20.0, self.grace),
            fleet=read_fleet(r, top["fleet"]) if "fleet" in top else None,
            via=self.via(top["via"]) if "via" in top else None,
            admin_hosts=self.opt(top.get("admin_hosts"), (), self.admin_hosts),
            admin_insecure=self.opt(top.get("admin_insecure"), False, r.boolean),
            admin_max_connections=self.opt(top.get("admin_max_connections"), 64, lambda x: r.integer(x, 1, 10_000)),
            admin_header_timeout=self.opt(top.get("admin_header_timeout"), 10.0, r.duration),
            max_config_size=self.opt(top.get("max_config_size"), MAX_CONFIG_SIZE, lambda x: r.size(x, lo=1024)),
            tls=read_listener_tls(r, top["tls"]) if "tls" in top else None,
        )

    def via(self, v: Value) -> str | None:
        """The Via pseudonym: a token (RFC 9110 7.6.3), or "" to send no Via."""
        text = self.r.text(v)
        if text is None:
            return None
        if text.lower() in ("false", "off"):
            return ""  # `via: false` reads as "no Via" too
        if text and not TOKEN.fullmatch(text):
            self.r.error(v, f'invalid Via pseudonym "{text}": use letters, digits and -._~ ("" turns Via off)')
            return None
        return text

    @staticmethod
    def opt(v: Value | None, default: T, read: Callable[[Value], T | None]) -> T:
        """`read(v)` when the key is present and valid, else `default`."""
        got = read(v) if v is not None else None
        return default if got is None else got

    def address(self, v: Value) -> Address | None:
        return self.r.convert(v, parse_address, expected='"host:port"')

    # -- upstreams ------------------------------------------------------------------------------

    def upstreams(self, v: Value) -> dict[str, Upstream]:
        r = self.r
        entries = r.mapping(v, None)
        if entries is None:
            return {}
        self.upstream_names = list(entries) or None  # none at all: one error is enough
        if not entries:
            r.error(v, "at least one upstream is required")
        out: dict[str, Upstream] = {}
        for name, uv in entries.items():
            if not _UPSTREAM_NAME.fullmatch(name):
                r.error(uv, 'invalid upstream name (use letters, digits, ".", "_", "-")')
            m = r.mapping(uv, ("endpoints", "version", "tls", "protocol"), required=("endpoints",))
            if m is not None and "endpoints" in m:
                version = r.text(m["version"]) if "version" in m else None
                protocol = upstream_protocol(r, m["protocol"]) if "protocol" in m else "http1"
                endpoints = self.endpoints(m["endpoints"])
                if "tls" in m:
                    endpoints = self.upstream_tls(m["tls"], endpoints)
                if protocol == "h2":
                    endpoints = tuple(replace(ep, h2=True) for ep in endpoints)
                    self.h2_upstreams.add(name)
                out[name] = Upstream(name, endpoints, version, protocol)
        return out

    def upstream_tls(self, v: Value, endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
        """`upstreams.NAME.tls` applies to the upstream's `https://` endpoints."""
        tls = read_upstream_tls(self.r, v)
        if endpoints and all(ep.tls is None for ep in endpoints):
            self.r.error(v, "applies to https:// endpoints only, and this upstream has none")
        if tls is None:
            return endpoints
        return tuple(ep if ep.tls is None else replace(ep, tls=tls) for ep in endpoints)

    def endpoints(self, v: Value) -> tuple[Endpoint, ...]:
        items = self.r.sequence(v)
        if items is not None and not items:
            self.r.error(v, "must list at least one endpoint")
        seen: dict[Endpoint, str] = {}
        for item in items or []:
            ep = self.r.convert(item, parse_endpoint, raw=True)
            if ep is not None and ep in seen:
                self.r.error(item, f"duplicate endpoint {ep.key} (also {seen[ep]})")
            elif ep is not None:
                seen[ep] = item.path
        return tuple(seen)

    def known(self, v: Value, name: str | None) -> str | None:
        """`name` if it is a defined upstream (or upstreams are unusable anyway), else an error."""
        names = self.upstream_names
        if name is None or names is None or name in names:
            return name
        self.r.error(v, f'unknown upstream "{name}" (known: {", ".join(names)})')
        return None

    # -- routes ---------------------------------------------------------------------------------

    def rollouts(self, top: dict[str, Value]) -> tuple[Rollout, ...]:
        """`rollout:` (one, named "default" unless it says) or `rollouts:` (a list of named ones)."""
        if "rollout" in top and "rollouts" in top:
            self.r.error(top["rollouts"], 'set only one of "rollout" and "rollouts"')
            return ()
        if "rollouts" in top:
            return RolloutKeys(self.r).rollouts(top["rollouts"], self.rollout)
        one = self.rollout(top["rollout"]) if "rollout" in top else None
        return (one,) if one is not None else ()

    def rollout(self, v: Value) -> Rollout | None:
        r = self.r
        keys = RolloutKeys(r)
        rollout = r.record(
            v,
            _rollout,
            {
                "canary": lambda x: self.known(x, r.text(x)),
                "baseline": lambda x: self.known(x, r.text(x)),
                "steps": keys.steps,
                "interval": r.duration,
                "window": r.duration,
                "min_requests": lambda x: r.integer(x, lo=1),
                "error_statuses": self.error_statuses,
                "grpc_error_statuses": lambda x: grpc_error_statuses(r, x),
                "confidence": lambda x: r.number(x, 0.5, 1, lo_open=True, hi_open=True),
                "thresholds": self.thresholds,
                "fast_fail": lambda x: r.record(x, FastFail, {"consecutive_errors": lambda y: r.integer(y, lo=0)}),
                "state_file": r.string,
                "webhook": lambda x: r.convert(x, parse_webhook, raw=True),
                **keys.readers(),
                "canary_try_timeout": r.duration,
            },
            required=("canary", "baseline"),
        )
        if rollout is not None and rollout.canary == rollout.baseline:
            m = r.entries(v)
            r.error(m["baseline"], f'must differ from canary ("{rollout.canary}")')
        return rollout

    def thresholds(self, v: Value) -> Thresholds | None:
        r = self.r
        fraction = lambda x: r.number(x, 0, 1)  # noqa: E731
        ratio = lambda x: r.number(x, lo=1)  # noqa: E731  - below 1 a healthy canary would breach
        readers: Readers = {
            "max_error_rate": fraction,
            "max_error_rate_increase": fraction,
            "max_p99": r.duration,
            "max_p99_ratio": lambda x: r.number(x, lo=0, lo_open=True),
            "max_error_rate_ratio": ratio,
            "max_median_ratio": ratio,
        }
        return r.record(v, Thresholds, readers, nullable=True)  # `key: null` switches a check off

    def buckets(self, v: Value) -> tuple[float, ...] | None:
        return self.r.increasing(v, "buckets")

    def grace(self, v: Value) -> float | None:
        return self.r.duration(v, allow_zero=True)  # 0: stop at once

    def error_statuses(self, v: Value) -> tuple[str, ...] | None:
        statuses = self.r.list_of(v, parse_status, empty="must list at least one status")
        return tuple(dict.fromkeys(statuses)) if statuses is not None else None  # dropping repeats

    # -- the rest -------------------------------------------------------------------------------

    def limits(self, v: Value | None) -> Limits:
        r = self.r
        count = lambda x: r.integer(x, lo=1)  # noqa: E731
        size = lambda x: r.size(x, lo=1)  # noqa: E731
        readers: Readers = {
            "max_header_size": size,
            "max_headers": count,
            "max_url_length": size,
            "max_body_size": r.size,
            "max_connections": count,
            "http2_max_concurrent_streams": lambda x: r.integer(x, 1, 10_000),
        }
        return r.record(v, Limits, readers) or Limits()

    def access_log(self, v: Value | None) -> AccessLog:
        r = self.r
        if v is not None and isinstance(v.node, ScalarNode):  # `access_log: false`
            enabled = r.boolean(v)
            return AccessLog(enabled) if enabled is not None else AccessLog()
        readers: Readers = {"enabled": r.boolean, "path": r.string}
        return r.record(v, AccessLog, readers) or AccessLog()

    def retries(self, v: Value | None) -> Retries:
        r = self.r
        readers: Readers = {
            "attempts": lambda x: r.integer(x, lo=0),
            "budget_percent": lambda x: r.number(x, 0, 100),
            "min_concurrent": lambda x: r.integer(x, lo=0),
        }
        return r.record(v, Retries, readers) or Retries()

    def outlier_detection(self, v: Value | None) -> OutlierDetection:
        r = self.r
        readers: Readers = {
            "consecutive_failures": lambda x: r.integer(x, lo=0),
            "base_ejection_time": r.duration,
            "max_ejection_time": r.duration,
        }
        out = r.record(v, OutlierDetection, readers) or OutlierDetection()
        base, top = out.base_ejection_time, out.max_ejection_time
        if v is not None and top < base:
            m = r.entries(v)
            if "max_ejection_time" in m:
                r.error(m["max_ejection_time"], f"must be >= base_ejection_time ({fmt_duration(base)})")
            else:
                r.error(m["base_ejection_time"], f"must be <= max_ejection_time ({fmt_duration(top)})")
        return out

    def admin_hosts(self, v: Value) -> tuple[str, ...] | None:
        hosts = self.r.list_of(v, _host_name)
        return None if hosts is None else tuple(dict.fromkeys(hosts))

    def admin_token(self, inline: Value | None, file: Value | None) -> str | None:
        r = self.r
        if inline is not None and file is not None:
            r.error(file, 'set only one of "admin_token" and "admin_token_file"')
            return None
        if inline is not None:
            return r.text(inline)
        if file is None:
            return self.env.get(TOKEN_ENV) or None
        path = r.string(file)
        if path is None:
            return None
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            r.error(file, f'cannot read "{path}": {getattr(e, "strerror", None) or e}')
            return None
        if not token:
            r.error(file, f'"{path}" is empty')
        return token or None


def _rollout(steps: tuple[Step, ...] = (), **kw: Any) -> Rollout:
    """Rollout(...) from the parsed keys: `steps` holds each step's weight, `step_specs` the steps."""
    plain = all(s.kind == "weight" for s in steps)  # a ladder of numbers needs no step objects
    return Rollout(steps=tuple(s.weight for s in steps), step_specs=() if plain else steps, **kw)
