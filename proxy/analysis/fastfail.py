"""Fast-fail: trip the rollout at once on N consecutive canary errors, without waiting for a window.

The data plane counts consecutive errors per upstream (`UpstreamStats.observe`); this object points
the canary's counter at a callback while, and only while, a trip can still change anything (a
rollout that has not finished, with `fast_fail.consecutive_errors` set). The leader's controller
trips the rollout from the callback; a worker asks the leader to. Both arm through here.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.analysis.rollout import RolloutState, finished
from proxy.analysis.stats import DISARMED, Stats
from proxy.config.model import Rollout


class FastFail:
    """Keeps at most one upstream's trip pointed at one callback."""

    def __init__(self, stats: Stats, on_trip: Callable[[str], None], repeat: bool = False) -> None:
        self._stats = stats
        self._on_trip = on_trip  # gets the reason
        # The leader trips once (observe() calls again for every further error); a worker keeps
        # asking the leader on every further error until the leader's state says it is done.
        self._repeat = repeat
        self._armed: str | None = None  # the upstream whose on_trip points at us

    @property
    def armed(self) -> str | None:
        return self._armed

    def update(
        self, rollout: Rollout | None, buckets: tuple[float, ...], state: RolloutState | None, fresh: bool = False
    ) -> None:
        """Arm for `rollout`'s canary while `state` can still trip, else disarm. `fresh` (a new or
        reset rollout) forgets consecutive errors counted before."""
        if rollout is None or rollout.fast_fail.consecutive_errors <= 0 or (state is not None and finished(state)):
            self.disarm()
            return
        if self._armed is not None and self._armed != rollout.canary:
            self.disarm()
        us = self._stats.upstream(rollout.canary, buckets)
        if fresh:
            us.consecutive_errors = 0
        us.trip_at = rollout.fast_fail.consecutive_errors
        us.on_trip = self._tripped
        self._armed = rollout.canary

    def disarm(self) -> None:
        if self._armed is None:
            return
        us = self._stats.upstreams.get(self._armed)
        if us is not None and us.on_trip == self._tripped:
            us.trip_at = DISARMED
            us.on_trip = None
        self._armed = None

    def reset_count(self, upstream: str) -> None:
        """The count froze while the canary got no traffic; a fresh start must not trip on it."""
        us = self._stats.upstreams.get(upstream)
        if us is not None:
            us.consecutive_errors = 0

    def _tripped(self) -> None:
        """Called by UpstreamStats.observe on the data plane's stack."""
        name = self._armed
        if name is None:
            return
        n = self._stats.upstreams[name].consecutive_errors
        if not self._repeat:
            self.disarm()
        self._on_trip(f"{n} consecutive errors from {name}")
