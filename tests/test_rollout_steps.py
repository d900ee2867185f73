"""Step objects, progress deadlines and observe mode in the pure state machine, and the config keys
of issue 17 (`rollouts:`, step objects, checks, webhooks) with their key-path errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from proxy.analysis.checks import CheckResult, combine, first_sample, judge_value, render_query
from proxy.analysis.rollout import (
    RolloutState,
    canary_weight,
    initial_state,
    ladder_weight,
    on_command,
    on_verdict,
)
from proxy.analysis.splits import effective_split, effective_target
from proxy.analysis.steps import judging, stamp
from proxy.analysis.verdict import Breach, Figures, Healthy, InsufficientData
from proxy.config import ConfigError, parse_config
from proxy.config.model import Check, Gate, Rollout, Step

FIG = Figures(500, 500, 0, 0, 0.0, 0.0, 0.01, 0.01)
HEALTHY = Healthy(FIG)
BREACH = Breach("canary error rate 10.0% > 5.0%", FIG)
LOW = InsufficientData("canary has 3 of 100 requests", FIG)


def ladder(*steps: Step, **kw: object) -> Rollout:
    return Rollout(
        canary="canary",
        baseline="stable",
        steps=tuple(s.weight for s in steps),
        step_specs=steps,
        interval=10.0,
        **kw,  # type: ignore[arg-type]
    )


W = lambda w: Step("weight", w)  # noqa: E731
PAUSE_10 = Step("pause", 10.0, pause=60.0)
PAUSE_FOREVER = Step("pause", 10.0)
GATE = Step("gate", 10.0, gate=Gate("http://127.0.0.1:1/gate"))


def test_timed_pause_waits_its_duration_even_without_evidence() -> None:
    cfg = ladder(W(10), PAUSE_10, W(50))
    s = initial_state(cfg, None, 0.0)
    s, events = on_verdict(s, HEALTHY, cfg, 10.0)
    assert (s.step_index, events[0].data["step_kind"]) == (1, "pause")
    assert canary_weight(s, cfg) == 10.0  # a pause keeps the weight before it
    assert on_verdict(s, LOW, cfg, 69.0)[0].step_index == 1
    s, events = on_verdict(s, LOW, cfg, 70.0)  # time is up: a pause needs no verdict
    assert (s.step_index, canary_weight(s, cfg)) == (2, 50.0)


def test_indefinite_pause_waits_for_promote_and_full_goes_to_100() -> None:
    cfg = ladder(W(10), PAUSE_FOREVER, W(50), W(80))
    s, _ = on_verdict(initial_state(cfg, None, 0.0), HEALTHY, cfg, 10.0)
    assert s.step_index == 1
    assert on_verdict(s, HEALTHY, cfg, 1e9) == (s, [])  # healthy for ever: still waiting
    s, events = on_command(s, "promote", cfg, 100.0, "looks good")
    assert (s.phase, s.step_index, canary_weight(s, cfg)) == ("progressing", 2, 50.0)
    assert events[0].kind == "step" and events[0].data["by"] == "operator: looks good"
    s, events = on_command(s, "promote", cfg, 101.0, full=True)
    assert (s.phase, canary_weight(s, cfg), events[0].kind) == ("promoted", 100.0, "promoted")


def test_promote_from_the_last_step_and_from_paused() -> None:
    cfg = ladder(W(10), W(50))
    s = initial_state(cfg, None, 0.0)
    paused, _ = on_command(s, "pause", cfg, 1.0)
    moved, _ = on_command(paused, "promote", cfg, 2.0)
    assert (moved.phase, moved.step_index) == ("progressing", 1)  # promote also resumes
    done, events = on_command(moved, "promote", cfg, 3.0)
    assert done.phase == "promoted" and events[0].kind == "promoted"


def test_gate_opens_only_when_told_and_a_breach_still_rolls_back() -> None:
    cfg = ladder(W(10), GATE, W(50))
    s, _ = on_verdict(initial_state(cfg, None, 0.0), HEALTHY, cfg, 10.0)
    assert cfg.step(s.step_index).kind == "gate"
    assert on_verdict(s, HEALTHY, cfg, 1e6, gate_open=False)[0] == s
    opened, events = on_verdict(s, HEALTHY, cfg, 11.0, gate_open=True)
    assert opened.step_index == 2 and events[0].kind == "step"
    tripped, events = on_verdict(s, BREACH, cfg, 12.0, gate_open=False)
    assert tripped.phase == "rolled_back" and events[0].kind == "rollback"


def test_progress_deadline_marks_stalled_once_and_rolls_back_when_asked() -> None:
    cfg = ladder(W(10), W(50), progress_deadline=100.0)
    s = initial_state(cfg, None, 0.0)
    assert on_verdict(s, LOW, cfg, 99.0) == (s, [])
    stalled, events = on_verdict(s, LOW, cfg, 100.0)
    assert stalled.stalled and stalled.phase == "progressing" and [e.kind for e in events] == ["stalled"]
    assert on_verdict(stalled, LOW, cfg, 200.0) == (stalled, [])  # once
    moved, _ = on_verdict(stalled, HEALTHY, cfg, 201.0)
    assert not moved.stalled  # a step clears it
    cfg_rb = replace(cfg, on_deadline="rollback")
    gone, events = on_verdict(s, LOW, cfg_rb, 100.0)
    assert gone.phase == "rolled_back" and [e.kind for e in events] == ["stalled", "rollback"]
    assert "progress deadline" in (gone.reason or "")


def test_no_deadline_while_waiting_for_a_person() -> None:
    cfg = ladder(W(10), PAUSE_FOREVER, W(50), progress_deadline=10.0, on_deadline="rollback")
    s, _ = on_verdict(initial_state(cfg, None, 0.0), HEALTHY, cfg, 10.0)
    assert on_verdict(s, LOW, cfg, 1e6) == (s, [])
    paused, _ = on_command(initial_state(cfg, None, 0.0), "pause", cfg, 1.0)
    assert on_verdict(paused, LOW, cfg, 1e6) == (paused, [])


def test_no_deadline_during_a_timed_pause_longer_than_it() -> None:
    """A timed pause ends by itself (Argo does not count pauses against progressDeadlineSeconds):
    a 1h pause under a 30m deadline is not stalled, and the clock starts again at the next step."""
    pause_1h = Step("pause", 10.0, pause=3600.0)
    cfg = ladder(W(10), pause_1h, W(50), progress_deadline=1800.0, on_deadline="rollback")
    s, _ = on_verdict(initial_state(cfg, None, 0.0), HEALTHY, cfg, 10.0)
    assert s.step_index == 1
    assert on_verdict(s, LOW, cfg, 10.0 + 1801.0) == (s, [])
    after, events = on_verdict(s, LOW, cfg, 10.0 + 3600.0)
    assert after.step_index == 2 and [e.kind for e in events] == ["step"]
    assert on_verdict(after, LOW, cfg, 3610.0 + 1799.0) == (after, [])
    gone, events = on_verdict(after, LOW, cfg, 3610.0 + 1800.0)
    assert [e.kind for e in events] == ["stalled", "rollback"]
    assert gone.phase == "rolled_back" and gone.stalled


def test_observe_mode_decides_but_never_changes_weights() -> None:
    cfg = ladder(W(10), W(50), mode="observe")
    split = (("stable", 100.0), ("canary", 0.0))
    s = initial_state(cfg, None, 0.0)
    s, events = on_verdict(s, HEALTHY, cfg, 10.0)
    assert s.step_index == 1 and ladder_weight(s, cfg) == 50.0 and canary_weight(s, cfg) is None
    assert effective_split(split, cfg, s) == split
    rolled, events = on_verdict(s, BREACH, cfg, 11.0)
    assert rolled.phase == "rolled_back"
    assert effective_split(split, cfg, rolled) == split
    assert effective_target("canary", cfg, rolled) == "canary"
    shown = stamp(events, cfg)
    assert shown[0].message.startswith("observe mode, not applied: ") and shown[0].data["observe"] is True
    assert shown[0].rollout == "default"


def test_analysis_step_asks_for_more_evidence() -> None:
    cfg = ladder(W(10), Step("analysis", 10.0, min_requests=5000))
    s = initial_state(cfg, None, 0.0)
    assert judging(cfg, s).min_requests == cfg.min_requests
    s = RolloutState("progressing", "canary", None, 1, 0.0, 0.0)
    assert judging(cfg, s).min_requests == 5000


def test_check_results_hold_or_trip_the_verdict() -> None:
    hold = {"c": CheckResult("c", "hold", "empty result")}
    breach = {"c": CheckResult("c", "breach", "3 > max 1")}
    ok = {"c": CheckResult("c", "pass", "0.5 within bounds", 0.5)}
    assert combine(HEALTHY, ok) is HEALTHY
    assert isinstance(combine(HEALTHY, hold), InsufficientData)  # never passes
    assert combine(LOW, hold) is LOW
    assert isinstance(combine(HEALTHY, breach), Breach) and "check c" in combine(HEALTHY, breach).reason
    check = Check("c", "http://p", 'rate(x{svc="{canary}", r="{rollout}"}[{window}]) / {baseline}', max=1.0, min=0.1)
    assert render_query(check, ladder(W(10))) == 'rate(x{svc="canary", r="default"}[30s]) / stable'.replace(
        "30s", "60s"
    )
    assert judge_value(check, 2.0)[0] == "breach" and judge_value(check, 0.05)[0] == "breach"
    assert judge_value(check, 0.5)[0] == "pass"
    vector = {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "0.25"]}]}}
    assert first_sample(vector) == 0.25
    assert first_sample({"status": "success", "data": {"resultType": "vector", "result": []}}) is None
    assert first_sample({"status": "success", "data": {"resultType": "scalar", "result": [1, "NaN"]}}) is None
    for garbage in ({"status": "error", "error": "parse error"}, [], {"status": "success", "data": {}}):
        with pytest.raises(ValueError):
            first_sample(garbage)


# -- config ---------------------------------------------------------------------------------------

BASE = """
listen: 127.0.0.1:8080
upstreams:
  a1: {endpoints: [http://127.0.0.1:9001]}
  a2: {endpoints: [http://127.0.0.1:9002]}
  b1: {endpoints: [http://127.0.0.1:9003]}
  b2: {endpoints: [http://127.0.0.1:9004]}
routes:
  - {name: a, match: {path_prefix: /a}, split: {a1: 90, a2: 10}}
  - {name: b, split: {b1: 90, b2: 10}}
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + text)
    return info.value.errors


def test_rollouts_parse_with_step_objects(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    cfg = parse_config(
        BASE
        + f"""
rollouts:
  - name: web
    canary: a2
    baseline: a1
    steps: [10, {{pause: 10m}}, {{pause: {{}}}}, {{weight: 50}}, {{gate: {{webhook: "http://h/ok", timeout: 2s}}}},
            {{analysis: {{min_requests: 500}}}}]
    progress_deadline: 30m
    on_deadline: rollback
    mode: observe
    checks: [{{name: p99, prometheus: "http://prom:9090", query: 'x{{a="{{canary}}"}}', max: 0.5, failure_limit: 2}}]
    webhooks:
      - {{url: "http://hooks/slack", format: slack, events: [rollback, stalled]}}
      - {{url: "http://hooks/json", secret_file: {secret}}}
  - {{name: api, canary: b2, baseline: b1, steps: [5, 100]}}
"""
    )
    web, api = cfg.rollouts
    assert cfg.rollout == web and cfg.rollout_named("api") == api and cfg.rollout_of("b1") == api
    assert web.steps == (10, 10, 10, 50, 50, 50)
    assert [s.kind for s in web.step_specs] == ["weight", "pause", "pause", "weight", "gate", "analysis"]
    assert web.step_specs[1].pause == 600 and web.step_specs[2].pause is None
    assert web.step_specs[4].gate == Gate("http://h/ok", 2.0) and web.step_specs[5].min_requests == 500
    assert (web.progress_deadline, web.on_deadline, web.mode) == (1800.0, "rollback", "observe")
    assert web.checks[0].failure_limit == 2 and web.checks[0].max == 0.5
    assert web.webhooks[0].format == "slack" and web.webhooks[0].events == ("rollback", "stalled")
    assert web.webhooks[1].secret == "s3cret"
    assert api.step_specs == () and api.steps == (5, 100)  # plain numbers stay plain


def test_argo_pause_duration_spelling_is_a_timed_pause() -> None:
    """Argo Rollouts writes `pause: {duration: 10m}`; it means the same as `pause: 10m`."""
    cfg = parse_config(BASE + "rollout: {canary: a2, baseline: a1, steps: [10, {pause: {duration: 10m}}, 50]}\n")
    assert cfg.rollout is not None
    assert [(s.kind, s.pause) for s in cfg.rollout.step_specs] == [("weight", None), ("pause", 600.0), ("weight", None)]


def test_one_rollout_is_named_default_unless_it_says() -> None:
    cfg = parse_config(BASE + "rollout: {canary: a2, baseline: a1}\n")
    assert cfg.rollout is not None and cfg.rollout.name == "default" and cfg.rollouts == (cfg.rollout,)
    cfg = parse_config(BASE + "rollout: {name: web, canary: a2, baseline: a1}\n")
    assert cfg.rollouts[0].name == "web"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "rollouts:\n  - {name: x, canary: a2, baseline: a1}\n  - {name: y, canary: b2, baseline: a1}\n",
            'rollouts[1].baseline: upstream "a1" is already in rollout "x" (line 13)',
        ),
        (
            "rollouts:\n  - {name: x, canary: a2, baseline: a1}\n  - {name: x, canary: b2, baseline: b1}\n",
            'rollouts[1].name: duplicate rollout name "x" (also rollouts[0]) (line 13)',
        ),
        ("rollouts:\n  - {canary: a2, baseline: a1}\n", 'rollouts[0]: missing required key "name" (line 12)'),
        ("rollouts: []\n", "rollouts: must list at least one rollout (line 11)"),
        (
            "rollout: {canary: a2, baseline: a1}\nrollouts: [{name: x, canary: b2, baseline: b1}]\n",
            'rollouts: set only one of "rollout" and "rollouts" (line 12)',
        ),
        (
            "rollout: {canary: a2, baseline: a1, steps: [10, {pause: 1m, weight: 5}]}\n",
            "rollout.steps[1]: a step sets exactly one of weight, pause, gate, analysis (line 11)",
        ),
        (
            "rollout: {canary: a2, baseline: a1, steps: [10, {pause: soon}]}\n",
            None,
        ),
        (
            "rollout: {canary: a2, baseline: a1, steps: [50, {weight: 20}]}\n",
            "rollout.steps[1]: steps must increase strictly (20 after 50) (line 11)",
        ),
        (
            "rollout: {canary: a2, baseline: a1, steps: [{gate: {timeout: 1s}}]}\n",
            'rollout.steps[0].gate: missing required key "webhook" (line 11)',
        ),
        (
            "rollout: {canary: a2, baseline: a1, steps: [{gate: {webhook: ftp://x}}]}\n",
            'rollout.steps[0].gate.webhook: invalid webhook URL "ftp://x" (expected http://... or https://...)'
            " (line 11)",
        ),
        (
            "rollout: {canary: a2, baseline: a1, steps: [{analysis: {min_requests: 0}}]}\n",
            "rollout.steps[0].analysis.min_requests: must be >= 1, got 0 (line 11)",
        ),
        (
            "rollout: {canary: a2, baseline: a1, on_deadline: panic}\n",
            'rollout.on_deadline: expected one of stall, rollback, got "panic" (line 11)',
        ),
        (
            "rollout: {canary: a2, baseline: a1, mode: dry}\n",
            'rollout.mode: expected one of enforce, observe, got "dry" (line 11)',
        ),
        (
            "rollout: {canary: a2, baseline: a1, checks: [{name: c, prometheus: 'http://p', query: up}]}\n",
            'rollout.checks[0]: set "max" or "min" (or both) (line 11)',
        ),
        (
            "rollout: {canary: a2, baseline: a1,"
            " checks: [{name: c, prometheus: 'http://p', query: up, min: 5, max: 1}]}\n",
            "rollout.checks[0]: min (5) must not exceed max (1) (line 11)",
        ),
        (
            "rollout: {canary: a2, baseline: a1, steps: [10, {pause: {duration: soon}}]}\n",
            'rollout.steps[1].pause.duration: invalid duration "soon" (use e.g. 500ms, 2s, 1m) (line 11)',
        ),
        (
            "rollout: {canary: a2, baseline: a1, steps: [10, {pause: {duration: 5s, seconds: 5}}]}\n",
            "rollout.steps[1].pause.seconds: unknown key (allowed: duration) (line 11)",
        ),
        (
            "rollout: {canary: a2, baseline: a1, webhooks: [{url: 'http://h', events: [exploded]}]}\n",
            None,
        ),
        (
            "rollout: {canary: a2, baseline: a1, webhooks: [{url: 'http://h', secret_file: /nonexistent/s}]}\n",
            'rollout.webhooks[0].secret_file: cannot read "/nonexistent/s": No such file or directory (line 11)',
        ),
        (
            "rollouts:\n  - {name: x, canary: a2, baseline: a1, error_statuses: [5xx, 429]}\n"
            "  - {name: y, canary: b2, baseline: b1}\n",
            'rollouts[1]: must be the same in every rollout (as in "x") (line 13)',
        ),
    ],
)
def test_bad_rollout_keys_name_their_key_path(text: str, error: str | None) -> None:
    errors = errors_of(text)
    if error is None:
        assert len(errors) == 1 and errors[0].startswith("rollout."), errors
    else:
        assert errors == [error]
