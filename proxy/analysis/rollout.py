"""The rollout state machine. Pure: functions of (state, input, cfg, now). Its effect on the
router's splits and targets is in :mod:`proxy.analysis.splits`.

Phases:
- "progressing": stepping through `steps`, one step per `interval` while the verdict is healthy;
- "paused": an operator froze the step (a breach still rolls back);
- "steady": a rollout without steps, the configured weights stay and the verdict is only watched;
- "promoted": the canary has 100% of every split it is in; analysis stops;
- "rolled_back": latched: the canary gets nothing until `reset` or a new canary version;
- "held": fleet mode only, never stored: this replica has not read the fleet's state yet (or it is for
  another canary version), so splits give the canary nothing; `to: canary` routes still go to it.
- "unknown_state": the state file could not be read; held like a rollback (the canary gets
  nothing, no decisions) until `reset` or a new canary version, so a lost latch never un-latches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from proxy.analysis.verdict import Breach, Healthy, Verdict
from proxy.config.model import Rollout

Phase = Literal["progressing", "steady", "paused", "promoted", "rolled_back", "held", "unknown_state"]
LATCHED: tuple[Phase, ...] = ("rolled_back", "unknown_state")  # the canary gets nothing, `to:` included
Command = Literal["pause", "resume", "promote", "rollback", "reset"]
COMMANDS: tuple[Command, ...] = ("pause", "resume", "promote", "rollback", "reset")
JSONScalar = float | int | str | bool | None


class CommandError(ValueError):
    """A command that does not apply in the current phase (the admin API answers 409)."""


@dataclass(frozen=True, slots=True)
class VerdictRecord:
    """The verdict behind the last automatic transition."""

    kind: str
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class RolloutState:
    phase: Phase
    canary: str
    canary_version: str | None
    step_index: int
    step_started_at: float
    changed_at: float
    reason: str | None = None  # the latched rollback reason
    last_verdict: VerdictRecord | None = None
    stalled: bool = False  # no step taken for `progress_deadline`; cleared by the next step
    # When the canary's evidence starts: a reset, a new version or a promotion starts it afresh,
    # so what an earlier version did never judges this one.
    evidence_since: float = 0.0


@dataclass(frozen=True, slots=True)
class RolloutEvent:
    """Something that happened to the rollout: logged, kept for /status, sent to the webhook.

    kind: "step", "promoted", "rollback", "paused", "resumed", "reset" (others may add their own,
    e.g. "reload").
    """

    kind: str
    at: float
    message: str
    data: dict[str, JSONScalar] = field(default_factory=dict)
    rollout: str | None = None  # the rollout's name (stamped by the controller)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        out: dict[str, object] = {"event": self.kind, "at": self.at, "message": self.message, "data": dict(self.data)}
        if self.rollout is not None:
            out["rollout"] = self.rollout
        return out


def initial_state(cfg: Rollout, canary_version: str | None, now: float) -> RolloutState:
    """A fresh rollout: step 0 when there are steps, otherwise steady watching."""
    phase: Phase = "progressing" if cfg.steps else "steady"
    return RolloutState(phase, cfg.canary, canary_version, 0, now, now, evidence_since=now)


def reconcile(
    saved: RolloutState | None, cfg: Rollout, canary_version: str | None, now: float
) -> RolloutState:
    """Carry a saved/previous state over to this config.

    A different canary (name or version) starts afresh, which is what clears a latched rollback
    on a new release. Otherwise step and latch are kept; the step index is clamped when the steps
    got shorter, and the phase follows steps appearing or disappearing.
    """
    if saved is None:
        # A first start: what the windows hold (if anything) is this very version's.
        return replace(initial_state(cfg, canary_version, now), evidence_since=0.0)
    if saved.canary != cfg.canary or saved.canary_version != canary_version:
        return initial_state(cfg, canary_version, now)
    state = saved
    if state.phase in ("progressing", "paused") and not cfg.steps:
        state = replace(state, phase="steady", step_index=0, changed_at=now)
    elif state.phase == "steady" and cfg.steps:
        state = replace(state, phase="progressing", step_index=0, step_started_at=now, changed_at=now)
    top = max(len(cfg.steps) - 1, 0)
    if state.step_index > top:
        state = replace(state, step_index=top)
    return state


FINISHED: tuple[Phase, ...] = ("rolled_back", "promoted", "unknown_state")


def finished(state: RolloutState) -> bool:
    """Rolled back or held on an unusable state file (latched), or promoted: analysis and fast-fail
    can change nothing any more."""
    return state.phase in FINISHED


def canary_weight(state: RolloutState | None, cfg: Rollout | None) -> float | None:
    """The canary's share (0..100) the rollout imposes, or None to keep the configured weights
    (also always in observe mode: see `ladder_weight` for what it would impose)."""
    if cfg is not None and cfg.mode == "observe":
        return None
    return ladder_weight(state, cfg)


def ladder_weight(state: RolloutState | None, cfg: Rollout | None) -> float | None:
    """The canary's share the state stands for, whatever the mode."""
    if state is None or cfg is None:
        return None
    if state.phase in ("rolled_back", "held", "unknown_state"):
        return 0.0
    if state.phase == "promoted":
        return 100.0
    if state.phase in ("progressing", "paused") and cfg.steps:
        return min(cfg.steps[min(state.step_index, len(cfg.steps) - 1)], 100.0)
    return None


