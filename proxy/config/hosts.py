"""Virtual-host patterns (`match.host`): validation at load, and the static checks `validate` warns with.

A pattern is a host name (`shop.example.com`), an IP literal (`10.0.0.1`, `[::1]`), or a leading
wildcard `*.shop.example.com`, which matches every subdomain (`a.shop.example.com`,
`a.b.shop.example.com`) but not the apex `shop.example.com`, as in Envoy and nginx. Names are
compared case-insensitively, without a port and without a trailing dot; the run-time side of this
is :func:`proxy.router.normalise_host`.
"""

from __future__ import annotations

import ipaddress
import re

from proxy.config.model import Match, Route

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def parse_host_pattern(text: str) -> str:
    """The normalised pattern (lower case, no trailing dot), or ValueError saying what is wrong."""
    raw = text
    text = text.strip().lower()
    if not text:
        raise ValueError("host pattern must not be empty")
    if text == "*":
        raise ValueError('"*" matches every host: omit match.host instead')
    if text.startswith("[") and text.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(text[1:-1]).compressed}]"  # as normalise_host spells it
        except ValueError:
            raise ValueError(f'invalid IPv6 literal "{raw}"') from None
    if text.startswith("["):
        raise ValueError(f'invalid IPv6 literal "{raw}" (write it as [::1], without a port)')
    if ":" in text:
        raise ValueError(f'invalid host "{raw}": no port here (the port is ignored when matching)')
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    if name.endswith("."):
        name = name[:-1]
    if "*" in name:
        raise ValueError(f'invalid host "{raw}": only a leading "*." wildcard is allowed')
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f'invalid host name "{raw}" (letters, digits, "-" and "." only, as in DNS)')
    if not wildcard and labels[-1].isdigit():
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            raise ValueError(f'invalid host "{raw}": neither a name nor an IPv4 address') from None
    return ("*." if wildcard else "") + name


def pattern_covers(outer: str, inner: str) -> bool:
    """Whether every host matched by pattern `inner` is also matched by pattern `outer`."""
    if outer == inner:
        return True
    if not outer.startswith("*."):
        return False
    suffix = outer[1:]  # ".example.com"
    return inner.endswith(suffix) and len(inner) > len(suffix)


def _hosts_cover(outer: tuple[str, ...], inner: tuple[str, ...]) -> bool:
    if not outer:
        return True  # no host rule: every host
    if not inner:
        return False
    return all(any(pattern_covers(o, i) for o in outer) for i in inner)


def _rest_covers(a: Match, b: Match) -> bool:
    """Whether `a`'s non-host conditions hold for every request that satisfies `b`'s: each of `a`'s
    conditions appears in `b` (or is implied by it: a shorter path prefix, a wider method set)."""
    if not set(a.headers) <= set(b.headers) or not set(a.cookies) <= set(b.cookies):
        return False
    if not set(a.query) <= set(b.query):
        return False
    if a.path_prefix is not None and (b.path_prefix is None or not b.path_prefix.startswith(a.path_prefix)):
        return False
    return not a.methods or (bool(b.methods) and set(b.methods) <= set(a.methods))


def shadowed_routes(routes: tuple[Route, ...]) -> list[str]:
    """Warnings for routes that can never match because an earlier route takes all their requests.

    Only host rules are considered as the cause (match.host); a route is reported when an earlier
    route's hosts include all of its hosts and the earlier route's other conditions are a subset of
    its own. Sound but not complete: a warning always means a dead route."""
    out: list[str] = []
    for j, later in enumerate(routes):
        if later.match is None:
            continue
        for i, earlier in enumerate(routes[:j]):
            m = earlier.match
            if m is None or not m.hosts:
                continue
            if _hosts_cover(m.hosts, later.match.hosts) and _rest_covers(m, later.match):
                out.append(
                    f'routes[{j}] ("{later.name}"): can never match: routes[{i}] ("{earlier.name}") comes first'
                    f" and takes every request it would (hosts {', '.join(m.hosts)})"
                )
                break
    return out
