"""A rollback is never forgotten (issue 12): a full disk, a corrupt state file, a killed leader,
a reload adding a rollout over a bad file. Every test runs the real process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ProxyProcess, Upstream, config_text
from tests.test_e2e_rollback import (
    _true,
    _worker_up,
    admin,
    burst,
    metrics,
    phase_is,
    rollout_yaml,
    sample,
    status,
    stop_process,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)

StartProcess = Callable[..., ProxyProcess]
StartUpstream = Callable[..., Awaitable[Upstream]]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a disk that can be filled up. Skips when mounting is impossible."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` to the last byte."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"x" * size)
    finally:
        os.close(fd)
    return filler


async def test_a_rollback_on_a_full_disk_is_retried_until_durable_and_survives_a_restart(
    upstream_factory: StartUpstream, proxy_process: StartProcess, small_disk: Path
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    state = small_disk / "state.json"
    text = config_text(stable.url, canary.url, rollout_yaml(state, steps="[20, 50]", interval="1h"))
    pp = proxy_process(text)
    assert state.exists()
    filler = fill(small_disk)
    code, body = await admin(pp.admin_port, "POST", "/rollout/rollback", {"reason": "disk test"})
    assert code == 200 and body["phase"] == "rolled_back", body

    doc = await status(pp.admin_port)
    assert doc["rollout"]["state_file"]["durable"] is False, doc["rollout"]
    assert "No space left" in doc["rollout"]["state_file"]["error"]
    assert (await admin(pp.admin_port, "GET", "/readyz"))[0] == 200  # still serving
    m = await metrics(pp.admin_port)
    assert sample(m, "canary_proxy_rollout_state_durable", rollout="default") == 0.0
    assert (sample(m, "canary_proxy_rollout_state_write_failures_total", rollout="default") or 0) >= 1
    assert any("not durable yet" in line for line in pp.lines)

    # Space comes back: the next retry writes the latch, without anyone asking.
    filler.unlink()

    async def durable() -> bool:
        return bool((await status(pp.admin_port))["rollout"]["state_file"]["durable"])

    await wait_for(durable, 10, "the retried write")
    assert '"rolled_back"' in state.read_text()
    assert await stop_process(pp) == 0

    pp2 = proxy_process(text)
    doc = await status(pp2.admin_port)
    assert doc["rollout"]["phase"] == "rolled_back" and doc["rollout"]["canary_weight"] == 0.0, doc["rollout"]


def _deep(n: int) -> str:
    return '{"format": 1, "phase": ' + "[" * n + "]" * n + "}"


GOOD = (
    '{"format": 1, "phase": "rolled_back", "canary": "canary", "canary_version": "v2", "step_index": 0,'
    ' "step_started_at": 1, "changed_at": 1, "reason": "bad", "last_verdict": null}'
)
BAD_FILES = {
    "truncated": GOOD[: len(GOOD) // 2],
    "garbage": "\x00\xff garbage \x13",
    "wrong_type": "[1, 2, 3]",
    "infinity": GOOD.replace('"step_index": 0', '"step_index": Infinity'),
    "huge_float": GOOD.replace('"changed_at": 1', '"changed_at": 1e400'),
    "deep": _deep(100_000),
    "directory": "",
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
async def test_a_bad_state_file_holds_the_rollout_and_is_kept_aside(
    upstream_factory: StartUpstream, proxy_process: StartProcess, tmp_path: Path, kind: str
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    state = tmp_path / "state" / "state.json"
    state.parent.mkdir()
    if kind == "directory":
        state.mkdir()
    else:
        state.write_bytes(BAD_FILES[kind].encode("utf-8", "surrogatepass"))
    routes = "  - name: default\n    split: {stable: 80, canary: 20}\n"
    text = config_text(stable.url, canary.url, rollout_yaml(state, steps="[20, 50]", interval="1h"), routes=routes)
    pp = proxy_process(text)
    doc = await status(pp.admin_port)
    rollout = doc["rollout"]
    assert rollout["phase"] == "unknown_state" and rollout["canary_weight"] == 0.0, rollout
    assert "unusable" in rollout["reason"]
    results = await burst(pp.port, 30)
    assert {up for _, up, _ in results} == {"stable"}  # the canary gets nothing while held
    aside = [p for p in state.parent.iterdir() if p.name.startswith("state.json.bad-")]
    assert len(aside) == 1, list(state.parent.iterdir())  # kept for the operator, not overwritten
    if kind != "directory":
        assert aside[0].read_bytes() == BAD_FILES[kind].encode("utf-8", "surrogatepass")
    assert not any("Traceback" in line for line in pp.lines), "".join(pp.lines)
    assert await stop_process(pp) == 0

    # Still held after a restart (the held state is what the file says now) ...
    pp = proxy_process(text)
    assert (await status(pp.admin_port))["rollout"]["phase"] == "unknown_state"
    # ... until an operator resets.
    code, body = await admin(pp.admin_port, "POST", "/rollout/reset")
    assert code == 200 and body["phase"] == "progressing", body
    code, body = await admin(pp.admin_port, "POST", "/rollout/promote")
    assert code == 200, body


async def test_a_new_canary_version_releases_an_unknown_state(
    upstream_factory: StartUpstream, proxy_process: StartProcess, tmp_path: Path
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    state = tmp_path / "state.json"
    state.write_text("{garbage")
    text = config_text(stable.url, canary.url, rollout_yaml(state, steps="[20, 50]", interval="1h"))
    pp = proxy_process(text)
    assert (await status(pp.admin_port))["rollout"]["phase"] == "unknown_state"
    assert await stop_process(pp) == 0
    pp = proxy_process(text.replace("version: v2", "version: v3"))
    assert (await status(pp.admin_port))["rollout"]["phase"] == "progressing"


async def test_reload_adding_a_rollout_over_a_bad_state_file(
    upstream_factory: StartUpstream, proxy_process: StartProcess, tmp_path: Path
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    state = tmp_path / "state.json"
    state.write_text('{"format": 1, "phase": ' + "[" * 50_000)
    pp = proxy_process(config_text(stable.url, canary.url))
    with_rollout = config_text(stable.url, canary.url, rollout_yaml(state, steps="[20, 50]", interval="1h"))
    with_rollout = with_rollout.replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{pp.port}")
    pp.config.write_text(with_rollout.replace("admin: 127.0.0.1:0", f"admin: 127.0.0.1:{pp.admin_port}"))
    code, body = await admin(pp.admin_port, "POST", "/config/reload")
    assert code == 200, body
    doc = await status(pp.admin_port)
    assert doc["config"]["last_error"] is None
    assert doc["rollout"]["phase"] == "unknown_state", doc["rollout"]
    assert not any("reload failed unexpectedly" in line or "Traceback" in line for line in pp.lines)


async def test_a_restarted_leader_takes_the_followers_rollback(
    upstream_factory: StartUpstream, proxy_process: StartProcess
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    routes = "  - name: default\n    split: {stable: 50, canary: 50}\n"
    extra = rollout_yaml(steps="[24, 50]", interval="1h", min_requests=100000)  # no state_file
    pp = proxy_process(config_text(stable.url, canary.url, extra, routes=routes), args=("--workers", "2"))
    try:
        await wait_for(lambda: _true(sum(_worker_up(line) for line in list(pp.lines)) >= 2), 15, "both workers")
        code, body = await admin(pp.admin_port, "POST", "/rollout/rollback")
        assert code == 200, body
        await asyncio.sleep(1.0)  # the follower adopts it within a second (the sync period is 0.5 s)
        pids = re.search(r"started 2 workers \(pids (\d+), (\d+)\)", "".join(pp.lines))
        assert pids is not None, "".join(pp.lines)
        os.kill(int(pids.group(1)), signal.SIGKILL)  # the leader

        async def leader_back() -> dict[str, object] | None:
            try:
                return await phase_is(pp.admin_port, "rolled_back")
            except (OSError, AssertionError):
                return None

        # The master restarts worker 0; from its first sync on it holds the follower's rollback.
        await wait_for(lambda: _true(sum("listening on" in line for line in list(pp.lines)) >= 2), 15, "new leader")
        await wait_for(leader_back, 10, "the restarted leader holding the rollback")
        results = await burst(pp.port, 60, close=True)
        assert {up for _, up, _ in results} == {"stable"}
    finally:
        assert await stop_process(pp) == 0
