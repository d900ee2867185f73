"""Who caused a failure: the upstream, or this proxy (its descriptors, memory, buffers, shutdown).

Only upstream-caused failures (refused, reset, timeout, a bad response, a 5xx) may count against an
upstream: outlier ejection, fast-fail and the rollout analysis. A failure of our own (EMFILE on
connect, ENOMEM, ENOBUFS...) says nothing about the canary, so it is counted under
`canary_proxy_local_errors_total{kind}`, logged once per burst with its cause and answered 503.

The descriptor budget keeps us from getting there: at start the soft RLIMIT_NOFILE is raised to the
hard limit when it cannot hold `max_connections`, and new client connections are refused while the
descriptors left could not also carry their upstream connections.
"""

from __future__ import annotations

import errno
import logging
import resource
import time

log = logging.getLogger("canary_proxy.faults")

LOCAL_KINDS = ("descriptors", "memory", "buffers", "ports", "shutdown")
_ERRNO_KINDS = {
    errno.EMFILE: "descriptors",
    errno.ENFILE: "descriptors",
    errno.ENOMEM: "memory",
    errno.ENOBUFS: "buffers",
    errno.EADDRNOTAVAIL: "ports",  # no local ephemeral port left
}
BASE_RESERVE = 32  # listeners, logs, inotify, the event loop, imports: the process' own descriptors
BURST_QUIET = 10.0  # seconds without a local error that end a burst (one log line per burst)


def local_kind(exc: BaseException) -> str | None:
    """The LOCAL_KINDS entry when `exc` is this proxy's own fault, else None (the upstream's)."""
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_KINDS.get(exc.errno)
    return None


class LocalErrors:
    """Counts local failures and logs the first of each burst (with its cause)."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts  # Stats.local_errors: merged across workers, shown on /metrics
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def record(self, kind: str, where: str, cause: str) -> None:
        """Count one local failure; log it unless a burst of this kind and place is already logged.
        `where`: "accept" (a new client refused), "connect" (an upstream connect), "shutdown"."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = time.monotonic()
        key = (kind, where)
        last = self._last.get(key)
        self._last[key] = now
        if last is not None and now - last < BURST_QUIET:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        before = self._suppressed.pop(key, 0)
        more = f" ({before} more in the previous burst)" if before else ""
        log.error(
            "local resource failure (%s at %s): %s; answered 503, not counted against the upstream%s",
            kind,
            where,
            cause,
            more,
        )


def descriptor_budget(max_connections: int, admin_connections: int) -> int:
    """How many client connections the descriptor limit can carry (each needs two descriptors:
    the client's and its upstream connection). Raises the soft limit to the hard one when that is
    needed, and warns clearly when even that is not enough."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * max_connections + BASE_RESERVE + admin_connections
    target = need if hard == resource.RLIM_INFINITY else min(hard, need)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("raised the soft descriptor limit (RLIMIT_NOFILE) from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise RLIMIT_NOFILE from %d: %s", soft, exc)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    clients = max((soft - BASE_RESERVE - min(admin_connections, soft // 8)) // 2, 1)
    if clients < max_connections:
        log.warning(
            "descriptor limit too low: RLIMIT_NOFILE is %d (hard %s) but limits.max_connections %d needs"
            " about %d (two per active request, plus pools, admin and logs); new client connections"
            " beyond %d are refused with 503. Raise it (ulimit -n, systemd LimitNOFILE=, docker"
            " --ulimit nofile=) or lower limits.max_connections",
            soft,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
            max_connections,
            need,
            clients,
        )
    return min(clients, max_connections)
