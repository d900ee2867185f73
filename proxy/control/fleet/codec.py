"""The JSON documents fleet mode keeps in Redis, read defensively: anything foreign is a ValueError."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from proxy.analysis.rollout import JSONScalar, RolloutEvent, RolloutState
from proxy.analysis.statefile import state_from_dict, state_to_dict

MAX_DOC = 1 << 20  # a state document is a few hundred bytes; anything huge is not ours


@dataclass(frozen=True, slots=True)
class RemoteState:
    """One version of a rollout's fleet state."""

    version: int
    state: RolloutState
    by: str
    at: float
    events: tuple[RolloutEvent, ...] = ()


def encode_state(state: RolloutState, by: str, at: float, events: list[RolloutEvent]) -> str:
    """The state document without its version (the write script adds `v`)."""
    doc = {"state": state_to_dict(state), "by": by, "at": at, "events": [e.to_dict() for e in events]}
    return json.dumps(doc, separators=(",", ":"), default=str)


def decode_state(raw: object) -> RemoteState:
    """Parse a state document; ValueError on anything that is not one of ours."""
    doc = _object(raw)
    version = doc.get("v")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"bad version {version!r:.40}")
    state_doc = doc.get("state")
    if not isinstance(state_doc, dict):
        raise ValueError("no state object")
    state = state_from_dict(state_doc)
    if state.phase == "held":
        raise ValueError("phase held is never stored")
    for number in (state.step_started_at, state.changed_at):
        if not math.isfinite(number):
            raise ValueError("non-finite time")
    events: list[RolloutEvent] = []
    raw_events = doc.get("events")
    for item in raw_events if isinstance(raw_events, list) else []:
        if isinstance(item, dict) and isinstance(item.get("event"), str):
            data = item.get("data")
            events.append(
                RolloutEvent(
                    item["event"][:40],
                    _number(item.get("at")),
                    str(item.get("message", ""))[:500],
                    _scalars(data) if isinstance(data, dict) else {},
                    str(item["rollout"])[:100] if isinstance(item.get("rollout"), str) else None,
                )
            )
    return RemoteState(version, state, str(doc.get("by", "?"))[:100], _number(doc.get("at")), tuple(events))


def decode_json(raw: object) -> dict[str, Any]:
    """A JSON object from Redis (verdict, replica report); ValueError otherwise."""
    return _object(raw)


def _object(raw: object) -> dict[str, Any]:
    if not isinstance(raw, str) or len(raw) > MAX_DOC:
        raise ValueError("not a JSON document of ours")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def _number(value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return 0.0


def _scalars(data: dict[Any, Any]) -> dict[str, JSONScalar]:
    out: dict[str, JSONScalar] = {}
    for key, value in list(data.items())[:50]:
        if value is None or isinstance(value, (bool, int, float, str)):
            out[str(key)[:100]] = value[:500] if isinstance(value, str) else value
    return out
