"""Config keys of HTTP/2 and gRPC: `upstreams.NAME.protocol`, `rollout.grpc_error_statuses`."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, parse_config

BASE = """listen: 127.0.0.1:0
upstreams:
  stable: {endpoints: [http://127.0.0.1:9001]}
  canary:
    endpoints: [http://127.0.0.1:9002]
    protocol: PROTOCOL
routes:
  - name: default
    split: {stable: 90, canary: 10}
rollout:
  canary: canary
  baseline: stable
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return info.value.errors


def test_protocol_defaults_to_http1_and_h2_marks_every_endpoint() -> None:
    cfg = parse_config(BASE.replace("PROTOCOL", "h2"))
    assert cfg.upstreams["stable"].protocol == "http1" and not cfg.upstreams["stable"].endpoints[0].h2
    canary = cfg.upstreams["canary"]
    assert canary.protocol == "h2" and all(ep.h2 for ep in canary.endpoints)
    assert canary.endpoints[0].pool_key != cfg.upstreams["stable"].endpoints[0].pool_key
    assert canary.endpoints[0].key == "127.0.0.1:9002"  # what /status and logs show


def test_invalid_protocol_is_refused_with_key_path_and_line() -> None:
    errors = errors_of(BASE.replace("PROTOCOL", "http3"))
    assert len(errors) == 1
    assert "upstreams.canary.protocol" in errors[0] and "line 6" in errors[0], errors
    assert "http1, h2" in errors[0]


def test_grpc_error_statuses_names_numbers_and_default() -> None:
    cfg = parse_config(BASE.replace("PROTOCOL", "h2"))
    assert cfg.rollout is not None
    assert cfg.rollout.grpc_error_statuses == (
        "UNKNOWN", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"
    )  # fmt: skip
    cfg = parse_config(BASE.replace("PROTOCOL", "h2") + "  grpc_error_statuses: [unavailable, 13, INTERNAL]\n")
    assert cfg.rollout is not None and cfg.rollout.grpc_error_statuses == ("UNAVAILABLE", "INTERNAL")


def test_bad_grpc_error_statuses_are_refused_with_key_path() -> None:
    errors = errors_of(BASE.replace("PROTOCOL", "h2") + "  grpc_error_statuses: [UNAVAILABLE, NOPE]\n")
    assert len(errors) == 1 and "rollout.grpc_error_statuses" in errors[0] and "NOPE" in errors[0], errors
    errors = errors_of(BASE.replace("PROTOCOL", "h2") + "  grpc_error_statuses: []\n")
    assert "at least one gRPC status" in errors[0]


def test_mirroring_to_an_h2_upstream_is_refused() -> None:
    text = BASE.replace("PROTOCOL", "h2").replace(
        "    split: {stable: 90, canary: 10}\n", "    to: stable\n    mirror: {to: canary, percent: 10}\n"
    )
    errors = errors_of(text)
    assert len(errors) == 1 and "routes[0].mirror.to" in errors[0] and "protocol: h2" in errors[0], errors