def on_verdict(
    state: RolloutState, verdict: Verdict, cfg: Rollout, now: float, *, gate_open: bool = False
) -> tuple[RolloutState, list[RolloutEvent]]:
    """Apply one verdict: trip on a breach, take the next step when the current one is done, and
    mark the rollout stalled (or roll it back) past its progress deadline.

    A weight or analysis step is done when healthy and its interval is over; a timed pause when
    its time is over; a pause without a duration only by `promote`; a gate when `gate_open` (its
    webhook answered 2xx for this step)."""
    if finished(state):
        return state, []
    record = VerdictRecord(verdict.kind, verdict.reason, now)
    figures = verdict.figures.as_dict()
    if isinstance(verdict, Breach):
        return _trip(state, cfg, now, verdict.reason, figures, record)
    if state.phase != "progressing" or not cfg.steps or not _step_done(state, verdict, cfg, now, gate_open):
        return _deadline(state, cfg, now)
    return _advance(state, cfg, now, record, figures)


def _step_done(state: RolloutState, verdict: Verdict, cfg: Rollout, now: float, gate_open: bool) -> bool:
    step = cfg.step(state.step_index)
    elapsed = now - state.step_started_at
    if step.kind == "pause":
        return step.pause is not None and elapsed >= step.pause
    if step.kind == "gate":
        return gate_open
    return isinstance(verdict, Healthy) and elapsed >= cfg.interval


def waiting_forever(state: RolloutState, cfg: Rollout) -> bool:
    """On a pause step without a duration (or paused by hand): only an operator moves it on."""
    if state.phase == "paused":
        return True
    if state.phase != "progressing" or not cfg.steps:
        return False
    step = cfg.step(state.step_index)
    return step.kind == "pause" and step.pause is None


def _deadline(state: RolloutState, cfg: Rollout, now: float) -> tuple[RolloutState, list[RolloutEvent]]:
    """Past `progress_deadline` without a step: stalled once (an event), rolled back if asked to."""
    limit = cfg.progress_deadline
    if limit is None or state.stalled or state.phase != "progressing" or not cfg.steps:
        return state, []
    if waiting_forever(state, cfg) or now - state.step_started_at < limit:
        return state, []
    if cfg.step(state.step_index).kind == "pause":
        return state, []  # a timed pause ends by itself: not stuck (Argo does not count pauses either)
    stalled = replace(state, stalled=True, changed_at=now)
    msg = f"rollout of {cfg.canary} stalled: no step for {limit:g}s (step {state.step_index + 1}/{len(cfg.steps)})"
    data: dict[str, JSONScalar] = {"step": state.step_index, "deadline": limit, "on_deadline": cfg.on_deadline}
    events = [RolloutEvent("stalled", now, msg, data)]
    if cfg.on_deadline == "rollback":
        stalled, more = _trip(stalled, cfg, now, f"progress deadline: no step for {limit:g}s", {}, None)
        events += more
    return stalled, events


def _advance(
    state: RolloutState,
    cfg: Rollout,
    now: float,
    record: VerdictRecord | None,
    figures: Mapping[str, JSONScalar],
    by: str | None = None,
) -> tuple[RolloutState, list[RolloutEvent]]:
    """Take the next step (the promotion after the last one)."""
    extra: dict[str, JSONScalar] = {"by": by} if by else {}
    old = ladder_weight(state, cfg) or 0.0
    nxt = state.step_index + 1
    if nxt >= len(cfg.steps) or cfg.steps[nxt] >= 100:
        # Reaching 100% is the end: nothing left to compare against, so it is the promotion.
        new = replace(
            state,
            phase="promoted",
            step_index=len(cfg.steps) - 1,
            step_started_at=now,
            changed_at=now,
            last_verdict=record or state.last_verdict,
            stalled=False,
            evidence_since=now,
        )
        msg = f"canary {cfg.canary} promoted to 100% (from {old:g}%)"
        return new, [RolloutEvent("promoted", now, msg, {"from": old, "to": 100.0, **figures, **extra})]
    new = replace(
        state,
        phase="progressing",
        step_index=nxt,
        step_started_at=now,
        changed_at=now,
        last_verdict=record or state.last_verdict,
        stalled=False,
    )
    to = cfg.steps[nxt]
    step = cfg.step(nxt)
    what = "" if step.kind == "weight" else f", {step.kind}"
    msg = f"canary {cfg.canary} weight {old:g}% -> {to:g}% (step {nxt + 1}/{len(cfg.steps)}{what})"
    data = {"from": old, "to": to, "step": nxt, "step_kind": step.kind, **figures, **extra}
    return new, [RolloutEvent("step", now, msg, data)]


