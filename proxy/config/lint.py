"""Warnings `validate` (and `run`) print about a valid config that probably does not do what was meant."""

from __future__ import annotations

import time

from proxy.config.certs import CertError, cert_info
from proxy.config.hosts import shadowed_routes
from proxy.config.model import Config


def config_warnings(cfg: Config) -> list[str]:
    """Routes that can never match because of host rules, mirrors whose `analyze` judges nothing,
    and listener certificates that have expired (served anyway: a warning, not an error)."""
    out = shadowed_routes(cfg.routes) + _expired(cfg)
    for i, route in enumerate(cfg.routes):
        m = route.mirror
        if m is None or not m.analyze:
            continue
        rollout = cfg.rollout_of(m.to)
        if rollout is None or rollout.canary != m.to:
            out.append(
                f'routes[{i}].mirror.analyze: "{m.to}" is no rollout\'s canary, so its mirror results judge nothing'
            )
    return out


def _expired(cfg: Config) -> list[str]:
    out = []
    for path, pair in cfg.tls.pairs() if cfg.tls is not None else ():
        try:
            info = cert_info(pair.cert)
        except CertError:
            continue  # the loader reports it
        if info.expired:
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(info.not_after))
            out.append(f'{path}.cert: certificate "{pair.cert}" expired on {when}; clients will refuse it')
    return out
