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
import stat
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, TypeVar

from yaml.nodes import ScalarNode

from proxy.config.errors import ConfigError
from proxy.config.fleet import read_fleet
from proxy.config.hosts import parse_host_pattern
from proxy.config.model import (
    AccessLog,
    Address,
    Config,
    CookieIssue,
    Endpoint,
    FastFail,
    Limits,
    Match,
    Metrics,
    Mirror,
    OutlierDetection,
    Retries,
    Rollout,
    Route,
    Step,
    Sticky,
    StringMatch,
    Thresholds,
    Timeouts,
    Upstream,
)
from proxy.config.rollouts import RolloutKeys
from proxy.config.saferegex import RegexError, compile_fullmatch
from proxy.config.units import (
    fmt_duration,
    fmt_number,
    parse_address,
    parse_endpoint,
    parse_network,
    parse_size,
    parse_status,
    parse_webhook,
    same_socket,
)
from proxy.config.yamlnodes import Errors, Reader, Readers, Value, compose, root_value

T = TypeVar("T")
TOKEN_ENV = "CANARY_PROXY_ADMIN_TOKEN"
DEFAULT_ADMIN = Address("127.0.0.1", 9901)
TOP_KEYS = (
    "listen", "admin", "upstreams", "routes", "timeouts", "limits", "rollout", "metrics", "access_log",
    "retries", "outlier_detection", "trusted_proxies", "admin_token", "admin_token_file",
    "admin_hosts", "admin_insecure", "admin_max_connections", "admin_header_timeout", "shutdown_grace",
    "rollouts", "fleet", "via", "max_config_size",
)  # fmt: skip
ROUTE_KEYS = ("name", "match", "to", "split", "sticky", "max_body_size", "mirror")
MATCH_KEYS = ("headers", "cookies", "query", "path_prefix", "methods", "host")
SAME_SITE = ("strict", "lax", "none")
MATCH_KINDS = ("exact", "prefix", "suffix", "contains", "regex", "present")

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: header, cookie, method names
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_EMPTY_MATCH = "match must not be empty; omit it to match everything"
_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?")
MAX_CONFIG_SIZE = 4 * 1024 * 1024
SIZE_ENV = "CANARY_PROXY_MAX_CONFIG_SIZE"  # the cap of the first read (the file's own key: reloads)


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


