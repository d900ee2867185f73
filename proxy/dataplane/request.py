"""Per-request state shared by the client and upstream legs."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.analysis.stats import UpstreamStats
    from proxy.dataplane.mirror_rule import MirrorJob
    from proxy.dataplane.pools import EndpointPool
    from proxy.dataplane.snapshot import Binding, Snapshot

# Response body framing towards the client.
F_NONE, F_LENGTH, F_CHUNKED, F_CLOSE = range(4)


class Request:
    """One client request, from its first byte to the end of its response."""

    __slots__ = (
        "attempts",
        "binding",
        "body",
        "body_bytes",
        "body_forwarded",
        "clen",
        "complete",
        "conn_tokens",
        "connecting",
        "discard",
        "error",
        "expect",
        "failed",
        "framing",
        "grpc_status",
        "head",
        "host",
        "hsize",
        "keep_alive",
        "lines",
        "max_body",
        "method",
        "mirror",
        "nheaders",
        "path",
        "peer",
        "pool",
        "query",
        "reqid",
        "retries",
        "rhdrs",
        "route",
        "sent",
        "set_cookie",
        "snapshot",
        "status",
        "t0",
        "target",
        "te",
        "track",
        "track_key",
        "trailer",
        "trailers",
        "try_timeout",
        "upgrade",
        "version10",
        "via",
        "wants_upgrade",
        "xff",
        "xfhost",
        "xfproto",
    )

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.method = b""
        self.target = b""
        self.path = b""
        self.peer = b""
        self.query = b""
        self.version10 = False
        self.keep_alive = True
        self.lines: list[bytes] = []
        self.conn_tokens: list[bytes] | None = None
        self.host: bytes | None = None
        self.xff: bytes | None = None
        self.xfproto: bytes | None = None
        self.xfhost: bytes | None = None
        self.via: bytes | None = None
        self.reqid: bytes | None = None
        self.expect = False
        self.upgrade: bytes | None = None  # what we forward (h2c removed); None: a plain request
        self.wants_upgrade = False  # the client sent an Upgrade header
        self.trailer: bytes | None = None  # the `Trailer` header (forwarded only with a chunked body)
        self.trailers: list[bytes] | None = None  # trailer lines after a chunked body
        self.discard = False  # answered before its body arrived: the rest is read and dropped
        self.te: bytes | None = None
        self.clen = -1
        self.rhdrs: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.body_forwarded = False
        self.complete = False
        self.error = 0
        self.failed = False  # an upstream failure was already recorded for analysis
        self.t0 = 0.0
        self.binding: Binding | None = None
        self.route = ""
        self.head = b""
        self.status = 0
        self.sent = 0
        self.framing = F_NONE
        self.attempts = 0  # times the request was written to an upstream connection
        self.retries = 0
        self.pool: EndpointPool | None = None
        self.connecting: asyncio.Task[None] | None = None  # opening an upstream connection for it
        self.hsize = 0
        self.nheaders = 0
        self.max_body: int | None = None
        self.mirror: MirrorJob | None = None  # a copy for the route's mirror, until it is sent
        self.set_cookie: bytes | None = None  # an issued sticky cookie: the Set-Cookie value
        self.track: UpstreamStats | None = None  # the upstream counting this try as outstanding
        self.track_key = 0
        self.try_timeout = 0.0  # this try's response timeout when shorter than timeouts.response
        self.grpc_status = -1  # the upstream's grpc-status (HTTP/2 upstreams), -1: none
