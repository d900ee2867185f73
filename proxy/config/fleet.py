"""The `fleet:` section: Redis URL, namespace, replica name and leader lease, validated at load.

URL forms accepted (checked here, connected to in `proxy.control.fleet.connection`):
- `redis://[[user]:password@]host[:port][/db]` and `rediss://...` (TLS);
- `redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]` (Redis Sentinel:
  the sentinels are asked for the current master of `service`; `rediss+sentinel://` for TLS).
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from proxy.config.model import Fleet
from proxy.config.yamlnodes import Reader
from proxy.config.yamltree import Value

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")
MIN_LEASE = 0.5
MAX_LEASE = 300.0


class RedisTarget(NamedTuple):
    """A parsed fleet URL."""

    scheme: str  # one of SCHEMES
    hosts: tuple[tuple[str, int], ...]  # one for redis(s)://, the sentinels otherwise
    db: int
    username: str | None
    password: str | None
    service: str | None  # sentinel master name

    @property
    def sentinel(self) -> bool:
        return self.scheme.endswith("+sentinel")

    @property
    def tls(self) -> bool:
        return self.scheme.startswith("rediss")


def parse_redis_url(url: str) -> RedisTarget:
    """Split and check a fleet URL; raises ValueError with a readable message."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f'unsupported URL "{redact(url)}" (use redis://, rediss:// or redis+sentinel://)')
    if parts.query or parts.fragment:
        raise ValueError(f'URL "{redact(url)}" must not have a query or fragment')
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    sentinel = scheme.endswith("+sentinel")
    default_port = 26379 if sentinel else 6379
    raw_hosts = hostlist.split(",") if hostlist else []
    if not raw_hosts or (len(raw_hosts) > 1 and not sentinel):
        raise ValueError(f'URL "{redact(url)}" must name {"sentinel hosts" if sentinel else "one host"}')
    hosts = tuple(_host_port(h, default_port) for h in raw_hosts)
    path = [p for p in parts.path.split("/") if p]
    service = None
    if sentinel:
        if not path:
            raise ValueError(f'URL "{redact(url)}" needs the master name: redis+sentinel://host:26379/mymaster/0')
        service, path = unquote(path[0]), path[1:]
    if len(path) > 1:
        raise ValueError(f'URL "{redact(url)}" has a bad path (expected /db)')
    db = 0
    if path:
        if not path[0].isdigit() or int(path[0]) > 1_000_000:
            raise ValueError(f'URL "{redact(url)}": database must be a number, got "{path[0]}"')
        db = int(path[0])
    return RedisTarget(scheme, hosts, db, username, password, service)


def _host_port(text: str, default: int) -> tuple[str, int]:
    host, port = text, default
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f'bad host "{text}"')
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f'bad host "{text}"')
            port = _port(rest[1:], text)
    elif ":" in text:
        host, _, p = text.rpartition(":")
        port = _port(p, text)
    if not host:
        raise ValueError(f'missing host in "{text}"')
    return host, port


def _port(p: str, text: str) -> int:
    if not p.isdigit() or not 1 <= int(p) <= 65535:
        raise ValueError(f'bad port in "{text}" (1..65535)')
    return int(p)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url.strip())
    if "@" not in parts.netloc:
        return url
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{hosts}" if ":" in userinfo else f"{user}@{hosts}").geturl()




def _name(text: str) -> str:
    if not _NAME.fullmatch(text):
        raise ValueError(f'invalid name "{text}" (1-100 of letters, digits, ".", "_", "-")')
    return text


def read_fleet(r: Reader, v: Value) -> Fleet | None:
    """The `fleet:` mapping -> Fleet, errors recorded with their key paths (`fleet.redis: ...`)."""

    def url(x: Value) -> str | None:
        text = r.string(x)
        if text is None:
            return None
        try:
            parse_redis_url(text)
        except ValueError as e:
            r.error(x, str(e))
            return None
        return text.strip()

    def lease(x: Value) -> float | None:
        d = r.duration(x)
        if d is not None and not MIN_LEASE <= d <= MAX_LEASE:
            r.error(x, f"must be between {MIN_LEASE:g}s and {MAX_LEASE:g}s")
            return None
        return d

    return r.record(
        v,
        Fleet,
        {
            "redis": url,
            "namespace": lambda x: r.convert(x, _name, raw=True),
            "replica": lambda x: r.convert(x, _name, raw=True),
            "lease": lease,
        },
        required=("redis", "namespace"),
    )