def read_config_bytes(path: str, max_size: int | None = None) -> bytes:
    """The file's bytes: only a regular file (after following symlinks), at most `max_size` bytes.
    Raises ConfigError. Opened non-blocking, so a FIFO in its place never hangs the caller."""
    limit = max_size if max_size is not None else _env_size()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError([f"cannot read config file: {e.strerror or e}"], path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError([f"cannot read config file: {_file_kind(st.st_mode)}"], path)
        if st.st_size > limit:
            raise ConfigError([f"config file too big: {st.st_size} bytes, the limit is {limit}"], path)
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > limit:  # it grew while we read
            raise ConfigError([f"config file too big: over {limit} bytes"], path)
        return b"".join(chunks)
    except OSError as e:
        raise ConfigError([f"cannot read config file: {e.strerror or e}"], path) from None
    finally:
        os.close(fd)


def _env_size() -> int:
    raw = os.environ.get(SIZE_ENV, "")
    try:
        return parse_size(raw) if raw else MAX_CONFIG_SIZE
    except ValueError:
        return MAX_CONFIG_SIZE


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "Is a directory"  # what reading one used to say (strerror of EISDIR)
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special"
    return f"not a regular file ({kind})"


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


def _same_site(text: str) -> str:
    value = text.strip().lower()
    if value not in SAME_SITE:
        raise ValueError(f'invalid same_site "{text}" (expected strict, lax or none)')
    return value


_COOKIE_OCTETS = re.compile(r"[\x21-\x3a\x3c-\x7e]+")  # no controls, spaces or ";" (RFC 6265 av-octets)


def _cookie_path(text: str) -> str:
    if not text.startswith("/") or not _COOKIE_OCTETS.fullmatch(text):
        raise ValueError(f'invalid cookie path "{text}" (must start with "/", no spaces or ";")')
    return text


def _cookie_domain(text: str) -> str:
    host = parse_host_pattern(text.lstrip("."))
    if host.startswith("*") or host.startswith("["):
        raise ValueError(f'invalid cookie domain "{text}"')
    return host


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


class _Parser:
    """One method per section; each records its errors and falls back to defaults to keep going."""

    def __init__(self, reader: Reader, env: Mapping[str, str]) -> None:
        self.r = reader
        self.env = env
        self.upstream_names: list[str] | None = None  # None: section unusable, skip name lookups
        self.baselines: dict[str, str] = {}  # baseline upstream -> rollout name (read before routes)

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
        )

    def via(self, v: Value) -> str | None:
        """The Via pseudonym: a token (RFC 9110 7.6.3), or "" to send no Via."""
        text = self.r.text(v)
        if text is None:
            return None
        if text.lower() in ("false", "off"):
            return ""  # `via: false` reads as "no Via" too
        if text and not _TOKEN.fullmatch(text):
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
            m = r.mapping(uv, ("endpoints", "version"), required=("endpoints",))
            if m is not None and "endpoints" in m:
                version = r.text(m["version"]) if "version" in m else None
                out[name] = Upstream(name, self.endpoints(m["endpoints"]), version)
        return out

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

    def routes(self, v: Value) -> tuple[Route, ...]:
        r = self.r
        items = r.sequence(v)
        if items is not None and not items:
            r.error(v, "at least one route is required")
        out: list[Route] = []
        names: dict[str, str] = {}
        catch_all: str | None = None  # the first route without `match`; every later one is dead
        for item in items or []:
            m = r.mapping(item, ROUTE_KEYS, required=("name",), keep_null=True)
            if m is None:
                continue
            name = r.string(m["name"]) if "name" in m else None
            if name is not None and name in names:
                r.error(m["name"], f'duplicate route name "{name}" (also {names[name]})')
            elif name is not None:
                names[name] = item.path
            if catch_all is not None:
                r.error(item, f"unreachable: {catch_all} matches every request")
            elif "match" not in m:
                catch_all = f'{item.path} ("{name}")'
            route = self.route(item, m, name)
            if route is not None:
                out.append(route)
        return tuple(out)

    def route(self, v: Value, m: dict[str, Value], name: str | None) -> Route | None:
        r = self.r
        given = {k: x for k, x in m.items() if not x.is_null}
        match = self.match(m["match"]) if "match" in m else None
        to = split = sticky = None
        if ("to" in given) == ("split" in given):
            r.error(v, f'set exactly one of "to" and "split" (got {"both" if "to" in given else "neither"})')
        elif "to" in given:
            to = self.known(given["to"], r.text(given["to"]))
        else:
            split = self.split(given["split"])
        if "sticky" in given and "split" not in given:
            r.error(given["sticky"], 'only allowed with "split"')
        elif "sticky" in given:
            sticky = self.sticky(given["sticky"])
        body = r.size(given["max_body_size"]) if "max_body_size" in given else None
        mirror = self.mirror(given["mirror"], to, split) if "mirror" in given else None
        if name is None or (to is None and split is None):
            return None
        return Route(name, match, to, split, sticky, body, mirror)

    def mirror(self, v: Value, to: str | None, split: tuple[tuple[str, float], ...] | None) -> Mirror | None:
        """`mirror: {to: UPSTREAM, percent: 10, max_body: 1MiB, analyze: true}`."""
        r = self.r
        readers: Readers = {
            "to": lambda x: self.known(x, r.text(x)),
            "percent": lambda x: r.number(x, 0, 100),
            "max_body": r.size,
            "analyze": r.boolean,
        }
        mirror = r.record(v, Mirror, readers, required=("to",))
        if mirror is None:
            return None
        own = to if to is not None else next((n for n, w in split or () if w >= 100), None)
        if own is not None and mirror.to == own:
            r.error(r.entries(v)["to"], f'mirror must not point at the route\'s own target ("{own}")')
            return None
        if mirror.analyze and mirror.to in self.baselines:  # copies would be judged as the baseline's traffic
            msg = f'"{mirror.to}" is the baseline of rollout "{self.baselines[mirror.to]}": analyze judges a canary'
            r.error(r.entries(v)["analyze"], msg)
            return None
        return mirror

    def match(self, v: Value) -> Match | None:
        r = self.r
        before = len(r.errors)
        m = r.mapping(v, MATCH_KEYS) if not v.is_null else None
        if m is None:
            if v.is_null:
                r.error(v, _EMPTY_MATCH)
            return None
        prefix = r.string(m["path_prefix"]) if "path_prefix" in m else None
        if prefix is not None and not prefix.startswith("/"):
            r.error(m["path_prefix"], f'must start with "/", got "{prefix}"')
        methods: list[str] = []
        for item in (r.sequence(m["methods"]) if "methods" in m else None) or []:
            method = r.string(item)
            if method is not None and not _TOKEN.fullmatch(method):
                r.error(item, f'invalid method "{method}"')
            elif method is not None and method.upper() not in methods:
                methods.append(method.upper())
        match = Match(
            headers=self.matchers(m.get("headers"), "header", lower=True),
            cookies=self.matchers(m.get("cookies"), "cookie"),
            query=self.matchers(m.get("query"), "query parameter"),
            path_prefix=prefix,
            methods=tuple(methods),
            hosts=self.hosts(m["host"]) if "host" in m else (),
        )
        if match == Match() and len(r.errors) == before:
            r.error(v, _EMPTY_MATCH)
        return match

    def hosts(self, v: Value) -> tuple[str, ...]:
        """`host: [shop.example.com, "*.shop.example.com"]` (or one string): normalised patterns."""
        r = self.r
        items = [v] if isinstance(v.node, ScalarNode) and not v.is_null else r.sequence(v)
        if items is not None and not items:
            r.error(v, "must list at least one host")
        out: list[str] = []
        for item in items or []:
            pattern = r.convert(item, parse_host_pattern, raw=True)
            if pattern is not None and pattern not in out:
                out.append(pattern)
        return tuple(out)

    def matchers(self, v: Value | None, what: str, lower: bool = False) -> tuple[tuple[str, StringMatch], ...]:
        out: list[tuple[str, StringMatch]] = []
        for name, mv in ((self.r.mapping(v, None) if v is not None else None) or {}).items():
            if not name or (what != "query parameter" and not _TOKEN.fullmatch(name)):
                self.r.error(mv, f'invalid {what} name "{name}"')
            sm = self.string_match(mv)
            if sm is not None:
                out.append((name.lower() if lower else name, sm))
        return tuple(out)

    def string_match(self, v: Value) -> StringMatch | None:
        """`{exact: x}`, `{regex: ..., invert: true}`, `{present: false}`...; a bare string means exact."""
        r = self.r
        if v.is_null:
            r.error(v, "expected a string or a matcher like {exact: value}, got null")
            return None
        if isinstance(v.node, ScalarNode):
            text = r.text(v)
            return StringMatch("exact", text) if text is not None else None
        before = len(r.errors)
        m = r.mapping(v, (*MATCH_KINDS, "invert"))
        if m is None or len(r.errors) > before:  # e.g. a misspelt kind: that error says it all
            return None
        kinds = [k for k in MATCH_KINDS if k in m]
        if len(kinds) != 1:
            got = f", got {', '.join(kinds)}" if kinds else ""
            r.error(v, f"expected exactly one of {', '.join(MATCH_KINDS)}{got}")
            return None
        kind = kinds[0]
        invert = r.boolean(m["invert"]) if "invert" in m else False
        value = r.boolean(m[kind]) if kind == "present" else r.text(m[kind])
        if isinstance(value, str) and kind == "regex":
            try:
                compile_fullmatch(value)  # RE2, as proxy.routing.snapshot will: linear time or refused
            except RegexError as e:
                r.error(m[kind], f'invalid regex "{value}": {e}')
                return None
        if value is None or invert is None:
            return None
        return StringMatch(kind, value, invert)  # type: ignore[arg-type]  # kind is one of MATCH_KINDS

    def split(self, v: Value) -> tuple[tuple[str, float], ...] | None:
        r = self.r
        entries = r.mapping(v, None)
        if entries is not None and not entries:
            r.error(v, "must name at least one upstream")
        if not entries:
            return None
        out: list[tuple[str, float]] = []
        for name, wv in entries.items():
            self.known(wv, name)
            weight = r.number(wv, lo=0)
            if weight is not None:
                out.append((name, weight))
        if len(out) < len(entries):
            return None
        total = sum(w for _, w in out)
        if abs(total - 100) > 1e-6:
            r.error(v, f"weights sum to {fmt_number(total)}, expected 100")
            return None
        return tuple(out)

    def sticky(self, v: Value) -> Sticky | None:
        r = self.r
        m = r.mapping(v, ("header", "cookie", "issue"))
        if m is None:
            return None
        keys = [k for k in ("header", "cookie") if k in m]
        if len(keys) != 1:
            r.error(v, 'set exactly one of "header" and "cookie"')
            return None
        key, kv = keys[0], m[keys[0]]
        issue = None
        if "issue" in m:
            if key != "cookie":
                r.error(m["issue"], 'only allowed with "cookie"')
                return None
            issue = self.cookie_issue(m["issue"])
            if issue is None:
                return None
        name = r.string(kv)
        if name is not None and not _TOKEN.fullmatch(name):
            r.error(kv, f'invalid {key} name "{name}"')
        elif name is not None:
            return Sticky(header=name.lower()) if key == "header" else Sticky(cookie=name, issue=issue)
        return None

    def cookie_issue(self, v: Value) -> CookieIssue | None:
        """`issue: {max_age: 30d, secure: true, http_only: true, same_site: lax, path: /, domain: ...}`;
        `issue: true` takes every default."""
        r = self.r
        if isinstance(v.node, ScalarNode) and not v.is_null:
            on = r.boolean(v)
            if on is False:
                r.error(v, "expected true or a mapping of cookie attributes; omit issue to switch it off")
            return CookieIssue() if on else None
        readers: Readers = {
            "max_age": r.duration,
            "secure": r.boolean,
            "http_only": r.boolean,
            "same_site": lambda x: r.convert(x, _same_site, raw=True),
            "path": lambda x: r.convert(x, _cookie_path, raw=True),
            "domain": lambda x: r.convert(x, _cookie_domain, raw=True),
        }
        before = len(r.errors)
        issue = r.record(v, CookieIssue, readers)
        if issue is None or len(r.errors) > before:
            return None
        if issue.max_age < 1:  # Max-Age counts whole seconds; Max-Age=0 deletes the cookie at once
            r.error(r.entries(v)["max_age"], "must be at least 1s (Max-Age=0 would delete the cookie)")
            return None
        if issue.same_site == "none" and not issue.secure:
            m = r.entries(v)
            r.error(m["same_site"], "same_site: none needs secure: true (browsers reject such a cookie)")
            return None
        return issue

    # -- rollout --------------------------------------------------------------------------------

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
