"""What the controller adds around the pure state machine for step objects and observe mode:
the config a step is judged with, the events as published, and the figures of the latest tick."""

from __future__ import annotations

from dataclasses import dataclass, replace

from proxy.analysis.rollout import RolloutEvent, RolloutState
from proxy.analysis.verdict import Verdict
from proxy.analysis.window import WindowStats
from proxy.config.model import Rollout

OBSERVE_PREFIX = "observe mode, not applied: "


@dataclass(frozen=True, slots=True)
class Analysis:
    """One tick's evidence and verdict (what /metrics shows per rollout and upstream)."""

    canary: WindowStats
    baseline: WindowStats
    verdict: Verdict
    at: float


def judging(rollout: Rollout, state: RolloutState) -> Rollout:
    """The rollout as the verdict sees it on this step: `{analysis: {min_requests: N}}` asks for N."""
    if not rollout.steps or state.phase not in ("progressing", "paused"):
        return rollout
    step = rollout.step(state.step_index)
    if step.kind == "analysis" and step.min_requests is not None:
        return replace(rollout, min_requests=step.min_requests)
    return rollout


def stamp(events: list[RolloutEvent], rollout: Rollout) -> list[RolloutEvent]:
    """Name the rollout on each event; in observe mode say that nothing was applied."""
    out: list[RolloutEvent] = []
    for event in events:
        if rollout.mode == "observe" and event.kind in ("step", "promoted", "rollback", "reset", "stalled"):
            data = {**event.data, "observe": True}
            event = replace(event, message=OBSERVE_PREFIX + event.message, data=data)
        out.append(event if event.rollout is not None else replace(event, rollout=rollout.name))
    return out
