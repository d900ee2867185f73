"""The seams between the data plane and its legs, written down once.

A leg adapts one protocol's transport and parser callbacks to the data plane; these interfaces say
what each side may use of the other. They name no wire format: an HTTP/2 or TLS leg implements the
same methods. Only this module is imported by both legs, so the legs never import each other's
internals (and never form an import cycle).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.config.model import Timeouts

# The application protocols the client legs can speak, in preference order. The TLS listener
# offers `tls.alpn` intersected with this, so a protocol is never advertised before a leg speaks it.
# HTTP/2 goes to legs/h2_client.py (see http1_client's hand-off on ALPN "h2").
ALPN_SUPPORTED: tuple[str, ...] = ("h2", "http/1.1")

# Why client reading is paused (bitmask): waiting for a pipelined turn, upstream write buffer full,
# or waiting for an upstream connection; after an Upgrade request, until the upstream's answer.
P_PIPELINE, P_UPLOAD, P_CONNECT = 1, 2, 4
P_TUNNEL = 8


class UpstreamLeg(Protocol):
    """One connection to an endpoint, as pools and the client side see it."""

    transport: asyncio.Transport | None
    client: ClientLeg | None  # the exchange it serves, None while idle
    deadline: float  # monotonic; 0 = none
    reused: bool  # taken from the idle pool at least once
    started: bool  # response head passed on to the client
    tunnel: bool
    until_close: bool  # response framed by connection close

    def released(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class ClientLeg(Protocol):
    """What an upstream leg reports to the client side of the exchange it serves."""

    timeouts: Timeouts
    peer: bytes  # the connection's address (X-Forwarded-For)
    transport: asyncio.Transport | None  # its write buffer bounds how much the upstream leg reads
    max_headers: int  # the client's header limits apply to the response head too
    max_header_size: int

    def pause_reading_for(self, reason: int) -> None: ...

    def resume_reading_for(self, reason: int) -> None: ...

    def tunnel_write(self, data: bytes) -> None: ...

    def up_write(self, t: asyncio.Transport, data: bytes) -> None: ...

    def flush_later(self, read_size: int) -> None: ...

    def upstream_lost(self, conn: UpstreamLeg, exc: Exception | None, transport: object) -> None: ...

    def upstream_protocol_error(self, conn: UpstreamLeg, why: str) -> None: ...

    def response_interim(self, status: int, reason: bytes, lines: list[bytes]) -> None: ...

    def response_head(self, conn: UpstreamLeg, status: int) -> None: ...

    def response_body(self, body: bytes) -> None: ...

    def response_complete(self, conn: UpstreamLeg, upstream_keep_alive: bool) -> None: ...

    def upstream_timed_out(self, conn: UpstreamLeg) -> None: ...
