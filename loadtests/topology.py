"""Ports, paths and the canary-proxy config the bench uses (kept apart from the lead's demo ports)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Every request carries a user id so the 90/10 split is exercised; 1 in 100 also carries the
# header rule's value, so both routing paths run on both proxies.
USER_HEADER = "x-user-id"
CANARY_HEADER = "x-canary"
CANARY_VALUE = "always"
STABLE_BODY = "stable v1\n"
CANARY_BODY = "canary v2\n"


@dataclass(frozen=True)
class Ports:
    """Loopback ports, all derived from one base so a clash can be moved with ``--base-port``."""

    base: int = 28000

    @property
    def stable(self) -> int:
        return self.base + 1

    @property
    def canary(self) -> int:
        return self.base + 2

    @property
    def sink(self) -> int:
        return self.base + 3

    @property
    def ours(self) -> int:
        return self.base + 80

    @property
    def nginx(self) -> int:
        return self.base + 81

    @property
    def admin(self) -> int:
        return self.base + 901

    def fresh(self, key: str) -> tuple[int, int]:
        """(listen, admin) of a short-lived instance started for the idle-connection memory test."""
        return (self.base + 85, self.base + 905) if key == "ours" else (self.base + 86, self.base + 906)

    def tls(self, key: str) -> tuple[int, int]:
        """(listen, admin) of the TLS-terminating instance of slot ``key`` (the TLS scenarios)."""
        return (self.base + 87, self.base + 907) if key == "ours" else (self.base + 88, self.base + 908)

    def scaling(self, workers: int) -> tuple[int, int]:
        """(listen, admin) of the extra canary-proxy started with ``workers`` workers."""
        return self.base + 90 + workers, self.base + 910 + workers

    def all(self) -> list[int]:
        return [
            self.stable,
            self.canary,
            self.sink,
            self.ours,
            self.nginx,
            self.admin,
            *self.fresh("ours"),
            *self.fresh("nginx"),
            *self.tls("ours"),
            *self.tls("nginx"),
            *self.scaling(1),
            *self.scaling(2),
        ]


@dataclass(frozen=True)
class Files:
    """Static content the upstream nginx serves (sizes chosen by --quick)."""

    root: Path
    stream_size: int

    @property
    def www(self) -> Path:
        return self.root / "www"

    @property
    def blob(self) -> Path:
        """Sparse file: served for the download test and read by curl for the upload test."""
        return self.www / "blob.bin"

    def create(self) -> None:
        self.www.mkdir(parents=True, exist_ok=True)
        (self.www / "64k.bin").write_bytes(b"x" * 65536)
        with self.blob.open("wb") as f:
            f.truncate(self.stream_size)
        # Read it once: the first read of a hole fills the page cache and would slow whichever proxy
        # happens to go first.
        with self.blob.open("rb", buffering=0) as f:
            while f.read(1 << 20):
                pass


def proxy_config(listen: int, admin: int, ports: Ports, tls: tuple[Path, Path] | None = None) -> str:
    """canary-proxy YAML with the same routing as the nginx proxy, analysis and metrics on; ``tls``
    (cert, key): the listener terminates TLS with that pair."""
    tls_keys = f"tls: {{cert: {tls[0]}, key: {tls[1]}}}\n" if tls is not None else ""
    return tls_keys + f"""\
listen: 127.0.0.1:{listen}
admin: 127.0.0.1:{admin}
upstreams:
  stable: {{endpoints: [http://127.0.0.1:{ports.stable}], version: v1}}
  canary: {{endpoints: [http://127.0.0.1:{ports.canary}], version: v2}}
routes:
  - name: beta
    match: {{headers: {{{CANARY_HEADER}: {{exact: {CANARY_VALUE}}}}}}}
    to: canary
  - name: default
    split: {{stable: 90, canary: 10}}
    sticky: {{header: {USER_HEADER}}}
access_log: false
limits: {{max_connections: 30000}}
rollout: {{canary: canary, baseline: stable, window: 60s, min_requests: 100}}
"""
