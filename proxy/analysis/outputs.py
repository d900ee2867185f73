"""Where a rollout controller's decisions go: the state store, the on-change callback (new weights),
the event list /status shows, one JSON log line per event, the webhook and the notifiers.

:class:`proxy.analysis.controller.RolloutController` decides; this base class delivers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from proxy.analysis.checks import CheckResult, CheckRunner
from proxy.analysis.fastfail import FastFail
from proxy.analysis.gates import GateRunner
from proxy.analysis.notify import Notifier
from proxy.analysis.ports import StateStore
from proxy.analysis.rollout import (
    RolloutEvent,
    RolloutState,
    canary_weight,
)
from proxy.analysis.statefile import state_to_dict
from proxy.analysis.stats import Stats
from proxy.analysis.steps import stamp
from proxy.analysis.verdict import Verdict
from proxy.analysis.webhook import WebhookSender
from proxy.config.model import Config, Rollout

log = logging.getLogger("canary_proxy.rollout")

OnChange = Callable[[RolloutState], None]
WebhookFactory = Callable[[str], WebhookSender]


class RolloutOutputs:
    """The delivery half of a rollout controller (state and configuration live in the subclass)."""

    events: deque[RolloutEvent]
    replica: str | None
    _state: RolloutState | None
    _stats: Stats
    _store: StateStore
    _on_change: OnChange | None
    _webhook: WebhookSender | None
    _notifier: Notifier | None
    _webhook_factory: WebhookFactory
    _tasks: set[asyncio.Task[None]]

    _last_verdict: Verdict | None
    _gates: GateRunner
    _checks: CheckRunner
    _fast_fail: FastFail
    _pending: list[RolloutEvent]  # a trip's events waiting for the next loop iteration
    _pending_handle: asyncio.Handle | None

    def _rollout(self, config: Config | None = None) -> Rollout | None:
        raise NotImplementedError

    @property
    def check_results(self) -> dict[str, CheckResult]:
        raise NotImplementedError

    def _deliver_later(self, events: list[RolloutEvent]) -> None:
        """A trip swapped the state on the data plane's stack: save, notify and publish it on the
        next loop iteration (at once when there is no loop: a synchronous caller)."""
        self._pending.extend(events)
        if self._pending_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._flush_pending()
                return
            self._pending_handle = loop.call_soon(self._flush_pending)

    def _flush_pending(self) -> None:
        self._pending_handle = None
        events, self._pending = self._pending, []
        state = self._state
        if state is None:
            return
        self._save(state, latch=True)
        self._notify(state)
        self._publish(events)

    def durability(self) -> dict[str, Any] | None:
        raise NotImplementedError

    def _notify(self, state: RolloutState) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(state)
        except Exception:
            # The state (and its file) stay right; the next change or reload tries again.
            log.exception("rollout on_change callback failed")

    def _publish(self, events: list[RolloutEvent], *, webhook: bool = True) -> None:
        rollout = self._rollout()
        if rollout is not None:
            events = stamp(events, rollout)
        for event in events:
            if self.replica is not None and "replica" not in event.data:
                event = replace(event, data={**event.data, "replica": self.replica})
            self.events.append(event)
            self._log(event)
            if event.kind == "rollback" and rollout is not None:
                self._stats.rollbacks[rollout.canary] = self._stats.rollbacks.get(rollout.canary, 0) + 1
            if webhook and self._webhook is not None and rollout is not None:
                payload = event.to_dict()
                payload.update(canary=rollout.canary, baseline=rollout.baseline)
                if self._state is not None:
                    payload.update(phase=self._state.phase, weight=canary_weight(self._state, rollout))
                self._webhook.send(payload)
            if webhook and self._notifier is not None and rollout is not None and self._state is not None:
                self._notifier.send(event, rollout, self._state)

    def _log(self, event: RolloutEvent) -> None:
        line = json.dumps({"logger": "canary_proxy.rollout", **event.to_dict()}, default=str)
        log.log(logging.WARNING if event.kind == "rollback" else logging.INFO, line)

    def _save(self, state: RolloutState, *, latch: bool = False) -> None:
        rollout = self._rollout()
        if rollout is None:
            return
        try:
            if latch:
                self._store.latch(rollout, state)
            else:
                self._store.save(rollout, state)
        except OSError as exc:
            # The in-memory latch still holds; only a restart would lose it.
            log.error("could not write rollout state file %s: %s", rollout.state_file, exc)

    def _set_notifier(self, rollout: Rollout | None) -> None:
        old, self._notifier = self._notifier, None
        if old is not None:
            self._track(old.close())
        if rollout is not None and rollout.webhooks:
            self._notifier = Notifier(rollout.webhooks)

    def _set_webhook(self, url: str | None) -> None:
        old, self._webhook = self._webhook, None
        if old is not None:
            self._track(old.close())
        if url:
            self._webhook = self._webhook_factory(url)

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()
            return
        task: asyncio.Task[None] = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def status(self) -> dict[str, Any]:
        """What /status shows about the rollout."""
        rollout = self._rollout()
        state = self._state
        if rollout is None or state is None:
            return {"enabled": False, "events": [e.to_dict() for e in self.events]}
        verdict = self._last_verdict
        return {
            "enabled": True,
            "name": rollout.name,
            "canary": rollout.canary,
            "baseline": rollout.baseline,
            "steps": list(rollout.steps),
            "weight": canary_weight(state, rollout),
            "state": state_to_dict(state),
            "gate": self._gates.last,
            "checks": [r.to_dict() for r in self.check_results.values()],
            "verdict": None
            if verdict is None
            else {"kind": verdict.kind, "reason": verdict.reason, "figures": verdict.figures.as_dict()},
            "events": [e.to_dict() for e in self.events],
            "state_file": self.durability(),
        }

    async def stop(self) -> None:
        """Flush pending fast-fail work, close the webhook(s) and wait for our tasks."""
        if self._pending_handle is not None:
            self._pending_handle.cancel()
            self._flush_pending()
        self._fast_fail.disarm()
        webhook, self._webhook = self._webhook, None
        if webhook is not None:
            await webhook.close()
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            await notifier.close()
        await self._gates.close()
        await self._checks.close()
        # Only closes of replaced webhooks are tracked; they are quick and must not be cut short.
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
