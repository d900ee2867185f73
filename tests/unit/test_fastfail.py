"""proxy.analysis.fastfail: armed only while a trip can change anything; once, or repeatedly."""

from __future__ import annotations

from dataclasses import replace

from proxy.analysis.fastfail import FastFail
from proxy.analysis.rollout import reconcile
from proxy.analysis.stats import DISARMED, Stats
from proxy.config import parse_config

CONFIG = parse_config(
    "listen: 127.0.0.1:0\nupstreams:\n  stable: {endpoints: [http://10.0.0.1:80]}\n"
    "  canary: {endpoints: [http://10.0.0.2:80]}\nroutes:\n  - name: d\n    split: {stable: 90, canary: 10}\n"
    "rollout: {canary: canary, baseline: stable, fast_fail: {consecutive_errors: 3}}\n"
)


def errors(stats: Stats, n: int) -> None:
    us = stats.upstreams["canary"]
    for _ in range(n):
        us.observe(0.0, 0.01, True)


def test_trips_once_after_n_consecutive_errors_then_disarms() -> None:
    stats, tripped = Stats(), []
    ff = FastFail(stats, tripped.append)
    assert CONFIG.rollout is not None
    state = reconcile(None, CONFIG.rollout, None, 0.0)
    ff.update(CONFIG.rollout, CONFIG.metrics.buckets, state)
    assert ff.armed == "canary"
    errors(stats, 2)
    stats.upstreams["canary"].observe(0.0, 0.01, False)  # a success resets the count
    errors(stats, 3)
    assert tripped == ["3 consecutive errors from canary"]
    errors(stats, 5)
    assert len(tripped) == 1 and ff.armed is None and stats.upstreams["canary"].trip_at == DISARMED


def test_repeat_keeps_asking_and_finished_rollouts_disarm() -> None:
    stats, tripped = Stats(), []
    ff = FastFail(stats, tripped.append, repeat=True)
    ff.update(CONFIG.rollout, CONFIG.metrics.buckets, None)  # a worker before the leader's first state: armed
    errors(stats, 4)
    assert len(tripped) == 2
    assert CONFIG.rollout is not None
    done = replace(reconcile(None, CONFIG.rollout, None, 0.0), phase="rolled_back")
    ff.update(CONFIG.rollout, CONFIG.metrics.buckets, done)
    errors(stats, 10)
    assert len(tripped) == 2 and ff.armed is None


def test_fresh_forgets_old_errors_and_zero_disables() -> None:
    stats, tripped = Stats(), []
    ff = FastFail(stats, tripped.append)
    ff.update(CONFIG.rollout, CONFIG.metrics.buckets, None)
    errors(stats, 2)
    ff.update(CONFIG.rollout, CONFIG.metrics.buckets, None, fresh=True)
    errors(stats, 2)
    assert tripped == []
    off = parse_config(
        "listen: 127.0.0.1:0\nupstreams:\n  stable: {endpoints: [http://10.0.0.1:80]}\n"
        "  canary: {endpoints: [http://10.0.0.2:80]}\nroutes:\n  - name: d\n    to: stable\n"
        "rollout: {canary: canary, baseline: stable, fast_fail: {consecutive_errors: 0}}\n"
    )
    ff.update(off.rollout, off.metrics.buckets, None)
    errors(stats, 50)
    assert tripped == [] and ff.armed is None
