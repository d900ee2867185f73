"""The rollout state on disk: JSON, written atomically, so a latched rollback survives restarts."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import stat
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


MAX_STATE_BYTES = 1 << 20  # a real state file is < 1 KiB; anything this big is not ours
MAX_STEP_INDEX = 10_000


def _num(data: dict[str, Any], key: str) -> float:
    x = data[key]
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        raise ValueError(f"{key} must be a finite number, got {x!r:.40}")
    return float(x)


def _opt_str(data: dict[str, Any], key: str) -> str | None:
    x = data.get(key)
    if x is not None and not isinstance(x, str):
        raise ValueError(f"{key} must be a string or null, got {type(x).__name__}")
    return x


def state_from_dict(data: dict[str, Any]) -> RolloutState:
    """Inverse of state_to_dict; raises ValueError on anything malformed or out of range."""
    try:
        if not isinstance(data, dict):
            raise ValueError(f"expected an object, got {type(data).__name__}")
        phase = data["phase"]
        if not isinstance(phase, str) or phase not in _PHASES:
            raise ValueError(f"unknown phase {phase!r:.40}")
        if not isinstance(data["canary"], str):
            raise ValueError("canary must be a string")
        step = data["step_index"]
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP_INDEX:
            raise ValueError(f"step_index must be an integer in 0..{MAX_STEP_INDEX}, got {step!r:.40}")
        lv = data.get("last_verdict")
        record = None
        if lv is not None:
            if not isinstance(lv, dict):
                raise ValueError("last_verdict must be an object or null")
            record = VerdictRecord(str(lv["kind"])[:200], str(lv["reason"])[:2000], _num(lv, "at"))
        return RolloutState(
            phase=phase,  # type: ignore[arg-type]  # checked against Phase above
            canary=data["canary"],
            canary_version=_opt_str(data, "canary_version"),
            step_index=step,
            step_started_at=_num(data, "step_started_at"),
            changed_at=_num(data, "changed_at"),
            reason=_opt_str(data, "reason"),
            last_verdict=record,
            stalled=bool(data.get("stalled", False)),
            evidence_since=float(data.get("evidence_since", 0.0)),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed state: {exc!r}") from exc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid number here")


def read_state(path: str) -> tuple[RolloutState | None, str | None]:
    """(state, None); (None, None) when the file is missing; (None, problem) when it exists but
    cannot be used: not a regular file, unreadable, too big, not JSON, wrong shape, out of range.
    Never raises: a bad file must neither crash the proxy nor be mistaken for "no file"."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot stat: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file"
    if st.st_size > MAX_STATE_BYTES:
        return None, f"too big ({st.st_size} bytes)"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STATE_BYTES + 1)
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"expected a JSON object with format {FORMAT}")
        return state_from_dict(data), None
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    except RecursionError:
        return None, "nested too deeply"
    except (ValueError, OverflowError, MemoryError) as exc:  # UnicodeDecodeError is a ValueError
        return None, f"corrupt: {str(exc)[:200]}"


def set_aside(path: str, now: float) -> str | None:
    """Rename a bad state file out of the way (never overwrite it); the new name, or None."""
    aside = f"{path}.bad-{int(now)}"
    n = 0
    while os.path.lexists(aside):
        n += 1
        aside = f"{path}.bad-{int(now)}-{n}"
    try:
        os.rename(path, aside)
    except OSError as exc:
        log.error("could not move the bad rollout state file %s aside: %s", path, exc.strerror or exc)
        return None
    return aside


def load_state(path: str) -> RolloutState | None:
    """The saved state; None when the file is missing, or (with a warning) unreadable or corrupt.
    (The controller uses read_state: it holds the rollout on a bad file instead.)"""
    state, problem = read_state(path)
    if problem is not None:
        log.warning("ignoring unusable rollout state file %s: %s", path, problem)
    return state


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