def on_command(
    state: RolloutState,
    command: Command,
    cfg: Rollout,
    now: float,
    reason: str | None = None,
    *,
    full: bool = False,
) -> tuple[RolloutState, list[RolloutEvent]]:
    """Apply an operator command. Repeating a command is a no-op; one that does not apply raises
    CommandError. `promote` takes the next step (ending a pause or a gate, like Argo's promote);
    with `full` (or without steps) it goes straight to 100%."""
    why = f": {reason}" if reason else ""
    if command == "reset":
        new = initial_state(cfg, state.canary_version, now)
        msg = f"rollout of {cfg.canary} reset to the start{why}"
        return new, [RolloutEvent("reset", now, msg, {"previous_phase": state.phase})]
    if command == "rollback":
        if state.phase == "rolled_back":
            return state, []
        return _trip(state, cfg, now, f"manual rollback{why}", {}, None)
    if state.phase == "rolled_back":
        raise CommandError(f"cannot {command}: rolled back ({state.reason}); reset first")
    if state.phase == "unknown_state":
        raise CommandError(f"cannot {command}: the saved state is unknown ({state.reason}); reset first")
    if command == "pause":
        if state.phase == "paused":
            return state, []
        if state.phase != "progressing":
            raise CommandError(f"cannot pause: phase is {state.phase}")
        new = replace(state, phase="paused", changed_at=now)
        return new, [RolloutEvent("paused", now, f"rollout of {cfg.canary} paused{why}", _weight(new, cfg))]
    if command == "resume":
        if state.phase == "progressing":
            return state, []
        if state.phase != "paused":
            raise CommandError(f"cannot resume: phase is {state.phase}")
        # The paused time does not count towards the step's interval.
        new = replace(state, phase="progressing", step_started_at=now, changed_at=now)
        return new, [RolloutEvent("resumed", now, f"rollout of {cfg.canary} resumed{why}", _weight(new, cfg))]
    if command == "promote":
        if state.phase == "promoted":
            return state, []
        if not full and cfg.steps and state.phase in ("progressing", "paused"):
            return _advance(state, cfg, now, None, {}, by=f"operator{why}")
        old = ladder_weight(state, cfg)
        new = replace(
            state,
            phase="promoted",
            step_index=max(len(cfg.steps) - 1, 0),
            step_started_at=now,
            changed_at=now,
            evidence_since=now,
        )
        msg = f"canary {cfg.canary} promoted to 100% by operator{why}"
        return new, [RolloutEvent("promoted", now, msg, {"from": old, "to": 100.0})]
    raise CommandError(f"unknown command {command!r}")


def trip(
    state: RolloutState, cfg: Rollout, now: float, reason: str, data: Mapping[str, JSONScalar]
) -> tuple[RolloutState, list[RolloutEvent]]:
    """Roll back now (fast-fail path); a no-op when already rolled back, promoted or held."""
    if finished(state):
        return state, []
    return _trip(state, cfg, now, reason, data, None)


def _trip(
    state: RolloutState,
    cfg: Rollout,
    now: float,
    reason: str,
    data: Mapping[str, JSONScalar],
    record: VerdictRecord | None,
) -> tuple[RolloutState, list[RolloutEvent]]:
    old = ladder_weight(state, cfg)
    new = replace(
        state,
        phase="rolled_back",
        reason=reason,
        changed_at=now,
        last_verdict=record if record is not None else state.last_verdict,
    )
    msg = f"canary {cfg.canary} rolled back to {cfg.baseline}: {reason}"
    event_data: dict[str, JSONScalar] = {
        "canary": cfg.canary,
        "baseline": cfg.baseline,
        "from": old,
        "reason": reason,
        **data,
    }
    return new, [RolloutEvent("rollback", now, msg, event_data)]


def _weight(state: RolloutState, cfg: Rollout) -> dict[str, JSONScalar]:
    return {"weight": ladder_weight(state, cfg), "step": state.step_index}
