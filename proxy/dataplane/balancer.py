"""Round-robin balancing over one upstream's endpoint pools, skipping ejected endpoints."""

from __future__ import annotations

from proxy.dataplane.pools import EndpointPool


class Balancer:
    """Round-robin over one upstream's endpoints, skipping ejected ones (never all of them)."""

    __slots__ = ("i", "name", "pools")

    def __init__(self, name: str, pools: tuple[EndpointPool, ...]) -> None:
        self.name = name
        self.pools = pools
        self.i = 0

    def pick(self, now: float, exclude: EndpointPool | None = None) -> EndpointPool | None:
        """Next endpoint; ejected endpoints are skipped unless every endpoint is ejected."""
        pools = self.pools
        n = len(pools)
        if n == 1:
            p = pools[0]
            return None if p is exclude else p
        for _ in range(n):
            self.i = (self.i + 1) % n
            p = pools[self.i]
            if p is not exclude and p.ejected_until <= now:
                return p
        # Everything is ejected: panic mode, like Envoy, rather than failing all traffic.
        for p in pools:
            if p is not exclude:
                return p
        return None
