"""A route's mirror as compiled into a snapshot, and the copy of one request on its way there.

Kept apart from :mod:`proxy.dataplane.mirror` (which sends the copies) so that the request and the
snapshot can name these types without importing the sender.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.analysis.stats import MirrorStats, UpstreamStats
    from proxy.config.model import Endpoint


class MirrorRule:
    """One route's mirror, compiled per snapshot (see :func:`proxy.dataplane.snapshot.compile_snapshot`)."""

    __slots__ = (
        "connect_timeout",
        "endpoints",
        "evidence",
        "i",
        "is_error",
        "max_body",
        "percent",
        "route",
        "stats",
        "timeout",
        "upstream",
    )

    def __init__(
        self,
        route: str,
        upstream: str,
        endpoints: tuple[Endpoint, ...],
        percent: float,
        max_body: int,
        stats: MirrorStats,
        evidence: UpstreamStats | None,
        is_error: tuple[bool, ...],
        connect_timeout: float,
        timeout: float,
    ) -> None:
        self.route = route
        self.upstream = upstream
        self.endpoints = endpoints
        self.percent = percent
        self.max_body = max_body
        self.stats = stats
        self.evidence = evidence  # analyze: true -> the upstream's analysis window
        self.is_error = is_error
        self.connect_timeout = connect_timeout
        self.timeout = timeout  # the whole exchange after connecting (timeouts.response)
        self.i = 0

    def pick(self) -> Endpoint:
        """Round-robin over the mirror upstream's endpoints."""
        self.i = (self.i + 1) % len(self.endpoints)
        return self.endpoints[self.i]


class MirrorJob:
    """The copy of one request while its body is still arriving."""

    __slots__ = ("chunks", "rule", "size")

    def __init__(self, rule: MirrorRule) -> None:
        self.rule = rule
        self.chunks: list[bytes] = []
        self.size = 0
