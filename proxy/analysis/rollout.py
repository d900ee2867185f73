"""The rollout state machine and its effect on routing. Pure: functions of (state, input, cfg, now).

Phases:
- "progressing": stepping through `steps`, one step per `interval` while the verdict is healthy;
- "paused": an operator froze the step (a breach still rolls back);
- "steady": a rollout without steps, the configured weights stay and the verdict is only watched;
- "promoted": the canary has 100% of every split it is in; analysis stops;
- "rolled_back": latched: the canary gets nothing until `reset` or a new canary version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from proxy.analysis.verdict import Breach, Healthy, Verdict
from proxy.config.model import Rollout

Phase = Literal["progressing", "steady", "paused", "promoted", "rolled_back"]
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

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"event": self.kind, "at": self.at, "message": self.message, "data": dict(self.data)}


def initial_state(cfg: Rollout, canary_version: str | None, now: float) -> RolloutState:
    """A fresh rollout: step 0 when there are steps, otherwise steady watching."""
    phase: Phase = "progressing" if cfg.steps else "steady"
    return RolloutState(phase, cfg.canary, canary_version, 0, now, now)


def reconcile(
    saved: RolloutState | None, cfg: Rollout, canary_version: str | None, now: float
) -> RolloutState:
    """Carry a saved/previous state over to this config.

    A different canary (name or version) starts afresh, which is what clears a latched rollback
    on a new release. Otherwise step and latch are kept; the step index is clamped when the steps
    got shorter, and the phase follows steps appearing or disappearing.
    """
    if saved is None or saved.canary != cfg.canary or saved.canary_version != canary_version:
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


def canary_weight(state: RolloutState | None, cfg: Rollout | None) -> float | None:
    """The canary's share (0..100) the rollout imposes, or None to keep the configured weights."""
    if state is None or cfg is None:
        return None
    if state.phase == "rolled_back":
        return 0.0
    if state.phase == "promoted":
        return 100.0
    if state.phase in ("progressing", "paused") and cfg.steps:
        return min(cfg.steps[min(state.step_index, len(cfg.steps) - 1)], 100.0)
    return None


def on_verdict(
    state: RolloutState, verdict: Verdict, cfg: Rollout, now: float
) -> tuple[RolloutState, list[RolloutEvent]]:
    """Apply one verdict: trip on a breach, advance a step when healthy and the interval is over."""
    if state.phase in ("rolled_back", "promoted"):
        return state, []
    record = VerdictRecord(verdict.kind, verdict.reason, now)
    figures = verdict.figures.as_dict()
    if isinstance(verdict, Breach):
        return _trip(state, cfg, now, verdict.reason, figures, record)
    if state.phase != "progressing" or not isinstance(verdict, Healthy):
        return state, []
    if now - state.step_started_at < cfg.interval:
        return state, []
    old = canary_weight(state, cfg) or 0.0
    nxt = state.step_index + 1
    if nxt >= len(cfg.steps) or cfg.steps[nxt] >= 100:
        # Reaching 100% is the end: nothing left to compare against, so it is the promotion.
        new = replace(
            state,
            phase="promoted",
            step_index=len(cfg.steps) - 1,
            step_started_at=now,
            changed_at=now,
            last_verdict=record,
        )
        msg = f"canary {cfg.canary} promoted to 100% (from {old:g}%)"
        return new, [RolloutEvent("promoted", now, msg, {"from": old, "to": 100.0, **figures})]
    new = replace(state, step_index=nxt, step_started_at=now, changed_at=now, last_verdict=record)
    to = cfg.steps[nxt]
    msg = f"canary {cfg.canary} weight {old:g}% -> {to:g}% (step {nxt + 1}/{len(cfg.steps)})"
    return new, [RolloutEvent("step", now, msg, {"from": old, "to": to, "step": nxt, **figures})]


