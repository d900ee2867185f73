"""The Redis client of one replica: built from the fleet URL, reconnected with backoff.

Only connection state changes are logged (one line when it goes down, one when it is back), never
every failed attempt. Commands time out after a second, so a hung Redis cannot stall the loop.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from proxy.config.fleet import parse_redis_url, redact

log = logging.getLogger("canary_proxy.fleet")

COMMAND_TIMEOUT = 1.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 2.0  # an attempt every 2 s costs nothing; a trip waits at most this once Redis is back


def make_client(url: str) -> Redis:
    """A redis.asyncio client for a validated fleet URL (Sentinel: the current master)."""
    target = parse_redis_url(url)
    common: dict[str, Any] = {
        "socket_timeout": COMMAND_TIMEOUT,
        "socket_connect_timeout": COMMAND_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),  # our loop retries, with its own backoff
        "decode_responses": True,
        "username": target.username,
        "password": target.password,
    }
    if target.sentinel:
        sentinel_kwargs = {k: common[k] for k in ("socket_timeout", "socket_connect_timeout")}
        if target.tls:
            sentinel_kwargs["ssl"] = True
        sentinel = Sentinel(list(target.hosts), sentinel_kwargs=sentinel_kwargs, **common)  # type: ignore[no-untyped-call]
        assert target.service is not None  # validated: the URL names the master
        client: Redis = sentinel.master_for(target.service, db=target.db, ssl=target.tls)
        return client
    host, port = target.hosts[0]
    return Redis(host=host, port=port, db=target.db, ssl=target.tls, **common)


class Backoff:
    """Exponential backoff with jitter: 0.1 s doubling up to 2 s; reset on success."""

    def __init__(self) -> None:
        self.delay = 0.0

    def next(self) -> float:
        """The wait before the next attempt."""
        self.delay = BACKOFF_FIRST if self.delay == 0 else min(self.delay * 2, BACKOFF_MAX)
        return self.delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        """Connected again: the next failure starts from the shortest wait."""
        self.delay = 0.0


class LinkState:
    """Whether Redis answers, logged once per change."""

    def __init__(self, url: str) -> None:
        self.url = redact(url)
        self.connected = False
        self.ever = False  # connected at least once since start
        self.last_error: str | None = None

    def up(self) -> None:
        """A round trip succeeded."""
        if not self.connected:
            log.info("fleet: connected to Redis at %s", self.url)
        self.connected = True
        self.ever = True
        self.last_error = None

    def down(self, error: BaseException) -> None:
        """A round trip failed."""
        text = f"{type(error).__name__}: {error}"
        if self.connected or (not self.ever and self.last_error is None):
            log.warning(
                "fleet: Redis at %s unreachable (%s); keeping the last known state, no step advances",
                self.url,
                text,
            )
        self.connected = False
        self.last_error = text
