"""The controller's injected seams: where evidence comes from, who may decide, where state is kept.

Single process (and `--workers N`): local windows, always decide, the state file. Fleet mode
(`proxy.fleet`) swaps in fleet-merged windows, a leader gate and a Redis store, so both run the
same pure decisions. Every method takes the rollout, so several named rollouts share one object.
"""

from __future__ import annotations

from typing import Literal, Protocol

from proxy.analysis.evidence import gather
from proxy.analysis.rollout import RolloutEvent, RolloutState, reconcile
from proxy.analysis.statefile import load_state, save_state
from proxy.analysis.verdict import Evidence
from proxy.analysis.window import WindowStats
from proxy.config.model import Rollout
from proxy.stats import Stats

# "decide": judge and act; "watch": judge, but only a breach may act (trip); "follow": do not judge.
Mode = Literal["decide", "watch", "follow"]


class Observations(Protocol):
    """The evidence one verdict is computed on."""

    def window(self, rollout: Rollout, upstream: str, now: float) -> WindowStats:
        """The merged window of `upstream` for `rollout` at `now`."""
        ...

    def evidence(self, rollout: Rollout, state: RolloutState, now: float, mono_now: float) -> Evidence:
        """What one verdict is given: trailing windows of both sides since the canary's evidence
        started, and the canary's outstanding requests (see `proxy.analysis.evidence.gather`)."""
        ...


class DeciderGate(Protocol):
    """Whether this process may change the rollout on its own verdicts now."""

    def mode(self, rollout: Rollout) -> Mode:
        """See `Mode`."""
        ...


class StateStore(Protocol):
    """Where the rollout state lives."""

    def load(self, rollout: Rollout) -> RolloutState | None:
        """The kept state of `rollout` at start (or when a reload adds it); None: none kept."""
        ...

    def resolve(
        self, saved: RolloutState | None, rollout: Rollout, canary_version: str | None, now: float
    ) -> RolloutState:
        """The state to use at start or after a reload, given the previous or loaded one."""
        ...

    def commit(
        self, rollout: Rollout, base: RolloutState, new: RolloutState, events: list[RolloutEvent]
    ) -> bool:
        """A decision changes `base` into `new`. True: apply it locally now; False: the store applies
        it later (e.g. after a fenced write) through `RolloutController.adopt`."""
        ...

    def latch(self, rollout: Rollout, state: RolloutState) -> None:
        """A rollback already applied locally: make it durable; a write that only latches."""
        ...

    def save(self, rollout: Rollout, state: RolloutState) -> None:
        """The state now in force locally (a cache for the next start)."""
        ...


class LocalObservations:
    """This process' own windows (with `--workers`, the leader's windows hold every worker's slices)."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def window(self, rollout: Rollout, upstream: str, now: float) -> WindowStats:
        """The local sliding window of `upstream`."""
        us = self.stats.upstreams.get(upstream)
        if us is None:
            return WindowStats.empty(rollout.window)
        return us.window.stats(now, rollout.window)

    def evidence(self, rollout: Rollout, state: RolloutState, now: float, mono_now: float) -> Evidence:
        """The local trailing windows and the canary's outstanding tries."""
        return gather(self.stats, rollout, state, now, mono_now)


class AlwaysDecide:
    """A single node is its own decider."""

    def mode(self, rollout: Rollout) -> Mode:
        """Always "decide"."""
        return "decide"


class FileStore:
    """The state file of each rollout (`rollout.state_file`), written atomically."""

    def load(self, rollout: Rollout) -> RolloutState | None:
        """The state file's state, if any."""
        return load_state(rollout.state_file) if rollout.state_file else None

    def resolve(
        self, saved: RolloutState | None, rollout: Rollout, canary_version: str | None, now: float
    ) -> RolloutState:
        """Reconcile `saved` with the config (a new canary version starts afresh)."""
        return reconcile(saved, rollout, canary_version, now)

    def commit(
        self, rollout: Rollout, base: RolloutState, new: RolloutState, events: list[RolloutEvent]
    ) -> bool:
        """Apply at once (the controller saves through `save`)."""
        return True

    def latch(self, rollout: Rollout, state: RolloutState) -> None:
        """Saved like any state."""
        self.save(rollout, state)

    def save(self, rollout: Rollout, state: RolloutState) -> None:
        """Write the state file; raises OSError (the controller logs it)."""
        if rollout.state_file:
            save_state(rollout.state_file, state)
