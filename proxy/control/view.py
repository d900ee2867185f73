"""What the admin API, /status, /metrics and the worker sync read of the running proxy.

They receive this narrow view instead of importing the app that wires them (which imports them):
the imports point one way, and each of them can be built around a stand-in in a test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.analysis.manager import RolloutManager
    from proxy.analysis.rollout import RolloutState
    from proxy.analysis.stats import Stats
    from proxy.config.model import Config
    from proxy.control.fleet.member import FleetMember
    from proxy.dataplane.plane import DataPlane


class AppView(Protocol):
    """The running proxy as its control surfaces see it (implemented by `control.app.ProxyApp`)."""

    config: Config
    stats: Stats
    plane: DataPlane | None
    controller: RolloutManager | None
    fleet: FleetMember | None  # fleet mode: this replica's membership
    clock: Callable[[], float]
    loaded_at: float
    last_error: str | None
    last_error_at: float | None
    remote_states: dict[str, RolloutState]  # followers: the leader's rollout states, by name

    @property
    def draining(self) -> bool: ...

    async def reload(self, reason: str = "file") -> tuple[bool, str]: ...

    def metrics_stats(self) -> Stats: ...

    def apply_remote_state(self, state: RolloutState | Mapping[str, RolloutState] | None) -> None: ...
