"""The rollout controller end to end on an injected clock, fast-fail, and the webhook (real server)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from support.polling import wait_until

from proxy.analysis.controller import RolloutController
from proxy.analysis.rollout import CommandError, RolloutState
from proxy.analysis.statefile import load_state, save_state
from proxy.analysis.stats import Stats
from proxy.analysis.verdict import Breach
from proxy.analysis.webhook import WebhookSender
from proxy.config.model import Address, Config, Endpoint, FastFail, Rollout, Route, Upstream


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_config(
    tmp_path: Path,
    *,
    version: str = "v2",
    steps: tuple[float, ...] = (5, 10, 25, 50, 100),
    fast_fail: int = 20,
    webhook: str | None = None,
    rollout: bool = True,
) -> Config:
    ro = Rollout(
        canary="canary",
        baseline="stable",
        steps=steps,
        interval=30.0,
        window=60.0,
        min_requests=100,
        fast_fail=FastFail(fast_fail),
        state_file=str(tmp_path / "state" / "state.json"),
        webhook=webhook,
    )
    return Config(
        listen=Address("127.0.0.1", 8080),
        admin=Address("127.0.0.1", 9090),
        upstreams={
            "stable": Upstream("stable", (Endpoint("127.0.0.1", 9001),), "v1"),
            "canary": Upstream("canary", (Endpoint("127.0.0.1", 9002),), version),
        },
        routes=(Route("main", None, split=(("stable", 95.0), ("canary", 5.0))),),
        rollout=ro if rollout else None,
    )


class Harness:
    """A controller with an injected clock, recording on_change calls."""

    def __init__(self, config: Config, stats: Stats | None = None, **kw: Any) -> None:
        self.clock = Clock()
        self.stats = stats or Stats()
        self.changes: list[RolloutState] = []
        self.ctl = RolloutController(
            config, self.stats, clock=self.clock, on_change=self.changes.append, **kw
        )
        self.buckets = config.metrics.buckets
        self.rng = random.Random(1)

    def phase(self) -> str | None:
        return self.ctl.state.phase if self.ctl.state is not None else None

    def traffic(
        self,
        seconds: int,
        canary_rps: int,
        baseline_rps: int,
        canary_err: float,
        base_err: float = 0.01,
        evaluate: bool = True,
    ) -> None:
        """Simulate `seconds` of traffic, evaluating once per second like the run loop."""
        canary = self.stats.upstream("canary", self.buckets)
        stable = self.stats.upstream("stable", self.buckets)
        for _ in range(seconds):
            for i in range(max(canary_rps, baseline_rps)):
                t = self.clock.now + i / max(canary_rps, baseline_rps)
                if i < canary_rps:
                    canary.observe(t, 0.02, self.rng.random() < canary_err)
                if i < baseline_rps:
                    stable.observe(t, 0.02, self.rng.random() < base_err)
            self.clock.now += 1.0
            if evaluate:
                self.ctl.evaluate()


async def test_start_creates_and_saves_the_initial_state(tmp_path: Path) -> None:
    h = Harness(make_config(tmp_path))
    await h.ctl.start()
    assert h.ctl.state is not None and h.ctl.state.phase == "progressing"
    assert [s.phase for s in h.changes] == ["progressing"]
    assert load_state(str(tmp_path / "state" / "state.json")) == h.ctl.state
    # The canary's fast-fail trip is armed.
    assert h.stats.upstreams["canary"].trip_at == 20
    await h.ctl.stop()
    assert h.stats.upstreams["canary"].trip_at > 1 << 60


async def test_steps_then_rollback_end_to_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(tmp_path)
    h = Harness(config)
    await h.ctl.start()
    h.traffic(29, 5, 95, 0.01)
    assert h.ctl.state is not None and h.ctl.state.step_index == 0  # interval not over yet
    h.traffic(2, 5, 95, 0.01)
    assert h.ctl.state.step_index == 1
    assert [s.step_index for s in h.changes] == [0, 1]
    assert h.ctl.events[-1].kind == "step"

    caplog.set_level(logging.INFO, logger="canary_proxy.rollout")
    h.traffic(120, 10, 90, 0.10)  # the canary breaks
    state = h.ctl.state
    assert state.phase == "rolled_back" and state.reason is not None and "canary error rate" in state.reason
    assert h.changes[-1].phase == "rolled_back"
    assert h.stats.rollbacks == {"canary": 1}
    assert isinstance(h.ctl.last_verdict, Breach)
    assert h.ctl.last_verdict_at == h.clock.now  # evaluated on every simulated second
    saved = load_state(config.rollout.state_file)  # type: ignore[union-attr,arg-type]
    assert saved is not None and saved.phase == "rolled_back"
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "canary_proxy.rollout"]
    rollback = [x for x in lines if x["event"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["data"]["canary_requests"] >= 100
    assert "canary error rate" in rollback[0]["message"]
    status = h.ctl.status()
    assert status["weight"] == 0.0 and status["state"]["phase"] == "rolled_back"
    assert status["events"][-1]["event"] == "rollback"

    # Latched: healthy traffic afterwards changes nothing.
    n_changes = len(h.changes)
    h.traffic(100, 0, 100, 0.0)
    assert h.ctl.state.phase == "rolled_back" and len(h.changes) == n_changes
    await h.ctl.stop()


async def test_latch_survives_restart_until_new_version_or_reset(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    h = Harness(config)
    await h.ctl.start()
    h.ctl.command("rollback", "manual test")
    await h.ctl.stop()

    again = Harness(config)
    await again.ctl.start()
    assert again.ctl.state is not None and again.ctl.state.phase == "rolled_back"
    assert again.ctl.state.reason == "manual rollback: manual test"
    assert again.stats.upstreams.get("canary") is None or again.stats.upstreams["canary"].on_trip is None
    with pytest.raises(CommandError):
        again.ctl.command("promote")
    state = again.ctl.command("reset")
    assert state.phase == "progressing" and state.step_index == 0
    assert again.stats.upstreams["canary"].trip_at == 20  # re-armed
    await again.ctl.stop()

    save_state(config.rollout.state_file, replace(state, phase="rolled_back", reason="x"))  # type: ignore[union-attr,arg-type]
    newer = Harness(make_config(tmp_path, version="v3"))
    await newer.ctl.start()
    assert newer.ctl.state is not None and newer.ctl.state.phase == "progressing"
    assert newer.ctl.state.canary_version == "v3"
    assert newer.ctl.events[-1].kind == "reset" and "v3" in newer.ctl.events[-1].message
    await newer.ctl.stop()


async def test_fast_fail_trips_synchronously_and_publishes_on_the_next_loop_turn(tmp_path: Path) -> None:
    h = Harness(make_config(tmp_path))
    await h.ctl.start()
    canary = h.stats.upstream("canary", h.buckets)
    for _ in range(19):
        canary.observe(h.clock.now, 0.01, True)
    canary.observe(h.clock.now, 0.01, False)  # a success resets the count
    for _ in range(19):
        canary.observe(h.clock.now, 0.01, True)
    assert h.phase() == "progressing"
    canary.observe(h.clock.now, 0.01, True)  # the 20th in a row; far below min_requests
    assert h.phase() == "rolled_back"
    assert h.ctl.state is not None and h.ctl.state.reason == "fast fail: 20 consecutive errors from canary"
    assert [c.phase for c in h.changes] == ["progressing"]  # publishing is deferred to call_soon
    for _ in range(50):
        canary.observe(h.clock.now, 0.01, True)  # disarmed: no further trips
    await asyncio.sleep(0)
    assert [c.phase for c in h.changes] == ["progressing", "rolled_back"]
    assert h.stats.rollbacks == {"canary": 1}
    saved = load_state(str(tmp_path / "state" / "state.json"))
    assert saved is not None and saved.phase == "rolled_back"
    # reset clears the frozen consecutive-error count: one more error does not trip again.
    h.ctl.command("reset")
    canary.observe(h.clock.now, 0.01, True)
    assert h.phase() == "progressing"
    await h.ctl.stop()


async def test_below_min_requests_a_proven_breach_trips_without_fast_fail(tmp_path: Path) -> None:
    """min_requests guards passing, not failing: 1 canary request a second, every one a 500."""
    h = Harness(make_config(tmp_path, fast_fail=0))
    await h.ctl.start()
    seconds = 0
    while h.phase() != "rolled_back" and seconds < 60:
        h.traffic(1, 1, 100, 1.0)
        seconds += 1
    assert h.phase() == "rolled_back", h.ctl.last_verdict
    assert seconds <= 5  # 3 failures in 3 requests against a 5% limit is proof at 99%
    assert h.stats.rollbacks == {"canary": 1}
    assert h.ctl.state is not None and "error rate 100.0%" in (h.ctl.state.reason or "")
    await h.ctl.stop()


async def test_below_min_requests_a_healthy_canary_never_advances(tmp_path: Path) -> None:
    h = Harness(make_config(tmp_path, fast_fail=0))
    await h.ctl.start()
    # 1 canary request per second, healthy: at most 60 in the 60s window, below 100.
    h.traffic(600, 1, 100, 0.0)
    assert h.ctl.state is not None and h.ctl.state.phase == "progressing"
    assert h.ctl.last_verdict is not None and h.ctl.last_verdict.kind == "insufficient_data"
    assert h.ctl.state.step_index == 0  # insufficient data never advances
    assert h.stats.rollbacks == {}
    await h.ctl.stop()


async def test_no_rollback_at_equal_error_rates_over_many_ticks(tmp_path: Path) -> None:
    h = Harness(make_config(tmp_path, steps=()))  # steady: constant shares
    await h.ctl.start()
    h.traffic(3_000, 3, 57, 0.01, 0.01)
    assert h.ctl.state is not None and h.ctl.state.phase == "steady"
    assert h.ctl.last_verdict is not None and h.ctl.last_verdict.kind == "healthy"
    await h.ctl.stop()


async def test_evidence_belongs_to_a_version(tmp_path: Path) -> None:
    """A canary rolled back at 30% errors, then fixed: neither a reset nor a new version is judged on
    the old errors still in the window (the issue saw both rolled back again within a second)."""
    h = Harness(make_config(tmp_path, steps=(), fast_fail=0))
    await h.ctl.start()
    h.traffic(20, 10, 90, 0.30)
    assert h.phase() == "rolled_back"
    h.clock.now += 0.5
    h.ctl.command("reset")
    assert h.ctl.state is not None and h.ctl.state.evidence_since == h.clock.now
    h.traffic(30, 10, 90, 0.0)  # fixed
    assert h.phase() == "steady", h.ctl.last_verdict
    assert h.ctl.last_verdict is not None and h.ctl.last_verdict.kind == "healthy"
    assert h.ctl.last_verdict.figures.canary_errors == 0
    # The old errors are still in the window (and on /status): only the verdict ignores them.
    assert h.stats.upstreams["canary"].window.stats(h.clock.now, 60.0).errors > 0

    h.traffic(20, 10, 90, 0.30)
    assert h.phase() == "rolled_back"
    h.clock.now += 0.5
    fresh = h.ctl.reconfigure(make_config(tmp_path, version="v3", steps=(), fast_fail=0))
    assert fresh is not None and fresh.phase == "steady" and fresh.evidence_since == h.clock.now
    h.traffic(30, 10, 90, 0.0)
    assert h.phase() == "steady", h.ctl.last_verdict
    # A promotion starts the evidence afresh too.
    h.clock.now += 0.5
    promoted = h.ctl.command("promote")
    assert promoted.evidence_since == h.clock.now
    await h.ctl.stop()


async def test_controller_sets_the_canary_try_timeout_and_tracks_its_tries(tmp_path: Path) -> None:
    h = Harness(make_config(tmp_path, steps=()))
    await h.ctl.start()
    h.ctl.evaluate()
    canary = h.stats.upstreams["canary"]
    assert canary.track_inflight and canary.try_timeout == 0.0  # no baseline p99 yet: no guess
    h.traffic(5, 10, 90, 0.0)  # 20 ms everywhere: 10 x p99 is below the 1 s floor
    assert canary.try_timeout == pytest.approx(1.0)
    assert h.ctl.canary_try_timeout == pytest.approx(1.0)
    cfg = make_config(tmp_path, steps=())
    assert cfg.rollout is not None
    h.ctl.reconfigure(replace(cfg, rollout=replace(cfg.rollout, canary_try_timeout=0.25)))
    h.ctl.evaluate()
    assert canary.try_timeout == pytest.approx(0.25)
    h.ctl.command("rollback")
    h.ctl.evaluate()
    assert not canary.track_inflight  # rolled back: nothing left to judge
    await h.ctl.stop()


async def test_reconfigure(tmp_path: Path) -> None:
    h = Harness(make_config(tmp_path))
    await h.ctl.start()
    h.ctl.command("rollback")
    kept = h.ctl.reconfigure(make_config(tmp_path))
    assert kept is not None and kept.phase == "rolled_back"
    fresh = h.ctl.reconfigure(make_config(tmp_path, version="v3"))
    assert fresh is not None and fresh.phase == "progressing" and fresh.canary_version == "v3"
    assert h.stats.upstreams["canary"].on_trip is not None
    assert h.ctl.reconfigure(make_config(tmp_path, rollout=False)) is None
    assert h.stats.upstreams["canary"].on_trip is None
    with pytest.raises(LookupError):
        h.ctl.command("pause")
    # reconfigure does not call on_change: the caller compiles with the returned state.
    assert [s.phase for s in h.changes] == ["progressing", "rolled_back"]
    # Adding the rollout back picks the state file up again (v3, progressing).
    back = h.ctl.reconfigure(make_config(tmp_path, version="v3"))
    assert back == fresh
    h.ctl.record_event("reload", "config reloaded", {"hash": "abc"})
    assert h.ctl.events[-1].kind == "reload" and h.ctl.status()["events"][-1]["data"] == {"hash": "abc"}
    await h.ctl.stop()


async def test_run_loop_evaluates_on_its_tick(tmp_path: Path) -> None:
    h = Harness(make_config(tmp_path), tick=0.01)
    task = asyncio.create_task(h.ctl.run())
    try:
        await wait_until(lambda: h.ctl.last_verdict is not None, 5.0, "the first tick's verdict")
        assert h.ctl.last_verdict is not None and h.ctl.last_verdict.kind == "insufficient_data"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await h.ctl.stop()


# -- webhook --------------------------------------------------------------------------------------


class Receiver:
    """A real HTTP server answering the given statuses in order (then 200)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.bodies: list[Any] = []
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.server = TestServer(app)

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/hook"))

    async def wait_for(self, n: int) -> None:
        await wait_until(lambda: len(self.bodies) >= n, 5.0, f"{n} webhook calls")


