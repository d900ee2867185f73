"""The `routes:` section of the config file: routes, matchers, splits, stickiness, mirrors.

:class:`RouteReader` is the part of the loader's parser that reads these keys (each method records
its errors with key path and line, and returns None to keep going); `loader._Parser` builds on it.
"""

from __future__ import annotations

import re

from yaml.nodes import ScalarNode

from proxy.config.hosts import parse_host_pattern
from proxy.config.model import CookieIssue, Match, Mirror, Route, Sticky, StringMatch
from proxy.config.saferegex import RegexError, compile_fullmatch
from proxy.config.units import fmt_number
from proxy.config.yamlnodes import Reader
from proxy.config.yamltree import Readers, Value

ROUTE_KEYS = ("name", "match", "to", "split", "sticky", "max_body_size", "mirror")
MATCH_KEYS = ("headers", "cookies", "query", "path_prefix", "methods", "host")
SAME_SITE = ("strict", "lax", "none")
MATCH_KINDS = ("exact", "prefix", "suffix", "contains", "regex", "present")
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: header, cookie, method names
_EMPTY_MATCH = "match must not be empty; omit it to match everything"

_COOKIE_OCTETS = re.compile(r"[\x21-\x3a\x3c-\x7e]+")  # no controls, spaces or ";" (RFC 6265 av-octets)


def _same_site(text: str) -> str:
    value = text.strip().lower()
    if value not in SAME_SITE:
        raise ValueError(f'invalid same_site "{text}" (expected strict, lax or none)')
    return value


def _cookie_path(text: str) -> str:
    if not text.startswith("/") or not _COOKIE_OCTETS.fullmatch(text):
        raise ValueError(f'invalid cookie path "{text}" (must start with "/", no spaces or ";")')
    return text


def _cookie_domain(text: str) -> str:
    host = parse_host_pattern(text.lstrip("."))
    if host.startswith("*") or host.startswith("["):
        raise ValueError(f'invalid cookie domain "{text}"')
    return host


class RouteReader:
    """Reads `routes[]` (the loader's parser provides the reader and the known upstream names)."""

    r: Reader
    upstream_names: list[str] | None
    baselines: dict[str, str]  # baseline upstream -> rollout name
    h2_upstreams: set[str]  # upstreams with `protocol: h2`

    def known(self, v: Value, name: str | None) -> str | None:
        raise NotImplementedError

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
        if mirror.to in self.h2_upstreams:  # the mirror sender speaks HTTP/1.1
            r.error(r.entries(v)["to"], f'mirroring to "{mirror.to}" (protocol: h2) is not supported')
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
            if method is not None and not TOKEN.fullmatch(method):
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
            if not name or (what != "query parameter" and not TOKEN.fullmatch(name)):
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
                compile_fullmatch(value)  # RE2, as proxy.dataplane.snapshot will: linear time or refused
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
        if name is not None and not TOKEN.fullmatch(name):
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
