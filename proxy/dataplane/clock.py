"""The data plane's one clock.

Reading the clock costs a system call's worth of time, so it is read once per socket read (and by
the sweeper); everything set while that read is handled (request start, deadlines, idle expiry)
uses :attr:`Clock.now`, at most one read stale. `monotonic()` has the event loop's origin, so
deadlines and `loop.call_at` agree. Wall-clock stamps for the analysis windows are `now` plus an
offset the sweeper refreshes, not a second clock read per request.
"""

from __future__ import annotations

import time
from time import monotonic


class Clock:
    """Monotonic seconds as of the latest :meth:`read`, and the offset to wall-clock time."""

    __slots__ = ("now", "wall_offset")

    def __init__(self) -> None:
        self.now = monotonic()
        self.wall_offset = time.time() - self.now

    def read(self) -> float:
        """Read the clock now (one call per socket read); returns and keeps it in :attr:`now`."""
        now = self.now = monotonic()
        return now

    def wall(self, t: float) -> float:
        """The wall-clock time (Unix seconds) of monotonic instant `t`."""
        return t + self.wall_offset

    def sync_wall(self) -> None:
        """Refresh the wall-clock offset (the sweeper does, a few times a second)."""
        self.wall_offset = time.time() - monotonic()
