"""Several named rollouts in one proxy: one RolloutController per rollout, one tick loop.

The manager is what the app, the admin API and /metrics talk to. Each controller keeps its own
state, latch, state file, webhooks, gates and checks, keyed by the rollout's name; the manager
hands the app every state at once so a snapshot is compiled with all of them. With exactly one
rollout it behaves like that rollout's controller (the `/rollout/*` API and older callers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from proxy.analysis.controller import MAX_EVENTS, RolloutController
from proxy.analysis.outputs import WebhookFactory
from proxy.analysis.ports import DeciderGate, Observations, StateStore
from proxy.analysis.rollout import Command, JSONScalar, RolloutEvent, RolloutState
from proxy.analysis.stats import Stats
from proxy.analysis.verdict import Verdict
from proxy.analysis.webhook import WebhookSender
from proxy.config.model import Config

log = logging.getLogger("canary_proxy.rollout")

OnChanges = Callable[[dict[str, RolloutState]], None]


class RolloutManager:
    """Owns every rollout's controller. Everything runs on the event loop thread."""

    def __init__(
        self,
        config: Config,
        stats: Stats,
        clock: Callable[[], float] = time.time,
        on_change: OnChanges | None = None,
        tick: float = 1.0,
        webhook_factory: WebhookFactory = WebhookSender,
        *,
        observations: Observations | None = None,
        gate: DeciderGate | None = None,
        store: StateStore | None = None,
        replica: str | None = None,
    ) -> None:
        # The seams every controller gets (fleet mode replaces them; see proxy.analysis.ports).
        self._seams = (observations, gate, store, replica)
        self._config = config
        self._stats = stats
        self._clock = clock
        self._on_change = on_change
        self._tick = tick
        self._webhook_factory = webhook_factory
        self._own: deque[RolloutEvent] = deque(maxlen=MAX_EVENTS)  # events of no single rollout
        self._retired: set[asyncio.Task[None]] = set()
        self.controllers: dict[str, RolloutController] = {r.name: self._make(r.name) for r in config.rollouts}

    def _make(self, name: str) -> RolloutController:
        return RolloutController(
            config=self._config,
            stats=self._stats,
            clock=self._clock,
            on_change=self._changed,
            tick=self._tick,
            webhook_factory=self._webhook_factory,
            name=name,
            observations=self._seams[0],
            gate=self._seams[1],
            store=self._seams[2],
            replica=self._seams[3],
        )

    def _changed(self, _state: RolloutState) -> None:
        if self._on_change is not None:
            self._on_change(self.states)

    # -- views --------------------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    @property
    def canary_try_timeouts(self) -> dict[str, float]:
        """Each canary upstream's current per-try timeout (0: none), for the workers' sync."""
        out: dict[str, float] = {}
        for c in self.controllers.values():
            rollout = c.rollout
            if rollout is not None:
                out[rollout.canary] = c.canary_try_timeout
        return out

    @property
    def states(self) -> dict[str, RolloutState]:
        """Every rollout's current state, by name."""
        return {name: c.state for name, c in self.controllers.items() if c.state is not None}

    def controller(self, name: str | None = None) -> RolloutController | None:
        """The controller of rollout `name`; without a name, the only one (None when several)."""
        if name is None:
            return next(iter(self.controllers.values())) if len(self.controllers) == 1 else None
        return self.controllers.get(name)

    def _first(self) -> RolloutController | None:
        return next(iter(self.controllers.values()), None)

    @property
    def state(self) -> RolloutState | None:
        """The first rollout's state (the only one's, with the `rollout:` shorthand)."""
        first = self._first()
        return first.state if first is not None else None

    @property
    def last_verdict(self) -> Verdict | None:
        first = self._first()
        return first.last_verdict if first is not None else None

    @property
    def last_verdict_at(self) -> float | None:
        first = self._first()
        return first.last_verdict_at if first is not None else None

    @property
    def events(self) -> list[RolloutEvent]:
        """Every rollout's recent events and the proxy's own (reloads), oldest first."""
        merged = list(self._own)
        for c in self.controllers.values():
            merged.extend(c.events)
        merged.sort(key=lambda e: e.at)
        return merged[-MAX_EVENTS:]

    def status(self) -> dict[str, Any]:
        """Every rollout's controller status, by name."""
        return {name: c.status() for name, c in self.controllers.items()}

    # -- running ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every controller (state files read, states reconciled)."""
        for c in self.controllers.values():
            await c.start()

    async def run(self) -> None:
        """Evaluate every rollout every tick until cancelled; one failing rollout never stops another."""
        await self.start()
        while True:
            self.evaluate()
            await asyncio.sleep(self._tick)

    def evaluate(self, now: float | None = None) -> Verdict | None:
        """One tick of every rollout; returns the first rollout's verdict."""
        first: Verdict | None = None
        for i, c in enumerate(list(self.controllers.values())):
            try:
                verdict = c.evaluate(now)
            except Exception:
                log.exception("rollout %s: evaluation failed", c.name)
                continue
            if i == 0:
                first = verdict
        return first

    def command(
        self, name: Command, reason: str | None = None, *, rollout: str | None = None, full: bool = False
    ) -> RolloutState:
        """An operator command on `rollout` (or the only one). Raises LookupError for an unknown
        name or an unnamed command with several rollouts, CommandError when it does not apply."""
        c = self.controller(rollout)
        if c is None:
            if rollout is not None:
                raise LookupError(f'no rollout named "{rollout}" (known: {", ".join(self.controllers) or "none"})')
            if not self.controllers:
                raise LookupError("no rollout is configured")
            raise LookupError(f"several rollouts ({', '.join(self.controllers)}): name one")
        return c.command(name, reason, full=full)

    def trip(
        self, reason: str, data: dict[str, JSONScalar] | None = None, *, rollout: str | None = None
    ) -> RolloutState | None:
        """Roll `rollout` (default: the first) back now, e.g. for a worker's fast-fail."""
        c = self.controllers.get(rollout) if rollout is not None else self._first()
        return c.trip(reason, data) if c is not None else None

    def reconfigure(self, config: Config) -> dict[str, RolloutState]:
        """Adopt a reloaded config: rollouts keep their state by name, new ones start (or load
        their state file), removed ones stop. Does not call on_change (the caller compiles)."""
        names = [r.name for r in config.rollouts]
        for name in list(self.controllers):
            if name not in names:
                gone = self.controllers.pop(name)
                gone.reconfigure(config)  # disarms fast-fail and drops its webhooks
                self._retire(gone)
        for name in names:
            c = self.controllers.get(name)
            if c is None:
                # Made with the old config (where it has no rollout), so reconfigure sets it all up.
                c = self.controllers[name] = self._make(name)
            c.reconfigure(config)
        self._config = config
        # Keep config order: it is the order of /status, /metrics and `rollout` (the first).
        self.controllers = {name: self.controllers[name] for name in names}
        return self.states

    def preload(self, config: Config) -> dict[str, RolloutState]:
        """The saved states of the rollouts `config` adds, read before a reload commits (a bad
        file gives a held state, nothing is moved yet). Never raises."""
        out: dict[str, RolloutState] = {}
        for rollout in config.rollouts:
            if rollout.name not in self.controllers:
                state = self._make(rollout.name).preload(config)
                if state is not None:
                    out[rollout.name] = state
        return out

    def offer(self, states: Mapping[str, RolloutState]) -> None:
        """A worker's copies of the states (`--workers`): each controller takes its own if newer."""
        for name, state in states.items():
            c = self.controllers.get(name)
            if c is not None:
                c.offer(state)

    def _retire(self, c: RolloutController) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(c.stop())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    def record_event(self, kind: str, message: str, data: Mapping[str, Any] | None = None) -> None:
        """An event of the proxy's own (e.g. a reload): logged and listed in /status."""
        event = RolloutEvent(kind, self._clock(), message, dict(data or {}))
        self._own.append(event)
        line = json.dumps({"logger": "canary_proxy.rollout", **event.to_dict()}, default=str)
        log.info(line)

    async def stop(self) -> None:
        """Stop every controller and wait for retired ones."""
        for c in self.controllers.values():
            await c.stop()
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)
