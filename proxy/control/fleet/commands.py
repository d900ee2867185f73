"""Operator commands in fleet mode: applied to the fleet's state in Redis from any replica."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from redis.exceptions import ResponseError

from proxy.analysis.rollout import Command, CommandError, on_command, reconcile
from proxy.control.fleet.codec import decode_state
from proxy.control.fleet.errors import DOWN, FleetUnavailable
from proxy.control.fleet.evidence import canary_version
from proxy.control.fleet.store import PendingWrite

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from proxy.analysis.controller import RolloutController
    from proxy.config.model import Config, Rollout
    from proxy.control.fleet.connection import LinkState
    from proxy.control.fleet.keys import Keys


class CommandHost(Protocol):
    """What a command needs of this replica's membership (`proxy.control.fleet.member.FleetMember`)."""

    client: Redis | None
    link: LinkState
    keys: Keys
    get_config: Callable[[], Config]

    def controller(self, name: str) -> RolloutController | None: ...

    async def write(self, client: Redis, rollout: Rollout, pending: PendingWrite, *, fenced: bool) -> int | None: ...


async def run_command(member: CommandHost, command: Command, reason: str | None, name: str, full: bool) -> None:
    """Apply an operator command fleet-wide. Raises CommandError (409), LookupError (no rollout)
    or FleetUnavailable (503). `rollback` always works: here at once, fleet-wide when Redis takes it."""
    controller = member.controller(name)
    config = member.get_config()
    rollout = config.rollout_named(name)
    if controller is None or rollout is None or controller.state is None:
        raise LookupError(f'no rollout named "{name}"')
    if command == "rollback":
        controller.command("rollback", reason)
        return
    client = member.client
    if client is None or not member.link.connected:
        raise FleetUnavailable(f"Redis unreachable ({member.link.last_error}): only rollback works now")
    version = canary_version(config, rollout)
    for _ in range(5):
        try:
            raw = await client.get(member.keys.state(rollout.name))
            doc = decode_state(raw) if raw is not None else None
        except DOWN as exc:
            raise FleetUnavailable(f"Redis unreachable: {exc}") from None
        except (ResponseError, ValueError) as exc:
            raise FleetUnavailable(f"the fleet state is unreadable ({exc}); the leader replaces it") from None
        now = time.time()
        if doc is None:
            base, base_version = reconcile(None, rollout, version, now), 0
        elif (doc.state.canary, doc.state.canary_version) != (rollout.canary, version):
            raise CommandError(
                f"the fleet state is for {doc.state.canary} version {doc.state.canary_version}; "
                f"this replica has version {version}: reload its config first"
            )
        else:
            base, base_version = reconcile(doc.state, rollout, version, now), doc.version
        new, events = on_command(base, command, rollout, now, reason, full=full)  # CommandError: 409
        if new == base and not events:
            return
        try:
            done = await member.write(client, rollout, PendingWrite(base_version, new, tuple(events)), fenced=False)
        except DOWN as exc:
            raise FleetUnavailable(f"Redis unreachable: {exc}") from None
        if done is not None:
            controller.adopt(new, events, webhook=True)
            return
    raise FleetUnavailable("the fleet state kept changing; try again")
