"""The YAML config loader: exact dataclasses for good input, exact `path: message (line N)` for bad."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import ConfigError, load_config, parse_config
from proxy.config.model import (
    AccessLog,
    Address,
    Config,
    Endpoint,
    FastFail,
    Limits,
    Match,
    Metrics,
    OutlierDetection,
    Retries,
    Rollout,
    Route,
    Sticky,
    StringMatch,
    Thresholds,
    Timeouts,
    Upstream,
)
from proxy.config.summary import summarize
from proxy.config.units import fmt_duration, fmt_number, fmt_size, parse_duration, parse_size

REPO = Path(__file__).resolve().parent.parent
NO_ENV: dict[str, str] = {}

# The example, verbatim apart from comments.
SPEC_EXAMPLE = """\
listen: 0.0.0.0:8080
admin: 127.0.0.1:9901
upstreams:
  stable:
    endpoints: [http://127.0.0.1:9001]
    version: v1.2.0
  canary:
    endpoints: [http://127.0.0.1:9002]
    version: v1.3.0
routes:
  - name: beta-testers
    match:
      headers:
        user-type: {exact: beta-tester}
    to: canary
  - name: opt-in-cookie
    match:
      cookies:
        canary: {exact: always}
    to: canary
  - name: default
    split: {stable: 95, canary: 5}
    sticky: {header: x-user-id}
timeouts: {connect: 2s, response: 30s, idle: 60s, client_header: 10s}
"""

# Lines 1-9; extra top-level sections appended to it start at line 10.
BASE = """\
listen: 0.0.0.0:8080
upstreams:
  stable:
    endpoints: [http://127.0.0.1:9001]
  canary:
    endpoints: [http://127.0.0.1:9002]
routes:
  - name: default
    to: stable
"""

# Lines 1-7; a routes list appended to it starts at line 8.
HEAD = """\
listen: 0.0.0.0:8080
upstreams:
  stable:
    endpoints: [http://127.0.0.1:9001]
  canary:
    endpoints: [http://127.0.0.1:9002]
routes:
"""

UPSTREAMS = {
    "stable": Upstream("stable", (Endpoint("127.0.0.1", 9001),)),
    "canary": Upstream("canary", (Endpoint("127.0.0.1", 9002),)),
}


def parse(text: str) -> Config:
    return parse_config(text, env=NO_ENV)


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env=NO_ENV if env is None else env)
    return info.value.errors


# -- good configs ------------------------------------------------------------------------------------


def test_spec_example_parses_into_exact_dataclasses() -> None:
    cfg = parse(SPEC_EXAMPLE)
    assert cfg == Config(
        listen=Address("0.0.0.0", 8080),
        admin=Address("127.0.0.1", 9901),
        upstreams={
            "stable": Upstream("stable", (Endpoint("127.0.0.1", 9001),), "v1.2.0"),
            "canary": Upstream("canary", (Endpoint("127.0.0.1", 9002),), "v1.3.0"),
        },
        routes=(
            Route("beta-testers", Match(headers=(("user-type", StringMatch("exact", "beta-tester")),)), "canary"),
            Route("opt-in-cookie", Match(cookies=(("canary", StringMatch("exact", "always")),)), "canary"),
            Route("default", None, split=(("stable", 95.0), ("canary", 5.0)), sticky=Sticky(header="x-user-id")),
        ),
        timeouts=Timeouts(connect=2.0, response=30.0, idle=60.0, client_header=10.0),
        source_hash=hashlib.sha256(SPEC_EXAMPLE.encode()).hexdigest()[:12],
    )
    assert list(cfg.upstreams) == ["stable", "canary"]  # config order kept


def test_every_optional_section_parses() -> None:
    cfg = parse(
        BASE
        + """\
admin: "[::1]:9901"
timeouts: {client_body: 1m30s, send: 1.5s}
limits:
  {max_header_size: 16k, max_headers: 50, max_url_length: 4096, max_body_size: 10MiB, max_connections: 7}
rollout:
  canary: canary
  baseline: stable
  steps: [0.5, 5, 25.5, 100]
  interval: 4s
  window: 10s
  min_requests: 20
  error_statuses: [5XX, 429, "503", 4xx, 5xx]
  confidence: 0.95
  thresholds: {max_error_rate: 0.1, max_error_rate_increase: null, max_p99: 800ms, max_p99_ratio: 1.5,
               max_error_rate_ratio: 2, max_median_ratio: 1.25}
  fast_fail: {consecutive_errors: 0}
  canary_try_timeout: 750ms
  state_file: /var/lib/canary/state.json
  webhook: https://hooks.example.com/x
metrics: {buckets: [0.001, 0.1, 1, 10]}
access_log: {path: /tmp/access.log}
retries: {attempts: 0, budget_percent: 12.5, min_concurrent: 1}
outlier_detection: {consecutive_failures: 3, base_ejection_time: 1s, max_ejection_time: 10s}
trusted_proxies: [10.0.0.0/8, 127.0.0.1, "::1", 192.168.1.7/24]
admin_token: s3cret
shutdown_grace: 0
"""
    )
    assert cfg.admin == Address("::1", 9901)
    assert cfg.timeouts == Timeouts(client_body=90.0, send=1.5)
    assert cfg.limits == Limits(16384, 50, 4096, 10 * 1024 * 1024, 7)
    assert cfg.rollout == Rollout(
        canary="canary",
        baseline="stable",
        steps=(0.5, 5.0, 25.5, 100.0),
        interval=4.0,
        window=10.0,
        min_requests=20,
        error_statuses=("5xx", "429", "503", "4xx"),
        confidence=0.95,
        thresholds=Thresholds(0.1, None, 0.8, 1.5, max_error_rate_ratio=2.0, max_median_ratio=1.25),
        fast_fail=FastFail(0),
        state_file="/var/lib/canary/state.json",
        webhook="https://hooks.example.com/x",
        canary_try_timeout=0.75,
    )
    assert cfg.metrics == Metrics((0.001, 0.1, 1.0, 10.0))
    assert cfg.access_log == AccessLog(True, "/tmp/access.log")
    assert cfg.retries == Retries(0, 12.5, 1)
    assert cfg.outlier_detection == OutlierDetection(3, 1.0, 10.0)
    assert cfg.trusted_proxies == ("10.0.0.0/8", "127.0.0.1/32", "::1/128", "192.168.1.0/24")
    assert cfg.admin_token == "s3cret"
    assert cfg.shutdown_grace == 0.0


def test_defaults_when_sections_are_absent_or_empty() -> None:
    cfg = parse(BASE + "timeouts:\nlimits:\nrollout:\naccess_log: false\n")
    assert cfg.admin == Address("127.0.0.1", 9901)
    assert cfg.timeouts == Timeouts()
    assert cfg.limits == Limits()
    assert cfg.rollout is None
    assert cfg.metrics == Metrics()
    assert cfg.access_log == AccessLog(False, None)
    assert cfg.retries == Retries()
    assert cfg.outlier_detection == OutlierDetection()
    assert cfg.trusted_proxies == ()
    assert cfg.admin_token is None
    assert cfg.shutdown_grace == 20.0
    assert cfg.rollout is None
    minimal = parse(BASE + "rollout: {canary: canary, baseline: stable}\n").rollout
    assert minimal == Rollout("canary", "stable")


def test_match_forms() -> None:
    cfg = parse(
        HEAD
        + """\
  - name: all-parts
    match:
      headers:
        User-Type: beta-tester
        X-Version: 1.10
        X-Flag: yes
        X-Re: {regex: "v[0-9]+", invert: true}
        X-Gone: {present: false}
      cookies: {Session: {prefix: abc}}
      query: {"debug mode": {contains: "1"}, q: {suffix: ""}}
      path_prefix: /api
      methods: [get, POST, Get]
    to: canary
  - name: rest
    split: {stable: 99.5, canary: 0.5}
    sticky: {cookie: Session-ID}
    max_body_size: 1k
"""
    )
    assert cfg.routes == (
        Route(
            "all-parts",
            Match(
                headers=(
                    ("user-type", StringMatch("exact", "beta-tester")),
                    ("x-version", StringMatch("exact", "1.10")),  # YAML would have made it 1.1
                    ("x-flag", StringMatch("exact", "yes")),  # ... and this True
                    ("x-re", StringMatch("regex", "v[0-9]+", invert=True)),
                    ("x-gone", StringMatch("present", False)),
                ),
                cookies=(("Session", StringMatch("prefix", "abc")),),
                query=(("debug mode", StringMatch("contains", "1")), ("q", StringMatch("suffix", ""))),
                path_prefix="/api",
                methods=("GET", "POST"),
            ),
            to="canary",
        ),
        Route(
            "rest",
            None,
            split=(("stable", 99.5), ("canary", 0.5)),
            sticky=Sticky(cookie="Session-ID"),
            max_body_size=1024,
        ),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:8080", Address("0.0.0.0", 8080)),
        (":8080", Address("0.0.0.0", 8080)),
        ("8080", Address("0.0.0.0", 8080)),
        ('"[::1]:0"', Address("::1", 0)),
        ("localhost:1", Address("localhost", 1)),
    ],
)
def test_listen_forms(text: str, expected: Address) -> None:
    assert parse(BASE.replace("0.0.0.0:8080", text)).listen == expected


def test_listen_equal_admin_allowed_for_ephemeral_ports() -> None:
    cfg = parse(BASE.replace("0.0.0.0:8080", "127.0.0.1:0") + "admin: 127.0.0.1:0\n")
    assert cfg.listen == cfg.admin == Address("127.0.0.1", 0)


def test_endpoint_forms() -> None:
    cfg = parse(BASE.replace("[http://127.0.0.1:9001]", '[http://Backend.local, "http://[::1]:81/", http://a:1]'))
    assert cfg.upstreams["stable"].endpoints == (
        Endpoint("backend.local", 80),
        Endpoint("::1", 81),
        Endpoint("a", 1),
    )


def test_anchors_merge_keys_and_extension_keys() -> None:
    cfg = parse(
        """\
x-common: &common
  endpoints: [http://127.0.0.1:9001]
listen: :8080
upstreams:
  stable: {<<: *common, version: v1}
  canary:
    <<: *common
    endpoints: [http://127.0.0.1:9002]
routes: [{name: r, to: stable}]
"""
    )
    assert cfg.upstreams == {
        "stable": Upstream("stable", (Endpoint("127.0.0.1", 9001),), "v1"),
        "canary": Upstream("canary", (Endpoint("127.0.0.1", 9002),)),
    }


# -- bad configs: one problem each, exact message and line ---------------------------------------------


BAD = [
    # structure and types
    ("- a\n- b\n", "expected a mapping, got list (line 1)"),
    (BASE + "limits: [1]\n", "limits: expected a mapping, got list (line 10)"),
    (BASE + "timeouts: 5\n", "timeouts: expected a mapping, got integer (line 10)"),
    (
        BASE + "lisen: :1\n",
        'lisen: unknown key; did you mean "listen"? (allowed: listen, admin, upstreams, routes, '
        "timeouts, limits, rollout, metrics, access_log, retries, outlier_detection, trusted_proxies,"
        " admin_token, "
        "admin_token_file, admin_hosts, admin_insecure, admin_max_connections, admin_header_timeout,"
        " shutdown_grace, rollouts, fleet, via, max_config_size, tls) (line 10)",
    ),
    (
        BASE + "timeouts: {conect: 1s}\n",
        'timeouts.conect: unknown key; did you mean "connect"? (allowed: connect, '
        "response, idle, client_header, client_body, send) (line 10)",
    ),
    (BASE + "listen: :9\n", "listen: duplicate key (first on line 1) (line 10)"),
    (
        BASE.replace("upstreams:", "upstreams: {}\nx:").replace("x:\n  stable", "x-unused:\n  stable"),
        "upstreams: at least one upstream is required (line 2)",
    ),
    (
        BASE + "bad: [\n",
        "invalid YAML: while parsing a flow node: expected the node content, but found '<stream end>' (line 11)",
    ),
    (
        BASE + "timeouts: {connect: !!binary aGk=}\n",
        "timeouts.connect: expected a duration, got bytes (line 10)",
    ),
    (
        BASE + "admin_token: !thing x\n",
        "admin_token: invalid value: could not determine a constructor for the tag '!thing' (line 10)",
    ),
    # addresses
    (
        BASE.replace("0.0.0.0:8080", "::1:8080"),
        'listen: IPv6 addresses need brackets, e.g. "[::1]:8080", got "::1:8080" (line 1)',
    ),
    (BASE.replace("0.0.0.0:8080", "1.2.3.4:70000"), 'listen: port must be 0..65535, got "70000" (line 1)'),
    (
        BASE.replace("0.0.0.0:8080", "nonsense"),
        'listen: expected "host:port", "[ipv6]:port" or ":port", got "nonsense" (line 1)',
    ),
    (
        BASE.replace("0.0.0.0:8080", '"[1]:80"'),
        'listen: expected "host:port", "[ipv6]:port" or ":port", got "[1]:80" (line 1)',
    ),
    (BASE.replace("0.0.0.0:8080", "[a, b]"), 'listen: expected "host:port", got list (line 1)'),
    (BASE + "admin: 127.0.0.1:8080\n", "admin: must differ from listen (0.0.0.0:8080) (line 10)"),
    # upstreams
    (
        BASE.replace("[http://127.0.0.1:9001]", "[ftp://127.0.0.1:9001]"),
        'upstreams.stable.endpoints[0]: invalid endpoint URL "ftp://127.0.0.1:9001" '
        "(expected http://host:port or https://host:port) (line 4)",
    ),
    (
        BASE.replace("[http://127.0.0.1:9001]", "[]"),
        "upstreams.stable.endpoints: must list at least one endpoint (line 4)",
    ),
    (
        BASE.replace("[http://127.0.0.1:9001]", "[127.0.0.1:9001]"),
        'upstreams.stable.endpoints[0]: invalid endpoint URL "127.0.0.1:9001" '
        "(expected http://host:port or https://host:port) (line 4)",
    ),
    (
        BASE.replace("[http://127.0.0.1:9001]", "[http://a:99999]"),
        'upstreams.stable.endpoints[0]: invalid endpoint URL "http://a:99999": Port out of range 0-65535 (line 4)',
    ),
    (
        BASE.replace("[http://127.0.0.1:9001]", "[http://a/api]"),
        'upstreams.stable.endpoints[0]: endpoint URL must be just http://host:port, got "http://a/api" (line 4)',
    ),
    (
        BASE.replace("[http://127.0.0.1:9001]", "[http://a:80, http://A]"),
        "upstreams.stable.endpoints[1]: duplicate endpoint a:80 (also upstreams.stable.endpoints[0]) (line 4)",
    ),
    (
        BASE.replace("    endpoints: [http://127.0.0.1:9001]\n", "    version: v1\n"),
        'upstreams.stable: missing required key "endpoints" (line 3)',
    ),
    (
        BASE.replace("  canary:", '  "can ary":').replace("to: stable", "to: stable"),
        'upstreams."can ary": invalid upstream name (use letters, digits, ".", "_", "-") (line 5)',
    ),
    (
        BASE.replace("  canary:\n    endpoints: [http://127.0.0.1:9002]\n", "  canary:\n"),
        "upstreams.canary: expected a mapping, got null (line 5)",
    ),
    # routes
    (
        BASE.replace("routes:\n  - name: default\n    to: stable\n", "routes: []\n"),
        "routes: at least one route is required (line 7)",
    ),
    (
        HEAD + "  - name: a\n    to: canry\n",
        'routes[0].to: unknown upstream "canry" (known: stable, canary) (line 9)',
    ),
    (
        HEAD
        + "  - name: a\n    match: {path_prefix: /}\n    to: stable\n"
        + "  - name: d\n    split: {stable: 90, canary: 5}\n",
        "routes[1].split: weights sum to 95, expected 100 (line 12)",
    ),
    (
        HEAD + "  - name: d\n    split: {stable: 33.3, canary: 33.3, x: 33.4}\n",
        'routes[0].split.x: unknown upstream "x" (known: stable, canary) (line 9)',
    ),
    (
        HEAD + "  - name: d\n    split: {stable: 105, canary: -5}\n",
        "routes[0].split.canary: must be >= 0, got -5 (line 9)",
    ),
    (
        HEAD + "  - name: d\n    split: {stable: 100, canary: lots}\n",
        "routes[0].split.canary: expected a number, got string (line 9)",
    ),
    (HEAD + "  - name: d\n    split: {}\n", "routes[0].split: must name at least one upstream (line 9)"),
    (HEAD + "  - name: d\n    split: [stable]\n", "routes[0].split: expected a mapping, got list (line 9)"),
    (
        HEAD + "  - name: a\n    to: stable\n    split: {stable: 100}\n",
        'routes[0]: set exactly one of "to" and "split" (got both) (line 8)',
    ),
    (HEAD + "  - name: a\n", 'routes[0]: set exactly one of "to" and "split" (got neither) (line 8)'),
    (HEAD + "  - to: stable\n", 'routes[0]: missing required key "name" (line 8)'),
    (HEAD + "  - name: ''\n    to: stable\n", "routes[0].name: must not be empty (line 8)"),
    (
        HEAD + "  - name: a\n    match: {path_prefix: /a}\n    to: stable\n  - name: a\n    to: canary\n",
        'routes[1].name: duplicate route name "a" (also routes[0]) (line 11)',
    ),
    (
        HEAD + "  - name: a\n    to: stable\n    sticky: {header: x}\n",
        'routes[0].sticky: only allowed with "split" (line 10)',
    ),
    (
        HEAD + "  - name: a\n    split: {stable: 100}\n    sticky: {header: x, cookie: y}\n",
        'routes[0].sticky: set exactly one of "header" and "cookie" (line 10)',
    ),
    (
        HEAD + "  - name: a\n    split: {stable: 100}\n    sticky: {header: 'x y'}\n",
        'routes[0].sticky.header: invalid header name "x y" (line 10)',
    ),
    (
        HEAD + "  - name: a\n    to: stable\n    max_body_size: 1 parsec\n",
        'routes[0].max_body_size: invalid size "1 parsec" (use e.g. 512B, 32KiB, 10MiB) (line 10)',
    ),
    (
        HEAD + "  - name: a\n    to: stable\n    mach: {}\n",
        'routes[0].mach: unknown key; did you mean "match"? (allowed: name, match, to, split, sticky,'
        " max_body_size, mirror) "
        "(line 10)",
    ),
    (
        HEAD + "  - name: a\n    to: stable\n  - name: b\n    to: canary\n",
        'routes[1]: unreachable: routes[0] ("a") matches every request (line 10)',
    ),
    # match
    (
        HEAD + "  - name: a\n    match: {}\n    to: stable\n",
        "routes[0].match: match must not be empty; omit it to match everything (line 9)",
    ),
    (
        HEAD + "  - name: a\n    match:\n    to: stable\n",
        "routes[0].match: match must not be empty; omit it to match everything (line 9)",
    ),
    (
        HEAD + "  - name: a\n    match: {headers: {}}\n    to: stable\n",
        "routes[0].match: match must not be empty; omit it to match everything (line 9)",
    ),
    (
        HEAD + "  - name: a\n    match: {header: {a: b}}\n    to: stable\n",
        'routes[0].match.header: unknown key; did you mean "headers"? (allowed: headers, cookies,'
        " query, path_prefix, "
        "methods, host) (line 9)",
    ),
    (
        HEAD + "  - name: a\n    match: {headers: {x: {regex: '(a'}}}\n    to: stable\n",
        'routes[0].match.headers.x.regex: invalid regex "(a": missing ): (a (regexes use RE2 syntax: no'
        " backreferences or lookaround) (line 9)",
    ),
    (
        HEAD + "  - name: a\n    match: {headers: {x: {exact: a, prefix: b}}}\n    to: stable\n",
        "routes[0].match.headers.x: expected exactly one of exact, prefix, suffix, contains, regex,"
        " present, got exact, "
        "prefix (line 9)",
    ),
    (
        HEAD + "  - name: a\n    match: {headers: {x: {invert: true}}}\n    to: stable\n",
        "routes[0].match.headers.x: expected exactly one of exact, prefix, suffix, contains, regex, present (line 9)",
    ),
    (
        HEAD + "  - name: a\n    match: {headers: {x: {equals: a}}}\n    to: stable\n",
        "routes[0].match.headers.x.equals: unknown key (allowed: exact, prefix, suffix, contains,"
        " regex, present, "
        "invert) (line 9)",
    ),
    (
        HEAD + "  - name: a\n    match: {cookies: {c: {present: maybe}}}\n    to: stable\n",
        "routes[0].match.cookies.c.present: expected true or false, got string (line 9)",
    ),
    (
        HEAD + "  - name: a\n    match: {headers: {x: }}\n    to: stable\n",
        "routes[0].match.headers.x: expected a string or a matcher like {exact: value}, got null (line 9)",
    ),
    (
        HEAD + "  - name: a\n    match: {headers: {'bad header': a}}\n    to: stable\n",
        'routes[0].match.headers."bad header": invalid header name "bad header" (line 9)',
    ),
    (
        HEAD + "  - name: a\n    match: {path_prefix: api}\n    to: stable\n",
        'routes[0].match.path_prefix: must start with "/", got "api" (line 9)',
    ),
    (
        HEAD + "  - name: a\n    match: {methods: GET}\n    to: stable\n",
        "routes[0].match.methods: expected a list, got string (line 9)",
    ),
    (
        HEAD + "  - name: a\n    match: {methods: ['GE T']}\n    to: stable\n",
        'routes[0].match.methods[0]: invalid method "GE T" (line 9)',
    ),
    # durations, sizes, numbers
    (
        BASE + "timeouts: {connect: 2x}\n",
        'timeouts.connect: invalid duration "2x" (use e.g. 500ms, 2s, 1m) (line 10)',
    ),
    (BASE + "timeouts:\n  connect: 0\n", "timeouts.connect: must be > 0, got 0 (line 11)"),
    (BASE + "timeouts:\n  idle: -5s\n", "timeouts.idle: must be > 0, got -5s (line 11)"),
    (BASE + "timeouts:\n  idle: true\n", "timeouts.idle: expected a duration, got boolean (line 11)"),
    (BASE + "timeouts:\n  idle: .inf\n", "timeouts.idle: must be a finite duration (line 11)"),
    (BASE + "shutdown_grace: -1s\n", "shutdown_grace: must be >= 0, got -1s (line 10)"),
    (BASE + "limits: {max_header_size: 0}\n", "limits.max_header_size: must be >= 1, got 0 (line 10)"),
    (
        BASE + "limits: {max_url_length: 1.5B}\n",
        'limits.max_url_length: invalid size "1.5B": not a whole number of bytes (line 10)',
    ),
    (BASE + "limits: {max_headers: 1.5}\n", "limits.max_headers: expected an integer, got number (line 10)"),
    (BASE + "limits: {max_connections: 0}\n", "limits.max_connections: must be >= 1, got 0 (line 10)"),
    (
        BASE + "retries: {budget_percent: 101}\n",
        "retries.budget_percent: must be >= 0 and <= 100, got 101 (line 10)",
    ),
    (BASE + "retries: {attempts: -1}\n", "retries.attempts: must be >= 0, got -1 (line 10)"),
    (
        BASE + "outlier_detection: {base_ejection_time: 10m}\n",
        "outlier_detection.base_ejection_time: must be <= max_ejection_time (5m) (line 10)",
    ),
    (
        BASE + "outlier_detection: {base_ejection_time: 10s, max_ejection_time: 5s}\n",
        "outlier_detection.max_ejection_time: must be >= base_ejection_time (10s) (line 10)",
    ),
    (
        BASE + "metrics: {buckets: [0.1, 0.05]}\n",
        "metrics.buckets[1]: buckets must increase strictly (0.05 after 0.1) (line 10)",
    ),
    (BASE + "metrics: {buckets: [0, 1]}\n", "metrics.buckets[0]: must be > 0, got 0 (line 10)"),
    (BASE + "metrics: {buckets: []}\n", "metrics.buckets: must not be empty (line 10)"),
    (
        BASE + "access_log: {enabled: 1}\n",
        "access_log.enabled: expected true or false, got integer (line 10)",
    ),
    (BASE + "access_log: stdout\n", "access_log: expected true or false, got string (line 10)"),
    (
        BASE + "trusted_proxies: [10.0.0.0/8, 300.1.1.1]\n",
        'trusted_proxies[1]: invalid IP address or CIDR "300.1.1.1" (line 10)',
    ),
    (BASE + "trusted_proxies: 10.0.0.0/8\n", "trusted_proxies: expected a list, got string (line 10)"),
    # rollout
    (BASE + "rollout: {canary: canary}\n", 'rollout: missing required key "baseline" (line 10)'),
    (
        BASE + "rollout: {canary: canry, baseline: stable}\n",
        'rollout.canary: unknown upstream "canry" (known: stable, canary) (line 10)',
    ),
    (
        BASE + "rollout:\n  canary: canary\n  baseline: canary\n",
        'rollout.baseline: must differ from canary ("canary") (line 12)',
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, steps: [5, 5]}\n",
        "rollout.steps[1]: steps must increase strictly (5 after 5) (line 10)",
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, steps: [0, 5]}\n",
        "rollout.steps[0]: must be > 0 and <= 100, got 0 (line 10)",
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, steps: [50, 150]}\n",
        "rollout.steps[1]: must be > 0 and <= 100, got 150 (line 10)",
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, interval: 0s}\n",
        "rollout.interval: must be > 0, got 0s (line 10)",
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, window: 1x}\n",
        'rollout.window: invalid duration "1x" (use e.g. 500ms, 2s, 1m) (line 10)',
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, min_requests: 0}\n",
        "rollout.min_requests: must be >= 1, got 0 (line 10)",
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, error_statuses: [5xx, 6xx]}\n",
        'rollout.error_statuses[1]: invalid status "6xx" (use a class like "5xx" or a code like 503) (line 10)',
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, error_statuses: [42]}\n",
        'rollout.error_statuses[0]: invalid status "42" (use a class like "5xx" or a code like 503) (line 10)',
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, error_statuses: []}\n",
        "rollout.error_statuses: must list at least one status (line 10)",
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, confidence: 0.5}\n",
        "rollout.confidence: must be > 0.5 and < 1, got 0.5 (line 10)",
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, thresholds: {max_error_rate: 5}}\n",
        "rollout.thresholds.max_error_rate: must be >= 0 and <= 1, got 5 (line 10)",
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, thresholds: {max_p99_ratio: 0}}\n",
        "rollout.thresholds.max_p99_ratio: must be > 0, got 0 (line 10)",
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, thresholds: {max_error_rate_ratio: 0.5}}\n",
        "rollout.thresholds.max_error_rate_ratio: must be >= 1, got 0.5 (line 10)",
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, thresholds: {max_median_ratio: fast}}\n",
        "rollout.thresholds.max_median_ratio: expected a number, got string (line 10)",
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, canary_try_timeout: 0s}\n",
        "rollout.canary_try_timeout: must be > 0, got 0s (line 10)",
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, thresholds: {max_p99: fast}}\n",
        'rollout.thresholds.max_p99: invalid duration "fast" (use e.g. 500ms, 2s, 1m) (line 10)',
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, fast_fail: {consecutive_errors: -1}}\n",
        "rollout.fast_fail.consecutive_errors: must be >= 0, got -1 (line 10)",
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, webhook: ftp://x}\n",
        'rollout.webhook: invalid webhook URL "ftp://x" (expected http://... or https://...) (line 10)',
    ),
    (
        BASE + "rollout: {canary: canary, baseline: stable, state_file: 7}\n",
        "rollout.state_file: expected a string, got integer (line 10)",
    ),
    # admin token
    (
        BASE + "admin_token: a\nadmin_token_file: /x\n",
        'admin_token_file: set only one of "admin_token" and "admin_token_file" (line 11)',
    ),
    (
        BASE + "admin_token_file: /nonexistent/token\n",
        'admin_token_file: cannot read "/nonexistent/token": No such file or directory (line 10)',
    ),
]


@pytest.mark.parametrize(("text", "error"), BAD)
def test_each_bad_value_gives_its_exact_error(text: str, error: str) -> None:
    assert errors_of(text) == [error]


def test_every_error_is_reported_in_file_order() -> None:
    text = """\
listen: 0.0.0.0:8080
upstreams:
  stable:
    endpoints: [ftp://127.0.0.1:9001]
  canary:
    endpoints: [http://127.0.0.1:9002]
routes:
  - name: beta
    match: {headers: {user-type: {exact: beta}}}
    to: canry
  - name: default
    split: {stable: 90, canary: 5}
  - name: late
    to: stable
timeouts: {connect: 2x}
bogus: 1
"""
    assert errors_of(text) == [
        'upstreams.stable.endpoints[0]: invalid endpoint URL "ftp://127.0.0.1:9001" '
        "(expected http://host:port or https://host:port) (line 4)",
        'routes[0].to: unknown upstream "canry" (known: stable, canary) (line 10)',
        "routes[1].split: weights sum to 95, expected 100 (line 12)",
        'routes[2]: unreachable: routes[1] ("default") matches every request (line 13)',
        'timeouts.connect: invalid duration "2x" (use e.g. 500ms, 2s, 1m) (line 15)',
        "bogus: unknown key (allowed: listen, admin, upstreams, routes, timeouts, limits, rollout, metrics, "
        "access_log, retries, outlier_detection, trusted_proxies, admin_token, admin_token_file, "
        "admin_hosts, admin_insecure, admin_max_connections, admin_header_timeout, "
        "shutdown_grace, rollouts, fleet, via, max_config_size, tls) (line 16)",
    ]


def test_missing_top_level_keys() -> None:
    assert errors_of("admin: :9901\n") == [
        'missing required key "listen" (line 1)',
        'missing required key "upstreams" (line 1)',
        'missing required key "routes" (line 1)',
    ]


def test_every_route_after_a_catch_all_is_unreachable() -> None:
    errs = errors_of(HEAD + "  - name: all\n    to: stable\n  - name: b\n    to: canary\n  - name: c\n    to: canary\n")
    assert errs == [
        'routes[1]: unreachable: routes[0] ("all") matches every request (line 10)',
        'routes[2]: unreachable: routes[0] ("all") matches every request (line 12)',
    ]


@pytest.mark.parametrize("text", ["", "# nothing\n", "---\n"])
def test_empty_config(text: str) -> None:
    assert errors_of(text) == ["config is empty"]


def test_split_tolerance_and_number_format() -> None:
    # 3 x 33.3333333 is within 1e-6 of 100 only with enough digits.
    ok = parse(HEAD + "  - name: d\n    split: {stable: 33.3333333, canary: 66.6666667}\n")
    assert ok.routes[0].split == (("stable", 33.3333333), ("canary", 66.6666667))
    errs = errors_of(HEAD + "  - name: d\n    split: {stable: 99.4, canary: 0.5}\n")
    assert errs == ["routes[0].split: weights sum to 99.9, expected 100 (line 9)"]


# -- files, hashes and the admin token --------------------------------------------------------------


def test_load_config_sets_hash_and_path(tmp_path: Path) -> None:
    path = tmp_path / "canary.yaml"
    data = SPEC_EXAMPLE.replace("\n", "\r\n").encode()
    path.write_bytes(data)
    cfg = load_config(str(path), env=NO_ENV)
    assert cfg.source_hash == hashlib.sha256(data).hexdigest()[:12]
    assert cfg.source_path == str(path)
    assert cfg.routes == parse(SPEC_EXAMPLE).routes


def test_load_config_unreadable_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.errors == ["cannot read config file: No such file or directory"]
    assert info.value.source == missing
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert info.value.errors == ["cannot read config file: Is a directory"]


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"listen: \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.errors == ["config file is not valid UTF-8 (byte 8)"]


def test_config_error_names_the_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + "timeouts: {connect: 2x}\n", source="edge.yaml", env=NO_ENV)
    assert str(info.value) == 'edge.yaml: timeouts.connect: invalid duration "2x" (use e.g. 500ms, 2s, 1m) (line 10)'


def test_admin_token_sources(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  from-file\n")
    env = {"CANARY_PROXY_ADMIN_TOKEN": "from-env"}
    assert parse_config(BASE + f"admin_token_file: {token_file}\n", env=env).admin_token == "from-file"
    assert parse_config(BASE + "admin_token: inline\n", env=env).admin_token == "inline"
    assert parse_config(BASE + "admin_token: 12345\n", env=env).admin_token == "12345"
    assert parse_config(BASE, env=env).admin_token == "from-env"
    assert parse_config(BASE, env={"CANARY_PROXY_ADMIN_TOKEN": ""}).admin_token is None
    token_file.write_text("\n")
    assert errors_of(BASE + f"admin_token_file: {token_file}\n") == [
        f'admin_token_file: "{token_file}" is empty (line 10)'
    ]


def test_admin_token_defaults_to_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANARY_PROXY_ADMIN_TOKEN", "process-env")
    assert parse_config(BASE).admin_token == "process-env"
    monkeypatch.delenv("CANARY_PROXY_ADMIN_TOKEN")
    assert parse_config(BASE).admin_token is None


@pytest.mark.parametrize("path", ["config/canary.yaml", "proxy/demo.yaml"])
def test_shipped_configs_load_cleanly(path: str) -> None:
    cfg = load_config(str(REPO / path), env=NO_ENV)
    assert cfg.routes[-1].split == (("stable", 95.0), ("canary", 5.0))


def test_demo_config_contents() -> None:
    cfg = load_config(str(REPO / "proxy/demo.yaml"), env=NO_ENV)
    assert (cfg.listen, cfg.admin) == (Address("127.0.0.1", 8080), Address("127.0.0.1", 9901))
    assert cfg.upstreams == {
        "stable": Upstream("stable", (Endpoint("127.0.0.1", 9001),), "v1.0.0"),
        "canary": Upstream("canary", (Endpoint("127.0.0.1", 9002),), "v1.1.0"),
    }
    assert [r.match for r in cfg.routes] == [
        Match(headers=(("x-canary", StringMatch("exact", "always")),)),
        Match(cookies=(("canary", StringMatch("exact", "always")),)),
        None,
    ]
    assert cfg.routes[-1].sticky == Sticky(header="x-user-id")
    assert cfg.rollout == Rollout(
        canary="canary",
        baseline="stable",
        steps=(5.0, 10.0, 25.0, 50.0),
        interval=4.0,
        window=10.0,
        min_requests=20,
        thresholds=Thresholds(max_error_rate=0.05, max_error_rate_increase=0.02, max_p99=0.8),
        fast_fail=FastFail(10),
    )


# -- robustness: ConfigError and nothing else -----------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    try:
        parse_config(text, env=NO_ENV)
    except ConfigError as e:
        assert e.errors and all(isinstance(m, str) for m in e.errors)


@settings(max_examples=300)
@given(st.data())
def test_mangled_real_config_raises_only_config_error(data: st.DataObject) -> None:
    lines = (REPO / "config/canary.yaml").read_text().splitlines()
    pieces = data.draw(st.lists(st.sampled_from([*lines, "  - 1", "    x: [", "routes: 5", "  a: {b: c}"])))
    try:
        parse_config("\n".join(pieces), env=NO_ENV)
    except ConfigError as e:
        assert e.errors


# -- units and summary -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (2, 2.0),
        (0.25, 0.25),
        ("500ms", 0.5),
        ("2s", 2.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("1m30s", 90.0),
        ("30", 30.0),
        (" 2s ", 2.0),
        ("-1s", -1.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["2x", "", "s", "1 s", "1.2.3s", "ms"])
def test_parse_duration_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (512, 512),
        ("512B", 512),
        ("32KiB", 32768),
        ("8k", 8192),
        ("8KB", 8192),
        ("10MiB", 10485760),
        ("1m", 1048576),
        ("1G", 1073741824),
        ("1.5KiB", 1536),
        ("100", 100),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


def test_formatting_helpers() -> None:
    assert [fmt_number(x) for x in (95.0, 99.5, 0.1 + 0.2, 5)] == ["95", "99.5", "0.3", "5"]
    assert [fmt_duration(x) for x in (0.8, 4, 90, 120, 3600, 0)] == ["800ms", "4s", "90s", "2m", "1h", "0s"]
    assert [fmt_size(x) for x in (32768, 10485760, 1000)] == ["32KiB", "10MiB", "1000B"]


def test_summary_of_demo_config() -> None:
    cfg = load_config(str(REPO / "proxy/demo.yaml"), env=NO_ENV)
    assert summarize(cfg) == "\n".join(
        [
            f"config {REPO / 'proxy/demo.yaml'} (sha256 {cfg.source_hash})",
            "listen 127.0.0.1:8080   admin 127.0.0.1:9901 (token not set)",
            "upstreams:",
            "  stable  v1.0.0  http://127.0.0.1:9001",
            "  canary  v1.1.0  http://127.0.0.1:9002",
            "routes (first match wins):",
            '  1. canary-header  header x-canary == "always" -> canary',
            '  2. canary-cookie  cookie canary == "always" -> canary',
            "  3. default        every request -> stable 95% / canary 5% (sticky on header x-user-id)",
            'rollout: canary "canary" vs baseline "stable"',
            "  steps 5% -> 10% -> 25% -> 50%, every 4s over a 10s window, at least 20 requests, confidence 0.99",
            "  errors: 5xx; roll back on: error rate > 5%, error rate > baseline + 2 pts, p99 > 800ms,"
            " p99 > 1.5x baseline, 10 consecutive errors",
        ]
    )


def test_summary_describes_every_matcher_kind() -> None:
    cfg = parse(
        HEAD
        + """\
  - name: m
    match:
      headers: {a: {prefix: x}, b: {suffix: y, invert: true}, c: {regex: "v[0-9]"}, d: {present: false}}
      query: {q: {contains: z}}
      path_prefix: /api
      methods: [GET]
    split: {stable: 50, canary: 50}
"""
    )
    text = summarize(cfg)
    assert (
        'header a starts with "x" and header b not ends with "y" and header c ~ /v[0-9]/ and header d absent'
        ' and query q contains "z" and path starts with "/api" and method in GET'
        " -> stable 50% / canary 50% (random per request)"
    ) in text
    assert "rollout: none" in text