def on_command(
    state: RolloutState, command: Command, cfg: Rollout, now: float, reason: str | None = None
) -> tuple[RolloutState, list[RolloutEvent]]:
    """Apply an operator command. Repeating a command is a no-op; one that does not apply raises
    CommandError."""
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
        old = canary_weight(state, cfg)
        new = replace(
            state,
            phase="promoted",
            step_index=max(len(cfg.steps) - 1, 0),
            step_started_at=now,
            changed_at=now,
        )
        msg = f"canary {cfg.canary} promoted to 100% by operator{why}"
        return new, [RolloutEvent("promoted", now, msg, {"from": old, "to": 100.0})]
    raise CommandError(f"unknown command {command!r}")


def trip(
    state: RolloutState, cfg: Rollout, now: float, reason: str, data: Mapping[str, JSONScalar]
) -> tuple[RolloutState, list[RolloutEvent]]:
    """Roll back now (fast-fail path); a no-op when already rolled back or promoted."""
    if state.phase in ("rolled_back", "promoted"):
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
    old = canary_weight(state, cfg)
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
    return {"weight": canary_weight(state, cfg), "step": state.step_index}


def effective_split(
    route_split: tuple[tuple[str, float], ...], cfg: Rollout | None, state: RolloutState | None
) -> tuple[tuple[str, float], ...]:
    """The split the router uses, given the rollout. Keeps entry order (the bucket layout).

    - rolled back: the canary gets 0 and its configured share goes to the baseline (appended at
      the end when the split has no baseline entry);
    - with steps / promoted: the canary gets the step's weight (100 when promoted), the rest is
      spread over the other entries in proportion to their configured weights (all zero: to the
      baseline);
    - otherwise (no rollout, steady, split without the canary): unchanged.
    The total stays what the config says (100).
    """
    if cfg is None or state is None or all(name != cfg.canary for name, _ in route_split):
        return route_split
    weight = canary_weight(state, cfg)
    if weight is None:
        return route_split
    total = sum(w for _, w in route_split)
    entries = list(route_split)
    if state.phase == "rolled_back":
        share = sum(w for name, w in entries if name == cfg.canary)
        out = [(name, 0.0 if name == cfg.canary else w) for name, w in entries]
        return _give(out, cfg.baseline, share)
    canary_total = total * weight / 100.0
    rest = total - canary_total
    others = sum(w for name, w in entries if name != cfg.canary)
    first_canary = True
    out = []
    for name, w in entries:
        if name == cfg.canary:
            # A split naming the canary twice: the first entry carries the share.
            out.append((name, canary_total if first_canary else 0.0))
            first_canary = False
        elif others > 0:
            out.append((name, rest * w / others))
        else:
            out.append((name, 0.0))
    if others > 0:
        return _fix_sum(out, total)
    return _give(out, cfg.baseline, rest)


def _give(entries: list[tuple[str, float]], name: str, share: float) -> tuple[tuple[str, float], ...]:
    """Add `share` to the first entry called `name`, or append one."""
    for i, (n, w) in enumerate(entries):
        if n == name:
            entries[i] = (n, w + share)
            return tuple(entries)
    if share > 0:
        entries.append((name, share))
    return tuple(entries)


def _fix_sum(entries: list[tuple[str, float]], total: float) -> tuple[tuple[str, float], ...]:
    """Put the float rounding residue on the largest entry so the weights add up exactly."""
    residue = total - sum(w for _, w in entries)
    if residue and entries:
        i = max(range(len(entries)), key=lambda k: entries[k][1])
        name, w = entries[i]
        entries[i] = (name, max(w + residue, 0.0))
    return tuple(entries)


def effective_target(to: str, cfg: Rollout | None, state: RolloutState | None) -> str:
    """A route's `to` upstream, given the rollout: the canary goes to the baseline when rolled back."""
    if cfg is not None and state is not None and state.phase == "rolled_back" and to == cfg.canary:
        return cfg.baseline
    return to
