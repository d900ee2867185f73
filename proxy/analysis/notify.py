"""Several notification webhooks per rollout (`webhooks:`), each with an event filter, a format
(`json`: the event as the legacy `webhook:` sends it; `slack`: an incoming-webhook message) and an
optional HMAC-SHA256 signature of the body in `X-Canary-Proxy-Signature: sha256=<hex>`."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping

from proxy.analysis.rollout import RolloutEvent, RolloutState, ladder_weight
from proxy.analysis.webhook import WebhookSender
from proxy.config.model import Rollout, Webhook

SIGNATURE_HEADER = "X-Canary-Proxy-Signature"
EMOJI = {"rollback": ":rotating_light:", "promoted": ":white_check_mark:", "stalled": ":warning:"}


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for `body` (what a receiver recomputes and compares)."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


class FormattedSender(WebhookSender):
    """A WebhookSender that shapes (json / slack) and signs each body."""

    def __init__(self, hook: Webhook) -> None:
        super().__init__(hook.url)
        self.hook = hook

    def _encode(self, event: Mapping[str, object]) -> tuple[bytes, dict[str, str]]:
        if self.hook.format == "slack":
            body = json.dumps(slack_message(event)).encode("utf-8")
        else:
            body = json.dumps(event, default=str).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.hook.secret:
            headers[SIGNATURE_HEADER] = sign(self.hook.secret, body)
        return body, headers


def slack_message(event: Mapping[str, object]) -> dict[str, object]:
    """A Slack incoming-webhook message (`text`, readable without any formatting)."""
    kind = str(event.get("event"))
    icon = EMOJI.get(kind, ":information_source:")
    text = f"{icon} canary-proxy rollout *{event.get('rollout')}*: {event.get('message')}"
    return {"text": text}


class Notifier:
    """Fans one rollout's events out to its webhooks."""

    def __init__(self, hooks: tuple[Webhook, ...]) -> None:
        self.senders = [FormattedSender(h) for h in hooks]

    def send(self, event: RolloutEvent, rollout: Rollout, state: RolloutState) -> None:
        """Queue `event` for every webhook whose filter takes it (never blocks)."""
        payload = event.to_dict()
        payload.update(
            rollout=rollout.name,
            canary=rollout.canary,
            baseline=rollout.baseline,
            phase=state.phase,
            weight=ladder_weight(state, rollout),
            mode=rollout.mode,
        )
        for sender in self.senders:
            if not sender.hook.events or event.kind in sender.hook.events:
                sender.send(payload)

    async def close(self) -> None:
        """Close every sender."""
        for sender in self.senders:
            await sender.close()
