"""A rollout's effect on routing: the split and the `to:` target the router uses, given the
rollout's state. Pure functions."""

from __future__ import annotations

from proxy.analysis.rollout import LATCHED, RolloutState, canary_weight
from proxy.config.model import Rollout


def effective_split(
    route_split: tuple[tuple[str, float], ...], cfg: Rollout | None, state: RolloutState | None
) -> tuple[tuple[str, float], ...]:
    """The split the router uses, given the rollout. Keeps entry order (the bucket layout).

    - rolled back: the canary gets 0 and its configured share goes to the baseline (appended at
      the end when the split has no baseline entry);
    - with steps / promoted: the canary gets the step's weight (100 when promoted), the rest is
      spread over the other entries in proportion to their configured weights (all zero: to the
      baseline);
    - otherwise (no rollout, steady, split without the canary): unchanged.
    The total stays what the config says (100).
    """
    if cfg is None or state is None or all(name != cfg.canary for name, _ in route_split):
        return route_split
    weight = canary_weight(state, cfg)
    if weight is None:
        return route_split
    total = sum(w for _, w in route_split)
    entries = list(route_split)
    if state.phase in LATCHED:
        share = sum(w for name, w in entries if name == cfg.canary)
        out = [(name, 0.0 if name == cfg.canary else w) for name, w in entries]
        return _give(out, cfg.baseline, share)
    canary_total = total * weight / 100.0
    rest = total - canary_total
    others = sum(w for name, w in entries if name != cfg.canary)
    first_canary = True
    out = []
    for name, w in entries:
        if name == cfg.canary:
            # A split naming the canary twice: the first entry carries the share.
            out.append((name, canary_total if first_canary else 0.0))
            first_canary = False
        elif others > 0:
            out.append((name, rest * w / others))
        else:
            out.append((name, 0.0))
    if others > 0:
        return _fix_sum(out, total)
    return _give(out, cfg.baseline, rest)


def _give(entries: list[tuple[str, float]], name: str, share: float) -> tuple[tuple[str, float], ...]:
    """Add `share` to the first entry called `name`, or append one."""
    for i, (n, w) in enumerate(entries):
        if n == name:
            entries[i] = (n, w + share)
            return tuple(entries)
    if share > 0:
        entries.append((name, share))
    return tuple(entries)


def _fix_sum(entries: list[tuple[str, float]], total: float) -> tuple[tuple[str, float], ...]:
    """Put the float rounding residue on the largest entry so the weights add up exactly."""
    residue = total - sum(w for _, w in entries)
    if residue and entries:
        i = max(range(len(entries)), key=lambda k: entries[k][1])
        name, w = entries[i]
        entries[i] = (name, max(w + residue, 0.0))
    return tuple(entries)


def effective_target(to: str, cfg: Rollout | None, state: RolloutState | None) -> str:
    """A route's `to` upstream, given the rollout: the canary goes to the baseline when rolled back."""
    if cfg is None or cfg.mode == "observe":
        return to
    if state is not None and state.phase in LATCHED and to == cfg.canary:
        return cfg.baseline
    return to
