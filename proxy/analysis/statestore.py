"""Where one rollout's state is kept: its state file, written until the write sticks.

A latch that only lives in memory is lost by the next restart, so a failed write (full or
read-only disk) is kept pending and retried on every controller tick until it succeeds; meanwhile
/status, a metric and a log line say the latch is not durable yet. A state file that exists but
cannot be used is never taken for "no file": the rollout starts held (`unknown_state`, canary
weight 0) and the bad file is renamed aside for the operator, never silently overwritten.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from proxy.analysis.rollout import RolloutState
from proxy.analysis.statefile import read_state, save_state
from proxy.analysis.statefile import set_aside as move_aside

log = logging.getLogger("canary_proxy.rollout")
REMIND_EVERY = 60.0  # seconds between repeated "still not durable" log lines


def held_state(canary: str, version: str | None, now: float, reason: str) -> RolloutState:
    """The state of a rollout whose saved state is unknown: the canary gets nothing until reset."""
    return RolloutState("unknown_state", canary, version, 0, now, now, reason=reason)


class DurableStateFile:
    """The state file of one rollout (`path` None: memory only, every save trivially durable)."""

    def __init__(self, path: str | None, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._pending: RolloutState | None = None  # written to memory, not yet to disk
        self.error: str | None = None
        self.failing_since: float | None = None
        self.failures = 0  # failed writes, cumulative (the metric)
        self._reminded_at = 0.0

    @property
    def durable(self) -> bool:
        """True when the file holds the latest state (always without a file)."""
        return self._pending is None

    def load(self, canary: str, version: str | None, *, set_aside: bool = True) -> RolloutState | None:
        """The saved state; None without a file; a held state when the file is unusable (which
        is then renamed aside, unless `set_aside` is False: a dry run)."""
        if not self.path:
            return None
        state, problem = read_state(self.path)
        if problem is None:
            return state
        now = self._clock()
        if not set_aside:
            return held_state(canary, version, now, f"state file {self.path} unusable ({problem})")
        aside = move_aside(self.path, now)
        where = f"moved to {aside}" if aside else "left in place"
        reason = f"state file {self.path} unusable ({problem}; {where})"
        log.error("%s: rollout of %s held at canary weight 0 until reset or a new version", reason, canary)
        return held_state(canary, version, now, reason)

    def save(self, state: RolloutState) -> bool:
        """Write `state`; on failure keep it pending for `retry`. True when it is on disk."""
        if not self.path:
            return True
        self._pending = state
        return self.retry()

    def retry(self) -> bool:
        """Write the pending state, if any (called every tick). True when nothing is pending."""
        state, path = self._pending, self.path
        if state is None or not path:
            return True
        now = self._clock()
        try:
            save_state(path, state)
        except Exception as exc:  # OSError mostly; whatever it is, the latch must stay pending
            self.failures += 1
            self.error = f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"
            if self.failing_since is None or now - self._reminded_at >= REMIND_EVERY:
                log.error(
                    "rollout state (%s) not durable yet: writing %s failed (%s); retrying every tick",
                    state.phase,
                    path,
                    self.error,
                )
                self._reminded_at = now
            if self.failing_since is None:
                self.failing_since = now
            return False
        if self.failing_since is not None:
            log.warning(
                "rollout state (%s) durable again: %s written after %.0fs of failures",
                state.phase,
                path,
                now - self.failing_since,
            )
        self._pending = None
        self.error = None
        self.failing_since = None
        return True

    def status(self) -> dict[str, Any]:
        """What /status shows about the state file."""
        return {
            "path": self.path,
            "durable": self.durable,
            "error": self.error,
            "failing_since": self.failing_since,
            "write_failures": self.failures,
        }
