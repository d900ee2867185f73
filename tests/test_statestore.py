"""StateStore and read_state: a latch is never lost to a failed write or a bad file (issue 12)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.analysis.rollout import RolloutState, on_command
from proxy.analysis.statefile import read_state, save_state
from proxy.analysis.statestore import DurableStateFile
from proxy.config.model import Rollout

ROLLED_BACK = RolloutState("rolled_back", "canary", "v2", 1, 10.0, 20.0, reason="bad")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"format": 1, "phase": "steady", "canary": "c", "step_index": true,'
         ' "step_started_at": 0, "changed_at": 0}', "step_index"),
        ('{"format": 1, "phase": "steady", "canary": "c", "step_index": -1,'
         ' "step_started_at": 0, "changed_at": 0}', "step_index"),
        ('{"format": 1, "phase": "steady", "canary": "c", "step_index": 0,'
         ' "step_started_at": NaN, "changed_at": 0}', "corrupt"),
        ('{"format": 1, "phase": "steady", "canary": 7, "step_index": 0,'
         ' "step_started_at": 0, "changed_at": 0}', "canary"),
        ('{"format": 1, "phase": "steady", "canary": "c", "step_index": 1' + "0" * 5000 + ","
         ' "step_started_at": 0, "changed_at": 0}', "corrupt"),
        ("[" * 100_000, "nested"),
    ],
)
def test_bad_contents_are_a_problem_not_an_exception(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(content)
    state, why = read_state(str(path))
    assert state is None and why is not None and problem in why, why


def test_missing_is_not_a_problem_but_a_fifo_is(tmp_path: Path) -> None:
    assert read_state(str(tmp_path / "none.json")) == (None, None)
    os.mkfifo(tmp_path / "fifo")
    assert read_state(str(tmp_path / "fifo")) == (None, "not a regular file")


def test_a_failed_write_stays_pending_until_it_succeeds(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")  # the state file's directory is a file: every write fails
    store = DurableStateFile(str(blocker / "state.json"), clock=lambda: 100.0)
    assert store.save(ROLLED_BACK) is False
    assert not store.durable and store.error and store.failures == 1
    assert store.retry() is False and store.failures == 2
    blocker.unlink()
    assert store.retry() is True
    assert store.durable and store.error is None
    assert read_state(str(blocker / "state.json")) == (ROLLED_BACK, None)


def test_a_bad_file_gives_a_held_state_and_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{trunc")
    store = DurableStateFile(str(path), clock=lambda: 1234.0)
    dry = store.load("canary", "v2", set_aside=False)
    assert dry is not None and dry.phase == "unknown_state" and path.exists()
    held = store.load("canary", "v2")
    assert held is not None and held.phase == "unknown_state" and held.canary_version == "v2"
    assert not path.exists() and (tmp_path / "state.json.bad-1234").read_text() == "{trunc"
    # Reset is the way out; the other commands refuse.
    cfg = Rollout(canary="canary", baseline="stable", steps=(5.0, 50.0))
    new, events = on_command(held, "reset", cfg, 2000.0)
    assert new.phase == "progressing" and events[0].kind == "reset"


def test_save_then_read_round_trip_keeps_unknown_state(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    held = RolloutState("unknown_state", "canary", None, 0, 1.0, 1.0, reason="x")
    save_state(str(path), held)
    assert read_state(str(path)) == (held, None)
