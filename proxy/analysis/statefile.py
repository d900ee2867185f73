"""The rollout state on disk: JSON, written atomically, so a latched rollback survives restarts."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from typing import Any, get_args

from proxy.analysis.rollout import Phase, RolloutState, VerdictRecord

FORMAT = 1
log = logging.getLogger("canary_proxy.rollout")
_PHASES: frozenset[str] = frozenset(get_args(Phase))


def state_to_dict(state: RolloutState) -> dict[str, Any]:
    """JSON-ready form of a state (also what /status shows)."""
    lv = state.last_verdict
    return {
        "phase": state.phase,
        "canary": state.canary,
        "canary_version": state.canary_version,
        "step_index": state.step_index,
        "step_started_at": state.step_started_at,
        "changed_at": state.changed_at,
        "reason": state.reason,
        "last_verdict": None if lv is None else {"kind": lv.kind, "reason": lv.reason, "at": lv.at},
        "stalled": state.stalled,
        "evidence_since": state.evidence_since,
    }


def state_from_dict(data: dict[str, Any]) -> RolloutState:
    """Inverse of state_to_dict; raises ValueError on anything malformed."""
    try:
        phase = data["phase"]
        if phase not in _PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        lv = data.get("last_verdict")
        record = None
        if lv is not None:
            record = VerdictRecord(str(lv["kind"]), str(lv["reason"]), float(lv["at"]))
        version = data.get("canary_version")
        reason = data.get("reason")
        return RolloutState(
            phase=phase,
            canary=str(data["canary"]),
            canary_version=None if version is None else str(version),
            step_index=max(int(data["step_index"]), 0),
            step_started_at=float(data["step_started_at"]),
            changed_at=float(data["changed_at"]),
            reason=None if reason is None else str(reason),
            last_verdict=record,
            stalled=bool(data.get("stalled", False)),
            evidence_since=float(data.get("evidence_since", 0.0)),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed state: {exc!r}") from exc


def load_state(path: str) -> RolloutState | None:
    """The saved state; None when the file is missing, or (with a warning) unreadable or corrupt."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable rollout state file %s: %s", path, exc)
        return None
    try:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"expected a JSON object with format {FORMAT}")
        return state_from_dict(data)
    except ValueError as exc:
        log.warning("ignoring corrupt rollout state file %s: %s", path, exc)
        return None


def save_state(path: str, state: RolloutState) -> None:
    """Write the state atomically: a temp file in the same directory, fsync, os.replace."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    payload = json.dumps({"format": FORMAT, **state_to_dict(state)}, indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide it from a non-root operator
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable.
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
