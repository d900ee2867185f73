"""Building a replica's fleet membership from the config (nothing at all without `fleet:`)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from proxy.analysis.stats import Stats
from proxy.config.model import Config
from proxy.control.fleet.member import FleetMember

__all__ = ["FleetMember", "default_replica", "make_member"]


def default_replica() -> str:
    """hostname-pid: unique per process on a host, readable in /status."""
    host = socket.gethostname().split(".")[0] or "replica"
    return f"{host}-{os.getpid()}"[:100]


def make_member(
    config: Config, stats: Stats, get_config: Callable[[], Config], *, workers: bool = False
) -> FleetMember | None:
    """The fleet member of this process, or None without a `fleet:` section.

    With `--workers N`, worker 0 (the one with the controller) is the replica's one fleet member;
    its lag is one second longer so the other workers' slices have reached it before it pushes.
    """
    fleet = config.fleet
    if fleet is None:
        return None
    replica = fleet.replica or default_replica()
    return FleetMember(fleet, replica, stats, get_config, lag=2 if workers else 1)
