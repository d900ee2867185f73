"""Pure routing: (compiled routes, request view, sticky hash or random) -> route and upstream.

Nothing here touches sockets or clocks; `proxy.dataplane.snapshot` builds the matchers and bucket tables once
per snapshot, and the data plane calls :func:`select` once per request.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from bisect import bisect_right
from collections.abc import Callable
from typing import Generic, TypeVar
from urllib.parse import parse_qsl

from proxy.routing.pathnorm import normalize_path

BUCKETS = 10_000
T = TypeVar("T")
# Issued sticky ids: base64url, 128 random bits (22 characters). A cookie value outside these bounds
# or this alphabet is not ours: it is replaced, never hashed as it is.
ID_MIN, ID_MAX = 16, 64
_ID_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def new_sticky_id() -> bytes:
    """A fresh visitor id for an issued sticky cookie: 128 bits from the OS CSPRNG, no meaning."""
    return secrets.token_urlsafe(16).encode("ascii")


def valid_sticky_id(value: bytes) -> bool:
    """Whether a cookie value has the shape of an id we issue (length and alphabet)."""
    return ID_MIN <= len(value) <= ID_MAX and not value.translate(None, _ID_ALPHABET)


def normalise_host(host: bytes | None) -> bytes | None:
    """Host (or :authority) as virtual hosts match it: lower case, without port or trailing dot."""
    if not host:
        return None
    host = host.strip().lower()
    if host[:1] == b"[":
        end = host.find(b"]")
        if end <= 0:
            return host
        try:  # one spelling per address ([0:0::1] is [::1]), as the patterns are normalised
            return b"[" + ipaddress.IPv6Address(host[1:end].decode("ascii")).compressed.encode("ascii") + b"]"
        except (ValueError, UnicodeDecodeError):
            return host[: end + 1]
    colon = host.rfind(b":")
    if colon >= 0:
        host = host[:colon]
    if host[-1:] == b".":
        host = host[:-1]
    return host


class RequestView:
    """What routing may look at. `headers` holds only the names some route or sticky rule needs
    (lower-cased); repeated headers are joined with ", " as Envoy does. `host` is the raw Host (or
    :authority). After :func:`select`, `issued` holds the sticky id it issued for this request, if any."""

    __slots__ = (
        "_cookies", "_host", "_norm", "_query", "headers", "host", "issued", "method", "path", "query_string",
    )  # fmt: skip

    def __init__(
        self,
        method: bytes,
        path: bytes,
        query_string: bytes,
        headers: dict[bytes, bytes],
        host: bytes | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.host = host
        self.issued: bytes | None = None
        self._cookies: dict[bytes, bytes] | None = None
        self._query: dict[bytes, bytes] | None = None
        self._host: bytes | None = None
        self._norm: bytes | None = None

    def vhost(self) -> bytes | None:
        """The normalised host (see :func:`normalise_host`), computed once."""
        h = self._host
        if h is None:
            h = self._host = normalise_host(self.host) or b""
        return h or None

    def normalized_path(self) -> bytes:
        """The path as `path_prefix` sees it (see proxy.routing.pathnorm), computed once."""
        norm = self._norm
        if norm is None:
            norm = self._norm = normalize_path(self.path)
        return norm

    def cookie(self, name: bytes) -> bytes | None:
        """The first cookie called `name`, parsed lazily from the Cookie header."""
        cookies = self._cookies
        if cookies is None:
            cookies = self._cookies = parse_cookies(self.headers.get(b"cookie", b""))
        return cookies.get(name)

    def query_param(self, name: bytes) -> bytes | None:
        """The first query parameter called `name` (percent-decoded)."""
        query = self._query
        if query is None:
            query = self._query = parse_query(self.query_string)
        return query.get(name)


def parse_cookies(header: bytes) -> dict[bytes, bytes]:
    """Parse a Cookie header (`a=1; b=2`); the first occurrence of a name wins."""
    out: dict[bytes, bytes] = {}
    if not header:
        return out
    for part in header.split(b";"):
        name, sep, value = part.partition(b"=")
        if not sep:
            continue
        name = name.strip()
        value = value.strip()
        if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
            value = value[1:-1]
        if name and name not in out:
            out[name] = value
    return out


def parse_query(qs: bytes) -> dict[bytes, bytes]:
    """Parse a query string; the first occurrence of a name wins."""
    out: dict[bytes, bytes] = {}
    if not qs:
        return out
    # latin-1 both ways keeps the percent-decoded bytes exactly as sent (UTF-8 or not).
    for name, value in parse_qsl(qs.decode("latin-1"), keep_blank_values=True, encoding="latin-1"):
        out.setdefault(name.encode("latin-1"), value.encode("latin-1"))
    return out


_bucket_cache: dict[bytes, int] = {}
_BUCKET_CACHE_MAX = 65_536


def sticky_bucket(key: bytes) -> int:
    """Stable bucket in [0, 10000) for a stickiness key, the same in every process and release."""
    bucket = _bucket_cache.get(key)
    if bucket is None:
        bucket = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % BUCKETS
        if len(_bucket_cache) >= _BUCKET_CACHE_MAX:
            _bucket_cache.clear()  # bounded memory; a miss only costs one hash
        _bucket_cache[key] = bucket
    return bucket


Predicate = Callable[[RequestView], bool]


class SplitTable(Generic[T]):
    """Cumulative bucket layout of one split, in config order.

    Entry i owns buckets [uppers[i-1], uppers[i]). Because the order never changes, raising one
    entry's share only moves the boundary: users move towards the growing entry, never back.
    """

    __slots__ = ("targets", "uppers")

    def __init__(self, weights: tuple[tuple[T, float], ...]) -> None:
        uppers: list[int] = []
        targets: list[T] = []
        acc = 0.0
        for target, weight in weights:
            acc += weight
            upper = min(BUCKETS, round(acc * BUCKETS / 100))
            if uppers and upper <= uppers[-1]:
                continue  # zero-width: nobody lands here
            if not uppers and upper <= 0:
                continue
            uppers.append(upper)
            targets.append(target)
        if targets and uppers[-1] < BUCKETS:
            uppers[-1] = BUCKETS  # float dust: the last live entry takes the remainder
        self.uppers = tuple(uppers)
        self.targets = tuple(targets)

    def pick(self, bucket: int) -> T | None:
        """The target owning `bucket`, or None if every weight is zero."""
        i = bisect_right(self.uppers, bucket)
        return self.targets[i] if i < len(self.targets) else None


class RouteRule(Generic[T]):
    """One compiled route: a predicate (None = matches all) and either a target or a split."""

    __slots__ = ("index", "issue", "mirror", "name", "predicate", "sticky_cookie", "sticky_header", "table", "target")

    def __init__(
        self,
        index: int,
        name: str,
        predicate: Predicate | None,
        target: T | None,
        table: SplitTable[T] | None,
        sticky_header: bytes | None = None,
        sticky_cookie: bytes | None = None,
        issue: bytes | None = None,
        mirror: object = None,
    ) -> None:
        self.index = index
        self.name = name
        self.predicate = predicate
        self.target = target
        self.table = table
        self.sticky_header = sticky_header
        self.sticky_cookie = sticky_cookie
        # Issued sticky cookie: the Set-Cookie attributes after the value ("; Path=/; Max-Age=...").
        self.issue = issue
        self.mirror = mirror  # the data plane's compiled mirror rule (proxy.dataplane.mirror), or None


def select(
    rules: tuple[RouteRule[T], ...],
    view: RequestView,
    rng: Callable[[], float],
    new_id: Callable[[], bytes] = new_sticky_id,
) -> tuple[RouteRule[T], T | None] | None:
    """First rule whose predicate holds, and its upstream target.

    `rng` (like random.random) supplies the bucket when a split has no sticky key on this request.
    A rule that issues its sticky cookie replaces a missing or malformed value with `new_id()` (kept in
    `view.issued`) and routes by that id's bucket, so the first response already decides the side.
    Returns None when no rule matches; the target is None when a split has no live entry.
    """
    for rule in rules:
        pred = rule.predicate
        if pred is not None and not pred(view):
            continue
        table = rule.table
        if table is None:
            return rule, rule.target
        key: bytes | None = None
        if rule.sticky_header is not None:
            key = view.headers.get(rule.sticky_header)
        elif rule.sticky_cookie is not None:
            key = view.cookie(rule.sticky_cookie)
            if rule.issue is not None and (key is None or not valid_sticky_id(key)):
                key = view.issued = new_id()
        bucket = sticky_bucket(key) if key else int(rng() * BUCKETS)
        return rule, table.pick(bucket)
    return None
