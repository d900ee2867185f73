"""The controller's seams in fleet mode, and what this replica knows of the fleet.

`FleetStore` is the controller's observations source (the fleet's merged window on the leader),
decider gate (only a connected leader that has read the state decides; cut off from Redis, a
replica only trips) and state store (decisions become fenced writes, trips become latch-only
writes). `FleetMember` does the Redis I/O; this module only keeps the bookkeeping, so the
controller's calls (on the event loop, sometimes inside the data plane's stack) never wait.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from proxy.analysis.evidence import single
from proxy.analysis.ports import LocalObservations, Mode
from proxy.analysis.rollout import RolloutEvent, RolloutState, reconcile
from proxy.analysis.stats import Stats
from proxy.analysis.verdict import Evidence
from proxy.analysis.window import WindowStats
from proxy.config.model import Rollout
from proxy.control.fleet.codec import RemoteState
from proxy.control.fleet.connection import LinkState
from proxy.control.fleet.evidence import EvidenceMerger

NEVER_READ = "waiting for the fleet state (Redis not read yet)"


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """A leader decision waiting for its fenced write."""

    base_version: int
    state: RolloutState
    events: tuple[RolloutEvent, ...]


def held(rollout: Rollout, version: str | None, now: float, reason: str) -> RolloutState:
    """The local stand-in until the fleet state is known: splits give the canary nothing."""
    return RolloutState("held", rollout.canary, version, 0, now, now, reason)


class FleetStore:
    """Observations + DeciderGate + StateStore for one replica (see proxy.analysis.ports)."""

    def __init__(self, stats: Stats, link: LinkState, merger: EvidenceMerger) -> None:
        self.local = LocalObservations(stats)
        self.link = link
        self.merger = merger
        self.wake = asyncio.Event()  # the member's loop: something to write
        self.lease_value: str | None = None  # "replica token" while we hold the lease
        self.lease_until = 0.0  # monotonic: we act as leader until then, renewals permitting
        self.leader: str | None = None  # who holds the lease (as last read)
        self.remote: dict[str, RemoteState] = {}  # rollout -> latest version read or written
        self.applied: dict[str, int] = {}  # rollout -> version applied locally
        self.pending: dict[str, PendingWrite] = {}
        self.latches: dict[str, RolloutState] = {}  # local trips not yet in Redis

    # -- leadership ---------------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """We hold a lease that has not run out locally, and Redis answers."""
        return self.link.connected and self.lease_value is not None and time.monotonic() < self.lease_until

    # -- Observations -------------------------------------------------------------------------------

    def window(self, rollout: Rollout, upstream: str, now: float) -> WindowStats:
        """Deciding: the fleet's merged window (empty, so "insufficient data", until one is read).
        Otherwise this replica's own window (a trip during an outage judges what it saw)."""
        if self.mode(rollout) == "decide":
            merged = self.merger.window(rollout.name, upstream, now)
            return merged if merged is not None else WindowStats.empty(rollout.window)
        return self.local.window(rollout, upstream, now)

    def evidence(self, rollout: Rollout, state: RolloutState, now: float, mono_now: float) -> Evidence:
        """Deciding: the fleet's merged full windows (one per side: the fleet does not pool the
        scan of shorter windows nor requests in flight). Otherwise this replica's own evidence."""
        if self.mode(rollout) == "decide":
            return single(self.window(rollout, rollout.canary, now), self.window(rollout, rollout.baseline, now))
        return self.local.evidence(rollout, state, now, mono_now)

    # -- DeciderGate --------------------------------------------------------------------------------

    def mode(self, rollout: Rollout) -> Mode:
        """decide: the leader, in sync; watch: Redis unreachable (a breach still trips here);
        follow: someone else decides, or our last decision is still being written."""
        if not self.link.connected:
            return "watch"
        name = rollout.name
        if self.is_leader() and name in self.applied and name not in self.pending and name not in self.latches:
            return "decide"
        return "follow"

    # -- StateStore ---------------------------------------------------------------------------------

    def load(self, rollout: Rollout) -> RolloutState | None:
        """Nothing local: the state lives in Redis (the member reads it)."""
        return None

    def resolve(
        self, saved: RolloutState | None, rollout: Rollout, canary_version: str | None, now: float
    ) -> RolloutState:
        """The fleet's state as this replica must apply it (held until read; a pending local trip
        of this canary version stays)."""
        if (
            saved is not None
            and saved.phase == "rolled_back"
            and rollout.name in self.latches
            and (saved.canary, saved.canary_version) == (rollout.canary, canary_version)
        ):
            return saved
        remote = self.remote.get(rollout.name)
        if remote is None:
            return held(rollout, canary_version, now, NEVER_READ)
        return self.view(remote.state, rollout, canary_version, now)

    @staticmethod
    def view(state: RolloutState, rollout: Rollout, canary_version: str | None, now: float) -> RolloutState:
        """A fleet state seen with this replica's config: held when it is about another canary."""
        if (state.canary, state.canary_version) != (rollout.canary, canary_version):
            why = (
                f"fleet state is for {state.canary} version {state.canary_version}; this replica has "
                f"{rollout.canary} version {canary_version} (the leader's config decides)"
            )
            return held(rollout, canary_version, now, why)
        return reconcile(state, rollout, canary_version, now)

    def commit(
        self, rollout: Rollout, base: RolloutState, new: RolloutState, events: list[RolloutEvent]
    ) -> bool:
        """A leader decision: written to Redis first (fenced), applied when the write succeeded."""
        if new == base and not events:
            return True
        version = self.applied.get(rollout.name)
        if version is None or not self.is_leader():
            return False  # not ours to decide any more: the next read brings the fleet's state
        self.pending[rollout.name] = PendingWrite(version, new, tuple(events))
        self.wake.set()
        return False

    def latch(self, rollout: Rollout, state: RolloutState) -> None:
        """A trip already applied here: published to the fleet as soon as Redis takes it."""
        if state.phase == "rolled_back":
            self.latches[rollout.name] = state
            self.wake.set()

    def save(self, rollout: Rollout, state: RolloutState) -> None:
        """Nothing: Redis keeps the state (`state_file` is not used in fleet mode)."""
