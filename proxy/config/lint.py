"""Warnings `validate` (and `run`) print about a valid config that probably does not do what was meant."""

from __future__ import annotations

from proxy.config.hosts import shadowed_routes
from proxy.config.model import Config


def config_warnings(cfg: Config) -> list[str]:
    """Routes that can never match because of host rules, and mirrors whose `analyze` judges nothing."""
    out = shadowed_routes(cfg.routes)
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
