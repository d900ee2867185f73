"""What keeps the admin listener safe to expose and unable to starve the data plane.

- Exposure: a non-loopback admin listener without a token is refused unless `admin_insecure: true`
  (then a warning at every start): promote/rollback/reset/reload would be open to the network.
- Browsers (DNS rebinding, CSRF): a POST's `Host` must be the listener's own address, a loopback
  name, an IP literal or one of `admin_hosts`; a cross-site `Origin`, or a cross-site `Referer`
  without `Origin`, is refused. An attacker's DNS name pointing at us never passes.
- Resources: the listener has its own connection cap (`admin_max_connections`, its descriptor
  budget, reserved out of the data plane's) and a header timeout (`admin_header_timeout`): a
  request head must arrive within it after connecting or after the previous head, so slowloris
  connections are closed and never pile up.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

from proxy.config.model import Config

log = logging.getLogger("canary_proxy.admin")

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for loopback addresses and names (the wildcard "" / 0.0.0.0 / :: is not)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(config: Config) -> str | None:
    """Why this config must not start (an open admin listener), or None."""
    host = config.admin.host
    if is_loopback(host) or config.admin_token or config.admin_insecure:
        return None
    return (
        f"admin: {config.admin} is reachable beyond this host but no admin token is set; set"
        " admin_token, admin_token_file or CANARY_PROXY_ADMIN_TOKEN (or admin_insecure: true to"
        " accept that anyone who reaches it can promote, roll back and reload)"
    )


def warn_if_insecure(config: Config) -> None:
    """The warning `admin_insecure: true` earns at every start."""
    if config.admin_insecure and not config.admin_token and not is_loopback(config.admin.host):
        log.warning(
            "admin listener %s has no token and admin_insecure is true: anyone who reaches it can"
            " promote, roll back, reset and reload",
            config.admin,
        )


def _hostname(netloc: str) -> str:
    """The host part of a `Host` header or URL netloc, lower-cased, without port or brackets."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1 : netloc.find("]")] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def host_allowed(host_header: str | None, config: Config) -> bool:
    """Whether a request's Host names this admin listener (not a name an attacker controls)."""
    if host_header is None:
        return True  # HTTP/1.0 tools; every browser sends Host
    name = _hostname(host_header).rstrip(".")
    if not name:
        return False
    if name in config.admin_hosts or name == config.admin.host.lower() or is_loopback(name):
        return True
    try:
        ipaddress.ip_address(name)  # an IP literal cannot be rebound to another origin
    except ValueError:
        return False
    return True


def cross_site(origin: str | None, referer: str | None, host_header: str | None) -> str | None:
    """Why a POST looks cross-site (Origin, else Referer, differs from Host), or None."""
    host = (host_header or "").strip().lower()
    if origin is not None:
        if origin == "null" or urlsplit(origin).netloc.lower() != host:
            return "cross-origin POST refused"
        return None
    if referer is not None and urlsplit(referer).netloc.lower() != host:
        return "cross-site Referer without Origin refused"
    return None


class GuardedProtocol(asyncio.Protocol):
    """Wraps one aiohttp connection: counts it against the cap and enforces the header timeout."""

    def __init__(self, inner: asyncio.Protocol, listener: GuardedListener) -> None:
        self.inner = inner
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self._tail = b""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        listener = self.listener
        listener.open.add(self)
        if len(listener.open) > listener.max_connections:
            listener.refused += 1
            transport.abort()  # over the admin budget: no descriptor taken for long
            return
        self.transport = transport  # from here on the aiohttp protocol owns the connection
        self._arm()
        self.inner.connection_made(transport)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.listener.header_timeout, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.listener.timed_out += 1
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        # A complete request head restarts the clock for the next one (keep-alive included).
        buf = self._tail + data
        if b"\r\n\r\n" in buf or b"\n\n" in buf:
            self._arm()
        self._tail = buf[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.open.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport = None
            self.inner.connection_lost(exc)


class GuardedListener:
    """The admin socket: aiohttp's protocol factory behind a connection cap and header timeout."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], max_connections: int, header_timeout: float) -> None:
        self.factory = factory
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.open: set[GuardedProtocol] = set()
        self.refused = 0
        self.timed_out = 0
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port (port 0: any free port)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: GuardedProtocol(self.factory(), self), host or None, port, backlog=128
        )

    @property
    def bound_port(self) -> int:
        """The port actually bound."""
        assert self.server is not None and self.server.sockets
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        """Stop listening and drop every open admin connection."""
        server, self.server = self.server, None
        if server is not None:
            server.close()
        for proto in list(self.open):
            if proto.transport is not None:
                proto.transport.abort()
        if server is not None:
            await server.wait_closed()
