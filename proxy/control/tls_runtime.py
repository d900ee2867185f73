"""The TLS parts of a running proxy: the listener's certificates and the upstreams' client contexts,
rebuilt on every config reload and whenever one of their files changes.

A change of a certificate, key or CA file (cert-manager renewing in place, a Kubernetes Secret
volume swapping its `..data` symlink, `cp` or `mv` over the file) is noticed by polling each file's
identity (device, inode, size, mtime, ctime, after following symlinks) once a second; after the
files have been quiet for a moment, the app reloads its config with reason "certificate". That
reload reads and checks every file again, exactly as at start, so a bad or mismatched pair is
refused like any config error (key path and line) and the last good certificates keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from proxy.analysis.stats import Stats
from proxy.config import Config, ConfigError
from proxy.config.model import UpstreamTLS
from proxy.dataplane.plane import DataPlane
from proxy.dataplane.tls.client import upstream_contexts
from proxy.dataplane.tls.server import ListenerTLSState, ServerContexts, TLSLoadError, build_contexts

log = logging.getLogger("canary_proxy.tls")

POLL_EVERY = 1.0  # seconds between two looks at the certificate files
SETTLE = 0.3  # the files must stay unchanged this long (cert and key are often written one by one)

Signature = tuple[tuple[str, tuple[int, ...] | None], ...]


@dataclass
class Prepared:
    """Contexts built for a config, not yet in use."""

    listener: ServerContexts | None
    upstream: dict[UpstreamTLS, ssl.SSLContext]
    files: dict[str, tuple[int, ...] | None]  # what the files looked like just before reading them


def tls_files(config: Config) -> list[str]:
    """Every certificate, key and CA file the config names (listener and upstreams)."""
    files: list[str] = []
    tls = config.tls
    if tls is not None:
        for _, pair in tls.pairs():
            files += [pair.cert, pair.key]
        if tls.client_ca:
            files.append(tls.client_ca)
    for up in config.upstreams.values():
        for ep in up.endpoints:
            if ep.tls is not None:
                files += [f for f in (ep.tls.ca, ep.tls.cert, ep.tls.key) if f]
    return list(dict.fromkeys(files))


def prepare(config: Config) -> Prepared:
    """Build every context `config` needs (blocking: call it in a thread). Raises ConfigError."""
    files = dict(_signature(tls_files(config)))  # before reading: a later change is seen as one
    try:
        listener = build_contexts(config.tls) if config.tls is not None else None
    except TLSLoadError as e:
        raise ConfigError([str(e)], config.source_path) from None
    try:
        upstream = upstream_contexts(config)
    except (OSError, ValueError) as e:  # a file changed between the check at load and now
        raise ConfigError([f"upstreams: TLS files cannot be loaded: {e}"], config.source_path) from None
    return Prepared(listener, upstream, files)


class TLSRuntime:
    """Owns the listener's TLS state and the certificate file watch of one process."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.listener: ListenerTLSState | None = None
        self._watch: asyncio.Task[None] | None = None
        self.seen: dict[str, tuple[int, ...] | None] = {}  # the files as last loaded (or refused)

    def start(self, config: Config, plane: DataPlane, prepared: Prepared) -> ssl.SSLContext | None:
        """Install `prepared` (before the listener opens); returns the listener's context, if any."""
        plane.set_upstream_tls(prepared.upstream)
        self.seen = dict(prepared.files)
        if config.tls is None or prepared.listener is None:
            return None
        self.listener = ListenerTLSState(config.tls, prepared.listener, self.stats, config.timeouts.client_header)
        _log_loaded(prepared.listener, "loaded")
        return self.listener.dispatcher

    def commit(self, config: Config, plane: DataPlane, prepared: Prepared) -> None:
        """Use `prepared` for new connections (no await: part of a reload's commit)."""
        plane.set_upstream_tls(prepared.upstream)
        self.seen.update(prepared.files)
        if self.listener is not None and config.tls is not None and prepared.listener is not None:
            self.listener.install(config.tls, prepared.listener)
            _log_loaded(prepared.listener, "reloaded")

    def watch(self, config: Callable[[], Config], request: Callable[[str], None]) -> None:
        """Poll the files of `config()` and call `request("certificate")` when one changed."""
        self._watch = asyncio.get_running_loop().create_task(self._poll(config, request))

    async def stop(self) -> None:
        task, self._watch = self._watch, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _poll(self, config: Callable[[], Config], request: Callable[[str], None]) -> None:
        while True:
            try:
                files = tls_files(config())
                now = dict(await asyncio.to_thread(_signature, files))
                seen = self.seen
                changed = [f for f in files if f in seen and seen[f] != now[f]]
                while changed:  # let a renewal finish writing both files
                    await asyncio.sleep(SETTLE)
                    later = dict(await asyncio.to_thread(_signature, files))
                    if later == now:
                        break
                    now = later
                self.seen.update(now)
                if changed:
                    log.info("TLS file changed (%s): reloading", ", ".join(changed))
                    request("certificate")
            except asyncio.CancelledError:
                raise
            except Exception:  # the watch must outlive any one failure
                log.exception("watching the TLS files failed; still watching")
            await asyncio.sleep(POLL_EVERY)


def _signature(files: list[str]) -> Signature:
    out: list[tuple[str, tuple[int, ...] | None]] = []
    for path in files:
        try:
            st = os.stat(path)  # follows symlinks: a swapped `..data` link shows as a new inode
            out.append((path, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)))
        except OSError:
            out.append((path, None))
    return tuple(out)


def _log_loaded(contexts: ServerContexts, what: str) -> None:
    for cert, serial in contexts.serials.items():
        log.info("TLS certificate %s: %s (serial %s)", what, cert, serial)
