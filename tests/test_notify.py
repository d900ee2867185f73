"""Several webhooks per rollout, received by a real test server: a Slack incoming-webhook message
for rollbacks only, and signed JSON for every event (HMAC-SHA256 verified here the way a receiver
would); the stalled event reaches the webhooks too."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.analysis.notify import SIGNATURE_HEADER
from tests.test_e2e_rollback import admin, wait_for
from tests.test_rollouts_e2e import ProxyFactory, UpstreamFactory, one_rollout_config, ports

pytestmark = pytest.mark.timeout(60)


class Receiver:
    def __init__(self) -> None:
        self.got: dict[str, list[tuple[bytes, dict[str, str]]]] = {"slack": [], "json": []}
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.got[request.match_info["kind"]].append((await request.read(), dict(request.headers)))
        return web.Response(text="ok")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/{kind}", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield rec
    await runner.cleanup()


def verified(body: bytes, headers: dict[str, str], secret: bytes) -> dict[str, Any]:
    """What a receiver does: recompute the HMAC of the raw body, compare in constant time."""
    want = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[SIGNATURE_HEADER], want), "bad signature"
    doc: dict[str, Any] = json.loads(body)
    return doc


async def test_slack_and_signed_json_webhooks(
    receiver: Receiver, upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    secret = tmp_path / "hook-secret"
    secret.write_text("correct horse battery staple\n")
    stable = await upstream_factory("stable")
    canary = await upstream_factory("canary")
    rollout = (
        "  name: shop\n  canary: canary\n  baseline: stable\n  interval: 1s\n  steps: [20, 50]\n"
        "  progress_deadline: 1s\n"  # no traffic: the rollout stalls (and stays, on_deadline: stall)
        "  webhooks:\n"
        f"    - {{url: '{receiver.url}/slack', format: slack, events: [rollback]}}\n"
        f"    - {{url: '{receiver.url}/json', secret_file: '{secret}'}}\n"
    )
    app = await proxy_factory(one_rollout_config(stable.url, canary.url, rollout))
    _, admin_port = ports(app)

    def json_events() -> list[dict[str, Any]]:
        return [verified(b, h, b"correct horse battery staple") for b, h in receiver.got["json"]]

    async def seen(kind: str) -> bool:
        return any(e["event"] == kind for e in json_events())

    await wait_for(lambda: seen("stalled"), 10, "the stalled event")
    code, _ = await admin(admin_port, "POST", "/rollouts/shop/rollback", {"reason": "bad canary"})
    assert code == 200
    await wait_for(lambda: seen("rollback"), 10, "the rollback event")

    async def slack_rollback() -> bool:
        return bool(receiver.got["slack"])

    await wait_for(slack_rollback, 10, "the Slack message")
    events = json_events()
    stalled = next(e for e in events if e["event"] == "stalled")
    assert stalled["rollout"] == "shop" and stalled["canary"] == "canary" and stalled["phase"] == "progressing"
    rollback = next(e for e in events if e["event"] == "rollback")
    assert rollback["data"]["reason"] == "manual rollback: bad canary" and rollback["weight"] == 0
    # Slack: only the filtered event, as an incoming-webhook message; unsigned (no secret).
    assert len(receiver.got["slack"]) == 1
    body, headers = receiver.got["slack"][0]
    message = json.loads(body)
    assert set(message) == {"text"} and "*shop*" in message["text"] and "bad canary" in message["text"]
    assert SIGNATURE_HEADER not in headers
    # A tampered body does not verify.
    body, headers = receiver.got["json"][0]
    with pytest.raises(AssertionError, match="bad signature"):
        verified(body + b" ", headers, b"correct horse battery staple")
