"""Errors of fleet mode, and which Redis failures mean "unreachable"."""

from __future__ import annotations

from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Redis is down or unreachable (as opposed to answering with an error).
DOWN = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError, TimeoutError)


class FleetUnavailable(Exception):
    """A fleet-wide command that needs Redis while it is unreachable (the admin API answers 503)."""
