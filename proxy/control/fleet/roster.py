"""Who is in the fleet: each replica's report (once a second), and the leader's latest verdict."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from proxy.analysis.controller import RolloutController
from proxy.analysis.rollout import RolloutState, canary_weight
from proxy.config.model import Rollout
from proxy.control.fleet import keys as K
from proxy.control.fleet.codec import decode_json

STALE_REPORT = 3600.0  # the leader forgets replicas silent for an hour


class Roster:
    """Reports and verdicts as last read from Redis (what /status and /metrics show)."""

    def __init__(self, keys: K.Keys, complain: Callable[[str, str], None]) -> None:
        self.keys = keys
        self.complain = complain
        self.reports: dict[str, dict[str, Any]] = {}  # replica -> its last report
        self.verdicts: dict[str, dict[str, Any]] = {}  # rollout -> the leader's last verdict

    async def publish_verdict(self, client: Redis, controller: RolloutController | None, rollout: Rollout,
                              replica: str) -> None:  # fmt: skip
        """The leader's latest verdict, with the fleet-wide figures it was computed on."""
        verdict = controller.last_verdict if controller is not None else None
        if verdict is None or controller is None:
            return
        doc = {"kind": verdict.kind, "reason": verdict.reason, "figures": verdict.figures.as_dict(),
               "at": controller.last_verdict_at, "by": replica, "window": rollout.window}  # fmt: skip
        await client.set(self.keys.verdict(rollout.name), json.dumps(doc), ex=K.VERDICT_TTL)

    async def report(
        self,
        client: Redis,
        replica: str,
        states: Mapping[str, RolloutState],
        rollouts: list[Rollout],
        extra: dict[str, Any],
        now: float,
    ) -> None:
        """Report this replica in: when, and what it applies."""
        doc = {
            "at": now,
            "phases": {r.name: states[r.name].phase if r.name in states else None for r in rollouts},
            "weights": {r.name: canary_weight(states.get(r.name), r) for r in rollouts},
            **extra,
        }
        pipe = client.pipeline(transaction=False)
        pipe.hset(self.keys.replicas, replica, json.dumps(doc))
        pipe.expire(self.keys.replicas, K.REPLICAS_TTL)
        await pipe.execute()

    async def read(self, client: Redis, rollouts: list[Rollout], now: float, *, prune: bool) -> None:
        """Everyone's reports and the verdicts; `prune` (the leader) drops replicas silent for an hour."""
        try:
            raw = await client.hgetall(self.keys.replicas)
        except ResponseError as exc:
            self.complain(self.keys.replicas, str(exc))
            raw = {}
        reports: dict[str, dict[str, Any]] = {}
        stale: list[str] = []
        for key, text in raw.items():
            replica = str(key)
            try:
                doc = decode_json(text)
                at = float(doc["at"])
            except (ValueError, KeyError, TypeError) as exc:
                self.complain(f"{self.keys.replicas}/{replica}", str(exc))
                continue
            if now - at > STALE_REPORT:
                stale.append(replica)
                continue
            reports[replica[:100]] = doc
        self.reports = reports
        if stale and prune:
            await client.hdel(self.keys.replicas, *stale)
        verdicts: dict[str, dict[str, Any]] = {}
        for rollout in rollouts:
            key = self.keys.verdict(rollout.name)
            try:
                verdicts[rollout.name] = decode_json(await client.get(key))
            except ResponseError as exc:
                self.complain(key, str(exc))
            except ValueError:
                pass  # none yet (expired, or no leader): nothing to show
        self.verdicts = verdicts
