"""The state file: round trip, atomic replacement, and tolerance of missing or corrupt files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from proxy.analysis.rollout import RolloutState, VerdictRecord
from proxy.analysis.statefile import load_state, save_state

STATE = RolloutState(
    phase="rolled_back",
    canary="canary",
    canary_version="v2",
    step_index=2,
    step_started_at=1700000000.5,
    changed_at=1700000042.25,
    reason="canary error rate 10.0% > 5.0% (z=4.0 at 99%)",
    last_verdict=VerdictRecord("breach", "canary error rate 10.0% > 5.0%", 1700000042.25),
)


def test_round_trip_creates_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "state.json"
    save_state(str(path), STATE)
    assert load_state(str(path)) == STATE
    data = json.loads(path.read_text())
    assert data["format"] == 1 and data["phase"] == "rolled_back"
    plain = RolloutState("steady", "canary", None, 0, 1.0, 1.0)
    save_state(str(path), plain)
    assert load_state(str(path)) == plain


def test_missing_file_is_none(tmp_path: Path) -> None:
    assert load_state(str(tmp_path / "nope.json")) is None


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"format": 2, "phase": "steady"}',
        '{"format": 1, "phase": "exploded", "canary": "c", "step_index": 0,'
        ' "step_started_at": 0, "changed_at": 0}',
        '{"format": 1, "phase": "steady"}',
        '{"format": 1, "phase": "steady", "canary": "c", "step_index": "x",'
        ' "step_started_at": 0, "changed_at": 0}',
    ],
)
def test_corrupt_file_warns_and_is_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    path = tmp_path / "state.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="canary_proxy.rollout"):
        assert load_state(str(path)) is None
    assert "state file" in caplog.text


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    save_state(str(path), STATE)
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    # A failure before the rename leaves the previous file exactly as it was.
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_state(str(path), RolloutState("steady", "canary", None, 0, 1.0, 1.0))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["state.json"]
    save_state(str(path), STATE)
    assert os.listdir(tmp_path) == ["state.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
