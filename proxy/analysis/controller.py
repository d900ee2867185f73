"""Runs the rollout: judges the windows every tick, applies the state machine, and publishes changes.

Publishing a change means: save the state file, call `on_change(state)` (the app recompiles its
snapshot with the new effective weights), log the events as JSON lines on the
"canary_proxy.rollout" logger, keep the last 100 for /status, send them to the webhook, and count
rollbacks. Fast-fail trips run synchronously inside the data plane's `observe`, so they only swap
the state and leave the publishing to the next loop iteration.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from proxy.analysis.checks import CheckResult, CheckRunner, combine
from proxy.analysis.evidence import canary_try_timeout, full_windows
from proxy.analysis.fastfail import FastFail
from proxy.analysis.gates import GateRunner
from proxy.analysis.notify import Notifier
from proxy.analysis.outputs import OnChange, RolloutOutputs, WebhookFactory
from proxy.analysis.ports import AlwaysDecide, DeciderGate, FileStore, LocalObservations, Observations, StateStore
from proxy.analysis.rollout import (
    Command,
    JSONScalar,
    RolloutEvent,
    RolloutState,
    finished,
    on_command,
    on_verdict,
    trip,
)
from proxy.analysis.stats import Stats
from proxy.analysis.steps import Analysis, judging
from proxy.analysis.verdict import Breach, Evidence, Verdict, judge_evidence
from proxy.analysis.webhook import WebhookSender
from proxy.config.model import Config, Rollout

log = logging.getLogger("canary_proxy.rollout")
MAX_EVENTS = 100


class RolloutController(RolloutOutputs):
    """Owns the rollout state of one process. Everything runs on the event loop thread."""

    def __init__(
        self,
        config: Config,
        stats: Stats,
        clock: Callable[[], float] = time.time,
        on_change: OnChange | None = None,
        tick: float = 1.0,
        webhook_factory: WebhookFactory = WebhookSender,
        name: str | None = None,
        observations: Observations | None = None,
        gate: DeciderGate | None = None,
        store: StateStore | None = None,
        replica: str | None = None,
    ) -> None:
        self._name = name  # the rollout this controller runs (None: the config's first)
        self._config = config
        # The seams fleet mode replaces (proxy.analysis.ports): evidence, who decides, where state lives.
        self._observations: Observations = observations or LocalObservations(stats)
        self._gate: DeciderGate = gate or AlwaysDecide()
        self._store: StateStore = store or FileStore()
        self.replica = replica  # named in events (fleet mode)
        self._stats = stats
        self._clock = clock
        self._on_change = on_change
        self._tick = tick
        self._webhook_factory = webhook_factory
        self._state: RolloutState | None = None
        self._last_verdict: Verdict | None = None
        self._last_verdict_at: float | None = None
        self._webhook: WebhookSender | None = None
        self._fast_fail = FastFail(stats, self._on_fast_fail)
        self._pending: list[RolloutEvent] = []  # fast-fail work waiting for call_soon
        self._pending_handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._fresh = False  # started without a saved state: a follower's newer state wins
        self.events: deque[RolloutEvent] = deque(maxlen=MAX_EVENTS)
        self._notifier: Notifier | None = None
        self._gates = GateRunner()
        self._checks = CheckRunner()
        self.analysis: Analysis | None = None  # the figures of the latest tick, for /metrics

    @property
    def check_results(self) -> dict[str, CheckResult]:
        """The latest result of each configured Prometheus check (hold until its first answer)."""
        rollout = self._rollout()
        if rollout is None:
            return {}
        waiting = "not evaluated yet"
        return {c.name: self._checks.results.get(c.name, CheckResult(c.name, "hold", waiting)) for c in rollout.checks}

    @property
    def name(self) -> str | None:
        """The name of the rollout this controller runs."""
        rollout = self._rollout()
        return rollout.name if rollout is not None else self._name

    @property
    def rollout(self) -> Rollout | None:
        """The rollout config this controller runs (None: gone from the config)."""
        return self._rollout()

    def _rollout(self, config: Config | None = None) -> Rollout | None:
        config = self._config if config is None else config
        if self._name is None:
            return config.rollout
        return config.rollout_named(self._name)

    # -- public API -------------------------------------------------------------------------------

    @property
    def state(self) -> RolloutState | None:
        """The current state; None when the config has no rollout."""
        return self._state

    @property
    def last_verdict(self) -> Verdict | None:
        """The verdict of the latest tick (also while holding)."""
        return self._last_verdict

    @property
    def last_verdict_at(self) -> float | None:
        """When `last_verdict` was computed (clock time)."""
        return self._last_verdict_at

    @property
    def config(self) -> Config:
        return self._config

    async def start(self) -> None:
        """Load the state file, reconcile it with the config, save it, and call on_change."""
        if self._started:
            return
        self._started = True
        rollout = self._rollout()
        if rollout is None:
            return
        self._set_webhook(rollout.webhook)
        self._set_notifier(rollout)
        self._adopt(None, rollout, notify=True)

    async def run(self) -> None:
        """Evaluate every `tick` seconds until cancelled (or `stop`)."""
        await self.start()
        while True:
            try:
                self.evaluate()
            except Exception:
                log.exception("rollout evaluation failed")
            await asyncio.sleep(self._tick)

    def evaluate(self, now: float | None = None) -> Verdict | None:
        """One tick: judge the windows and apply the verdict. Returns the verdict (None: no rollout)."""
        self._retry_save()
        rollout = self._rollout()
        state = self._state
        if rollout is None or state is None:
            return None
        mode = self._gate.mode(rollout)
        if mode == "follow":
            self._last_verdict = self._last_verdict_at = self.analysis = None  # ours would be stale
            return None  # another process judges (the fleet's leader)
        now = self._clock() if now is None else now
        evidence = self._observations.evidence(rollout, state, now, time.monotonic())
        self._tune_canary(rollout, state, evidence)
        verdict = judge_evidence(evidence, judging(rollout, state))
        canary, baseline = full_windows(evidence)
        if rollout.checks and not finished(state):
            verdict = combine(verdict, self._checks.poll(rollout, now))
        self._last_verdict = verdict
        self._last_verdict_at = now
        self.analysis = Analysis(canary, baseline, verdict, now)
        if mode == "watch":
            # Cut off from the decider: a breach still stops the canary here, nothing else moves.
            if isinstance(verdict, Breach):
                new, events = on_verdict(state, verdict, rollout, now)
                if new is not state:
                    self._apply(new, events, latch=True)
            return verdict
        gate_open = self._gates.poll(rollout, state, now)
        new, events = on_verdict(state, verdict, rollout, now, gate_open=gate_open)
        self._commit(rollout, state, new, events)
        return verdict

    def command(self, name: Command, reason: str | None = None, *, full: bool = False) -> RolloutState:
        """An operator command (pause/resume/promote/rollback/reset); raises CommandError or
        LookupError (no rollout configured). `full`: promote straight to 100%."""
        rollout = self._rollout()
        if rollout is None or self._state is None:
            raise LookupError("no rollout is configured")
        new, events = on_command(self._state, name, rollout, self._clock(), reason, full=full)
        if name == "reset":
            self._fast_fail.reset_count(rollout.canary)
            self._checks.forget()  # a tripped check must not trip the fresh start
        if name == "rollback":
            if new is not self._state:
                self._apply(new, events, latch=True)
        else:
            self._commit(rollout, self._state, new, events)
        return new

    def adopt(self, state: RolloutState, events: list[RolloutEvent], *, webhook: bool = False) -> None:
        """Apply a state decided elsewhere (the fleet's state store); `webhook`: also send the events
        to the webhook (the process that caused them does, the others only log them)."""
        rollout = self._rollout()
        old = self._state
        if rollout is None or old is None:
            return
        if finished(old) and not finished(state):
            self._fast_fail.reset_count(rollout.canary)  # a fresh start must not trip on an old count
            self._checks.forget()
        self._apply(state, events, webhook=webhook)

    def reconfigure(self, config: Config) -> RolloutState | None:
        """Adopt a reloaded config: keep the state unless the canary (or its version) changed.

        Does not call on_change: the caller compiles its new snapshot with the returned state.
        """
        old_rollout = self._rollout()
        self._config = config
        rollout = self._rollout()
        if rollout is None:
            self._fast_fail.disarm()
            self._set_webhook(None)
            self._set_notifier(None)
            self._state = None
            return None
        if old_rollout is None or old_rollout.webhook != rollout.webhook:
            self._set_webhook(rollout.webhook)
        if old_rollout is None or old_rollout.webhooks != rollout.webhooks:
            self._set_notifier(rollout)
        self._adopt(self._state, rollout, notify=False)  # None: a rollout added by a reload
        return self._state

    def preload(self, config: Config) -> RolloutState | None:
        """Read the state file of a rollout that `config` adds, before a reload commits, without
        touching anything (a bad file is only set aside by the commit). Never raises."""
        rollout = self._rollout(config)
        if rollout is None or not rollout.state_file:
            return None
        if not isinstance(self._store, FileStore):
            return None  # another store (the fleet's) keeps its own state: nothing to read here
        state = self._store.peek(rollout)
        if state is not None and state.phase == "unknown_state" and state.canary_version is None:
            up = config.upstreams.get(rollout.canary)
            state = replace(state, canary_version=up.version if up is not None else None)
        return state

    def durability(self) -> dict[str, Any] | None:
        """Whether the state file holds the current state (None: no state file, or another store)."""
        rollout = self._rollout()
        if rollout is None or not isinstance(self._store, FileStore):
            return None
        return self._store.durability(rollout)

    def _retry_save(self) -> None:
        rollout = self._rollout()
        if rollout is not None and isinstance(self._store, FileStore):
            self._store.retry(rollout)  # a latch that did not reach the disk yet: every tick

    def record_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """Add an event from elsewhere (e.g. a reload) to the log and the /status list."""
        event = RolloutEvent(kind, self._clock(), message, dict(data or {}), self.name)
        self.events.append(event)
        self._log(event)

    def offer(self, state: RolloutState) -> bool:
        """A worker's copy of the state (`--workers`): adopt it when it is newer than ours, or when
        we started without a saved state (a restarted leader must not forget a rollback)."""
        rollout = self._rollout()
        own = self._state
        if rollout is None or own is None or state == own:
            return False
        if (state.canary, state.canary_version) != (own.canary, own.canary_version):
            return False
        if not (self._fresh or state.changed_at > own.changed_at):
            return False
        log.warning("adopting a worker's newer rollout state (%s, was %s)", state.phase, own.phase)
        self._fresh = False
        new = self._store.resolve(state, rollout, own.canary_version, self._clock())
        self._apply(new, [])
        return True

    # -- internals --------------------------------------------------------------------------------

    def _tune_canary(self, rollout: Rollout, state: RolloutState, evidence: Evidence) -> None:
        """Point the data plane's canary knobs at what the analysis needs: its tries tracked while
        they are outstanding, and their per-try timeout (from the baseline's latency)."""
        us = self._stats.upstream(rollout.canary, self._config.metrics.buckets)
        us.track_inflight = not finished(state)
        us.try_timeout = canary_try_timeout(rollout, evidence, self._config.timeouts.response)
        base = self._stats.upstreams.get(rollout.baseline)
        if base is not None:
            base.track_inflight = False
            base.try_timeout = 0.0

    @property
    def canary_try_timeout(self) -> float:
        """The canary's current per-try timeout (0: none), for the workers' sync."""
        rollout = self._rollout()
        us = self._stats.upstreams.get(rollout.canary) if rollout is not None else None
        return us.try_timeout if us is not None else 0.0

    def _adopt(self, saved: RolloutState | None, rollout: Rollout, *, notify: bool) -> None:
        """Reconcile `saved` with the config; save; tell on_change when asked."""
        now = self._clock()
        up = self._config.upstreams.get(rollout.canary)
        version = up.version if up is not None else None
        if saved is None:
            saved = self._store.load(rollout)
            self._fresh = saved is None  # nothing kept: a worker's newer state may win (offer)
        new = self._store.resolve(saved, rollout, version, now)
        events: list[RolloutEvent] = []
        if saved is not None and (saved.canary, saved.canary_version) != (new.canary, new.canary_version):
            msg = (
                f"new canary {new.canary} version {new.canary_version}"
                f" (was {saved.canary} version {saved.canary_version}): rollout restarts"
            )
            events.append(RolloutEvent("reset", now, msg, {"previous_phase": saved.phase}))
            self._fast_fail.reset_count(rollout.canary)
            self._checks.forget()
        self._state = new
        self._save(new)
        self._arm()
        self._publish(events)
        if notify:
            self._notify(new)

    def _commit(
        self, rollout: Rollout, base: RolloutState, new: RolloutState, events: list[RolloutEvent]
    ) -> None:
        """A decision: the store may apply it now or later (fleet mode: after its fenced write)."""
        if self._store.commit(rollout, base, new, events):
            self._apply(new, events)

    def _apply(
        self, new: RolloutState, events: list[RolloutEvent], *, latch: bool = False, webhook: bool = True
    ) -> None:
        changed = new != self._state
        self._state = new
        if changed:
            self._fresh = False
            self._save(new, latch=latch)
            self._arm()
            self._notify(new)
        self._publish(events, webhook=webhook)

    # -- fast fail --------------------------------------------------------------------------------

    def _arm(self) -> None:
        """Point the canary's consecutive-error trip at us while a trip can still change anything."""
        if self._state is None:
            self._fast_fail.disarm()
        else:
            self._fast_fail.update(self._rollout(), self._config.metrics.buckets, self._state)

    def trip(self, reason: str, data: dict[str, JSONScalar] | None = None) -> RolloutState | None:
        """Roll back now for `reason` (e.g. a worker's fast-fail); a no-op when rolled back or promoted."""
        rollout = self._rollout()
        state = self._state
        if rollout is None or state is None:
            return state
        new, events = trip(state, rollout, self._clock(), reason, data or {})
        if new is not state:
            self._apply(new, events, latch=True)
        return self._state

    def _on_fast_fail(self, _why: str) -> None:
        """Called (once) by the fast-fail trip on the data plane's stack: swap the state, defer the rest."""
        rollout = self._rollout()
        state = self._state
        if rollout is None or state is None:
            return
        n = rollout.fast_fail.consecutive_errors
        new, events = trip(
            state,
            rollout,
            self._clock(),
            f"fast fail: {n} consecutive errors from {rollout.canary}",
            {"consecutive_errors": n},
        )
        if new is state:
            return
        self._state = new
        self._deliver_later(events)