async def test_webhook_retries_after_a_500() -> None:
    rx = Receiver([500])
    await rx.server.start_server()
    sender = WebhookSender(rx.url, base_delay=0.01)
    try:
        await sender.start()
        sender.send({"event": "rollback", "n": 1})
        sender.send({"event": "step", "n": 2})
        await rx.wait_for(3)
        assert [b["n"] for b in rx.bodies] == [1, 1, 2]  # in order, the first one retried
        await wait_until(lambda: sender.delivered == 2, 1.0, "both events delivered")
        assert (sender.delivered, sender.failed, sender.pending) == (2, 0, 0)
    finally:
        await sender.close()
        await rx.server.close()


async def test_webhook_gives_up_after_the_attempts(caplog: pytest.LogCaptureFixture) -> None:
    rx = Receiver([503, 503, 503, 200])
    await rx.server.start_server()
    sender = WebhookSender(rx.url, attempts=3, base_delay=0.01)
    try:
        sender.send({"event": "rollback"})  # sent inside a running loop: the worker starts lazily
        await rx.wait_for(3)
        await wait_until(lambda: sender.failed, 1.0, "the sender to give up")
        assert sender.failed == 1 and "gave up" in caplog.text
    finally:
        await sender.close()
        await rx.server.close()


async def test_webhook_connection_refused_then_close_is_clean() -> None:
    sender = WebhookSender("http://127.0.0.1:9/hook", attempts=100, base_delay=0.01)
    sender.send({"event": "rollback"})
    await asyncio.sleep(0.05)  # scenario: close while it is busy retrying (every 10 ms, refused)
    await sender.close()  # cancels the retrying worker
    sender.send({"event": "ignored after close"})
    assert sender.pending == 1  # the undelivered first event; nothing new queued


async def test_controller_posts_events_to_the_webhook(tmp_path: Path) -> None:
    rx = Receiver([])
    await rx.server.start_server()
    h = Harness(make_config(tmp_path, webhook=rx.url))
    try:
        await h.ctl.start()
        h.ctl.command("rollback", "bad deploy")
        await rx.wait_for(1)
        body = rx.bodies[0]
        assert body["event"] == "rollback" and body["canary"] == "canary" and body["baseline"] == "stable"
        assert body["phase"] == "rolled_back" and body["weight"] == 0.0
        assert "bad deploy" in body["message"]
    finally:
        await h.ctl.stop()
        await rx.server.close()
