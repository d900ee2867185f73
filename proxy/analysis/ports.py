"""The controller's injected seams: where evidence comes from, who may decide, where state is kept.

Single process (and `--workers N`): local windows, always decide, the state file. Fleet mode
(`proxy.control.fleet`) swaps in fleet-merged windows, a leader gate and a Redis store, so both run the
same pure decisions. Every method takes the rollout, so several named rollouts share one object.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal, Protocol

from proxy.analysis.evidence import gather
from proxy.analysis.rollout import RolloutEvent, RolloutState, reconcile
from proxy.analysis.statestore import DurableStateFile
from proxy.analysis.stats import Stats
from proxy.analysis.verdict import Evidence
from proxy.analysis.window import WindowStats
from proxy.config.model import Rollout

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
    """The state file of each rollout (`rollout.state_file`), written atomically; a failed write is
    retried (`retry`, every tick) and a bad file holds the rollout (see proxy.analysis.statestore)."""

    def __init__(self) -> None:
        self._files: dict[str, DurableStateFile] = {}  # by rollout name

    def _file(self, rollout: Rollout) -> DurableStateFile:
        f = self._files.get(rollout.name)
        if f is None or f.path != rollout.state_file:
            f = self._files[rollout.name] = DurableStateFile(rollout.state_file)
        return f

    def load(self, rollout: Rollout) -> RolloutState | None:
        """The state file's state, if any; a held `unknown_state` when the file is unusable (moved aside)."""
        return self._file(rollout).load(rollout.canary, None)

    def peek(self, rollout: Rollout) -> RolloutState | None:
        """Like `load`, without moving a bad file aside (a reload before its commit)."""
        return DurableStateFile(rollout.state_file).load(rollout.canary, None, set_aside=False)

    def resolve(
        self, saved: RolloutState | None, rollout: Rollout, canary_version: str | None, now: float
    ) -> RolloutState:
        """Reconcile `saved` with the config (a new canary version starts afresh). A held state
        read from a bad file knows no version: it holds the version configured now."""
        if saved is not None and saved.phase == "unknown_state" and saved.canary_version is None:
            saved = replace(saved, canary_version=canary_version)
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
        """Write the state file; a failure stays pending (logged, retried by `retry`)."""
        if rollout.state_file:
            self._file(rollout).save(state)

    def retry(self, rollout: Rollout) -> None:
        """Write a pending state (a failed write) again."""
        if rollout.state_file:
            self._file(rollout).retry()

    def durability(self, rollout: Rollout) -> dict[str, Any] | None:
        """/status and /metrics: is the latch on disk? None without a state file."""
        return self._file(rollout).status() if rollout.state_file else None
