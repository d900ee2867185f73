"""Gate steps (`{gate: {webhook: URL, timeout: 10s}}`, Flagger's confirm-promotion webhook).

On a gate step the rollout asks the URL (a JSON POST) when it gets there and again every
`interval` while the answer is not 2xx. A 2xx opens the gate for that step; a breach still rolls
back while it waits (the state machine sees breaches first). A URL that hangs, refuses or
answers garbage is a closed gate, never a stalled controller.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from proxy.analysis.background import Background
from proxy.analysis.rollout import RolloutState, ladder_weight
from proxy.config.model import Gate, Rollout

GateKey = tuple[str, int, float]  # (rollout, step index, step started at): one visit of one step


class GateRunner:
    """The gate of the step a rollout is on: when to ask, and the last answer."""

    def __init__(self) -> None:
        self._bg = Background()
        self._key: GateKey | None = None
        self._open = False
        self._asked_at: float | None = None
        self._busy = False
        self.last: dict[str, Any] | None = None  # the latest answer, for /status

    def poll(self, rollout: Rollout, state: RolloutState, now: float) -> bool:
        """True once this step's gate answered 2xx; starts a (background) ask when one is due."""
        step = rollout.step(state.step_index) if rollout.steps else None
        if state.phase != "progressing" or step is None or step.kind != "gate" or step.gate is None:
            self._key = None
            return False
        key: GateKey = (rollout.name, state.step_index, state.step_started_at)
        if key != self._key:
            self._key, self._open, self._asked_at, self.last = key, False, None, None
        if self._open:
            return True
        due = self._asked_at is None or now - self._asked_at >= rollout.interval
        if due and not self._busy:
            payload = {
                "rollout": rollout.name,
                "canary": rollout.canary,
                "baseline": rollout.baseline,
                "step": state.step_index,
                "weight": ladder_weight(state, rollout),
                "phase": state.phase,
            }
            self._busy = self._bg.spawn(self._ask(key, step.gate, payload, now))
            self._asked_at = now
        return False

    async def _ask(self, key: GateKey, gate: Gate, payload: dict[str, Any], now: float) -> None:
        answer = ""
        ok = False
        try:
            async with self._bg.session().post(
                gate.webhook, json=payload, timeout=aiohttp.ClientTimeout(total=gate.timeout)
            ) as resp:
                await resp.read()
                ok = 200 <= resp.status < 300
                answer = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            answer = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        finally:
            self._busy = False
        if key == self._key:  # the rollout may have moved on meanwhile
            self._open = ok
            self.last = {"step": key[1], "open": ok, "answer": answer, "asked_at": now, "url": gate.webhook}

    async def close(self) -> None:
        """Cancel an ask in flight."""
        await self._bg.close()
