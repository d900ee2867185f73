"""Readers of the HTTP/2 and gRPC keys: `upstreams.NAME.protocol` and `rollout.grpc_error_statuses`."""

from __future__ import annotations

from typing import Literal

from proxy.config.grpc_codes import NAMES, parse_code
from proxy.config.yamlnodes import Reader
from proxy.config.yamltree import Value

PROTOCOLS = ("http1", "h2")


def upstream_protocol(r: Reader, v: Value) -> Literal["http1", "h2"]:
    """`protocol: http1 | h2` (an invalid value is an error at its key; http1 stands in)."""
    text = r.string(v)
    if text == "h2":
        return "h2"
    if text is not None and text != "http1":
        r.error(v, f'expected one of {", ".join(PROTOCOLS)}, got "{text}"')
    return "http1"


def grpc_error_statuses(r: Reader, v: Value) -> tuple[str, ...] | None:
    """A non-empty list of gRPC codes by name (any case) or number, as canonical names."""
    codes = r.list_of(v, parse_code, empty="must list at least one gRPC status")
    if codes is None:
        return None
    return tuple(NAMES[c] for c in dict.fromkeys(codes))  # dropping repeats
