"""The rollout state machine and its effect on splits and targets (pure functions)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.analysis.rollout import (
    COMMANDS,
    CommandError,
    RolloutState,
    canary_weight,
    initial_state,
    on_command,
    on_verdict,
    reconcile,
)
from proxy.analysis.splits import effective_split, effective_target
from proxy.analysis.verdict import Breach, Figures, Healthy, InsufficientData
from proxy.config.model import Rollout

STEPS = Rollout(canary="canary", baseline="stable", steps=(5, 10, 25, 50, 100), interval=30.0)
STEADY = Rollout(canary="canary", baseline="stable")
FIG = Figures(500, 5000, 5, 50, 0.01, 0.01, 0.1, 0.1)
HEALTHY = Healthy(FIG)
BREACH = Breach("canary error rate 10.0% > 5.0%", FIG)
SHORT = InsufficientData("canary has 3 requests in 60s, need 100", FIG)


def advance(state: RolloutState, now: float, cfg: Rollout = STEPS) -> RolloutState:
    new, _ = on_verdict(state, HEALTHY, cfg, now)
    return new


def test_initial_state() -> None:
    s = initial_state(STEPS, "v2", 100.0)
    assert (s.phase, s.step_index, s.step_started_at, s.canary_version) == ("progressing", 0, 100.0, "v2")
    assert canary_weight(s, STEPS) == 5
    steady = initial_state(STEADY, None, 100.0)
    assert steady.phase == "steady" and canary_weight(steady, STEADY) is None


def test_advances_one_step_per_interval_while_healthy() -> None:
    s = initial_state(STEPS, None, 0.0)
    assert advance(s, 29.9) == s  # interval not over yet
    s, events = on_verdict(s, HEALTHY, STEPS, 30.0)
    assert (s.step_index, s.step_started_at) == (1, 30.0)
    assert [e.kind for e in events] == ["step"]
    assert events[0].data["from"] == 5 and events[0].data["to"] == 10
    assert "5% -> 10%" in events[0].message
    assert s.last_verdict is not None and s.last_verdict.kind == "healthy"
    assert advance(s, 59.0).step_index == 1
    s = advance(advance(s, 60.0), 90.0)
    assert (s.phase, s.step_index, canary_weight(s, STEPS)) == ("progressing", 3, 50)
    # The next step is 100%: that is the promotion.
    s, events = on_verdict(s, HEALTHY, STEPS, 120.0)
    assert s.phase == "promoted" and canary_weight(s, STEPS) == 100
    assert [e.kind for e in events] == ["promoted"]


def test_steps_ending_below_100_promote_after_the_last_step() -> None:
    cfg = replace(STEPS, steps=(10, 50))
    s = advance(initial_state(cfg, None, 0.0), 30.0, cfg)
    assert (s.phase, canary_weight(s, cfg)) == ("progressing", 50)
    s = advance(s, 60.0, cfg)
    assert s.phase == "promoted" and s.step_index == 1


def test_insufficient_data_holds_then_a_healthy_verdict_advances() -> None:
    s = initial_state(STEPS, None, 0.0)
    held, events = on_verdict(s, SHORT, STEPS, 500.0)
    assert held == s and events == []
    assert advance(held, 501.0).step_index == 1


def test_breach_rolls_back_and_latches() -> None:
    s = advance(initial_state(STEPS, "v2", 0.0), 30.0)
    s, events = on_verdict(s, BREACH, STEPS, 40.0)
    assert s.phase == "rolled_back" and s.reason == BREACH.reason
    assert canary_weight(s, STEPS) == 0
    assert [e.kind for e in events] == ["rollback"]
    assert events[0].data["from"] == 10 and events[0].data["canary_requests"] == 500
    # Latched: healthy verdicts, more time, pause/resume/promote change nothing.
    assert on_verdict(s, HEALTHY, STEPS, 10_000.0) == (s, [])
    for cmd in COMMANDS[:3]:
        with pytest.raises(CommandError, match="reset first"):
            on_command(s, cmd, STEPS, 50.0)
    assert on_command(s, "rollback", STEPS, 50.0) == (s, [])


def test_breach_while_paused_or_steady_still_rolls_back() -> None:
    paused, _ = on_command(initial_state(STEPS, None, 0.0), "pause", STEPS, 1.0)
    assert on_verdict(paused, BREACH, STEPS, 2.0)[0].phase == "rolled_back"
    steady = initial_state(STEADY, None, 0.0)
    assert on_verdict(steady, BREACH, STEADY, 2.0)[0].phase == "rolled_back"
    assert on_verdict(steady, HEALTHY, STEADY, 1e9) == (steady, [])


def test_promoted_stops_the_analysis() -> None:
    s, _ = on_command(initial_state(STEPS, None, 0.0), "promote", STEPS, 1.0, full=True)
    assert on_verdict(s, BREACH, STEPS, 2.0) == (s, [])
    # ...but an operator can still roll back.
    assert on_command(s, "rollback", STEPS, 3.0, "bad metrics")[0].reason == "manual rollback: bad metrics"


def test_pause_freezes_and_resume_restarts_the_interval() -> None:
    s = initial_state(STEPS, None, 0.0)
    s, events = on_command(s, "pause", STEPS, 10.0, "investigating")
    assert s.phase == "paused" and events[0].kind == "paused" and "investigating" in events[0].message
    assert on_command(s, "pause", STEPS, 11.0) == (s, [])
    assert advance(s, 1000.0) == s
    s, events = on_command(s, "resume", STEPS, 1000.0)
    assert (s.phase, s.step_started_at, events[0].kind) == ("progressing", 1000.0, "resumed")
    assert advance(s, 1020.0).step_index == 0
    assert advance(s, 1030.0).step_index == 1
    with pytest.raises(CommandError):
        on_command(initial_state(STEADY, None, 0.0), "pause", STEADY, 1.0)
    with pytest.raises(CommandError):
        on_command(initial_state(STEADY, None, 0.0), "resume", STEADY, 1.0)


def test_promote_rollback_reset() -> None:
    s = initial_state(STEPS, "v2", 0.0)
    p, events = on_command(s, "promote", STEPS, 5.0, full=True)
    assert p.phase == "promoted" and canary_weight(p, STEPS) == 100 and events[0].kind == "promoted"
    r, events = on_command(p, "rollback", STEPS, 6.0)
    assert r.phase == "rolled_back" and r.reason == "manual rollback" and events[0].kind == "rollback"
    fresh, events = on_command(r, "reset", STEPS, 7.0)
    assert fresh == initial_state(STEPS, "v2", 7.0)
    assert events[0].kind == "reset" and events[0].data["previous_phase"] == "rolled_back"
    steady_promoted, _ = on_command(initial_state(STEADY, None, 0.0), "promote", STEADY, 1.0)
    assert canary_weight(steady_promoted, STEADY) == 100


def test_reconcile() -> None:
    rolled, _ = on_command(advance(initial_state(STEPS, "v2", 0.0), 30.0), "rollback", STEPS, 31.0)
    # Same canary and version: the latch holds across reloads/restarts.
    assert reconcile(rolled, STEPS, "v2", 500.0) == rolled
    # A new version starts afresh.
    assert reconcile(rolled, STEPS, "v3", 500.0) == initial_state(STEPS, "v3", 500.0)
    # Another upstream as canary, or no saved state, too.
    assert reconcile(rolled, replace(STEPS, canary="other"), "v2", 5.0).phase == "progressing"
    # (a first start keeps what the windows hold: nothing of another version can be there)
    assert reconcile(None, STEADY, None, 5.0) == replace(initial_state(STEADY, None, 5.0), evidence_since=0.0)
    # A new version, a reset and a promotion start the canary's evidence afresh.
    assert reconcile(rolled, STEPS, "v3", 500.0).evidence_since == 500.0
    assert on_command(rolled, "reset", STEPS, 600.0)[0].evidence_since == 600.0
    fresh = initial_state(STEPS, "v2", 0.0)
    assert on_command(fresh, "promote", STEPS, 700.0, full=True)[0].evidence_since == 700.0
    # Fewer steps: clamp; no steps: steady; steps added: progressing from 0.
    at3 = replace(initial_state(STEPS, "v2", 0.0), step_index=3)
    assert reconcile(at3, replace(STEPS, steps=(5, 10)), "v2", 9.0).step_index == 1
    assert reconcile(at3, STEADY, "v2", 9.0).phase == "steady"
    back = reconcile(initial_state(STEADY, "v2", 0.0), STEPS, "v2", 9.0)
    assert (back.phase, back.step_index, back.step_started_at) == ("progressing", 0, 9.0)


# -- routing effect -------------------------------------------------------------------------------


def state_at(step: int, cfg: Rollout = STEPS) -> RolloutState:
    return replace(initial_state(cfg, None, 0.0), step_index=step)


def test_effective_split_rolled_back_gives_the_canary_share_to_the_baseline() -> None:
    rolled, _ = on_command(state_at(1), "rollback", STEPS, 1.0)
    split = (("stable", 80.0), ("canary", 20.0))
    assert effective_split(split, STEPS, rolled) == (("stable", 100.0), ("canary", 0.0))
    three = (("canary", 10.0), ("other", 30.0))
    assert effective_split(three, STEPS, rolled) == (("canary", 0.0), ("other", 30.0), ("stable", 10.0))
    # Rolled back without steps too (steady watching).
    steady_rolled, _ = on_command(initial_state(STEADY, None, 0.0), "rollback", STEADY, 1.0)
    assert effective_split(split, STEADY, steady_rolled) == (("stable", 100.0), ("canary", 0.0))


def test_effective_split_with_steps_keeps_order_and_proportions() -> None:
    split = (("stable", 60.0), ("canary", 10.0), ("legacy", 30.0))
    out = effective_split(split, STEPS, state_at(2))  # 25%
    assert [n for n, _ in out] == ["stable", "canary", "legacy"]
    weights = dict(out)
    assert weights["canary"] == pytest.approx(25.0)
    assert weights["stable"] == pytest.approx(75.0 * 60 / 90)
    assert weights["legacy"] == pytest.approx(75.0 * 30 / 90)
    assert sum(weights.values()) == pytest.approx(100.0, abs=1e-9)
    # The others all zero: the rest goes to the baseline.
    assert effective_split((("canary", 100.0),), STEPS, state_at(0)) == (("canary", 5.0), ("stable", 95.0))
    promoted, _ = on_command(state_at(0), "promote", STEPS, 1.0, full=True)
    assert dict(effective_split(split, STEPS, promoted)) == {"stable": 0.0, "canary": 100.0, "legacy": 0.0}


def test_effective_split_unchanged_when_the_rollout_does_not_apply() -> None:
    split = (("stable", 90.0), ("canary", 10.0))
    assert effective_split(split, None, None) == split
    assert effective_split(split, STEADY, initial_state(STEADY, None, 0.0)) == split
    other = (("a", 50.0), ("b", 50.0))
    rolled, _ = on_command(state_at(1), "rollback", STEPS, 1.0)
    assert effective_split(other, STEPS, rolled) == other


def _canary_range(split: tuple[tuple[str, float], ...]) -> tuple[float, float]:
    lo = 0.0
    for name, w in split:
        if name == "canary":
            return lo, lo + w
        lo += w
    raise AssertionError("no canary")


@pytest.mark.parametrize(
    "split", [(("canary", 50.0), ("stable", 50.0)), (("stable", 50.0), ("canary", 50.0))]
)
def test_raising_the_canary_keeps_order_and_only_adds_buckets(split: tuple[tuple[str, float], ...]) -> None:
    at5 = effective_split(split, STEPS, state_at(0))
    at10 = effective_split(split, STEPS, state_at(1))
    assert [n for n, _ in at5] == [n for n, _ in at10] == [n for n, _ in split]
    lo5, hi5 = _canary_range(at5)
    lo10, hi10 = _canary_range(at10)
    assert hi5 - lo5 == pytest.approx(5.0) and hi10 - lo10 == pytest.approx(10.0)
    assert lo10 <= lo5 + 1e-9 and hi5 <= hi10 + 1e-9  # everyone in the canary stays there


@given(
    weights=st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=5),
    canary_pos=st.integers(min_value=0, max_value=5),
    step=st.integers(min_value=0, max_value=4),
    rolled=st.booleans(),
)
def test_effective_split_properties(weights: list[int], canary_pos: int, step: int, rolled: bool) -> None:
    names = [f"u{i}" for i in range(len(weights))]
    names.insert(min(canary_pos, len(names)), "canary")
    raw = [float(w) for w in weights]
    raw.insert(min(canary_pos, len(raw)), 10.0)
    total = sum(raw)
    split = tuple((n, w * 100 / total) for n, w in zip(names, raw, strict=True))
    state = state_at(step)
    if rolled:
        state, _ = on_command(state, "rollback", STEPS, 1.0)
    out = effective_split(split, STEPS, state)
    assert [n for n, _ in out][: len(split)] == names  # order kept; at most the baseline appended
    assert len(out) <= len(split) + 1
    assert sum(w for _, w in out) == pytest.approx(100.0, abs=1e-9)
    assert all(w >= 0 for _, w in out)
    assert dict(out)["canary"] == pytest.approx(0.0 if rolled else STEPS.steps[step])


def test_effective_target() -> None:
    rolled, _ = on_command(state_at(0), "rollback", STEPS, 1.0)
    assert effective_target("canary", STEPS, rolled) == "stable"
    assert effective_target("other", STEPS, rolled) == "other"
    assert effective_target("canary", STEPS, state_at(0)) == "canary"
    assert effective_target("canary", None, None) == "canary"
