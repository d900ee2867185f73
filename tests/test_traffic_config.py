"""Config of the traffic features: sticky.issue, routes[].mirror, match.host; bad input refused with
its key path and line."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, parse_config
from proxy.config.model import CookieIssue, Mirror, Sticky

HEAD = """\
listen: 0.0.0.0:8080
upstreams:
  stable:
    endpoints: [http://127.0.0.1:9001]
  canary:
    endpoints: [http://127.0.0.1:9002]
routes:
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    return info.value.errors


def test_the_issue_examples_load() -> None:
    cfg = parse_config(
        HEAD
        + "  - name: shop\n"
        + '    match: {host: ["shop.example.com", "*.shop.example.com"]}\n'
        + "    split: {stable: 90, canary: 10}\n"
        + "    sticky: {cookie: NAME, issue: {max_age: 30d, secure: true, http_only: true, same_site: lax, path: /}}\n"
        + "    mirror: {to: canary, percent: 10, max_body: 1MiB, analyze: true}\n",
        env={},
    )
    route = cfg.routes[0]
    assert route.match is not None and route.match.hosts == ("shop.example.com", "*.shop.example.com")
    assert route.sticky == Sticky(cookie="NAME", issue=CookieIssue(30 * 86400.0, True, True, "lax", "/"))
    assert route.mirror == Mirror("canary", 10.0, 1024 * 1024, True)


def test_defaults() -> None:
    cfg = parse_config(
        HEAD + "  - name: a\n    split: {stable: 100}\n    sticky: {cookie: c, issue: true}\n"
        "    mirror: {to: canary}\n",
        env={},
    )
    assert cfg.routes[0].sticky == Sticky(cookie="c", issue=CookieIssue())
    assert cfg.routes[0].mirror == Mirror("canary", 100.0, 1024 * 1024, False)


BAD = [
    (
        "  - name: a\n    split: {stable: 90, canary: 10}\n    sticky: {cookie: c, issue: {same_site: loose}}\n",
        'routes[0].sticky.issue.same_site: invalid same_site "loose" (expected strict, lax or none) (line 10)',
    ),
    (
        "  - name: a\n    split: {stable: 90, canary: 10}\n    sticky: {cookie: c, issue: {same_site: none}}\n",
        "routes[0].sticky.issue.same_site: same_site: none needs secure: true (browsers reject such a cookie)"
        " (line 10)",
    ),
    (
        "  - name: a\n    split: {stable: 90, canary: 10}\n    sticky: {header: x-user, issue: true}\n",
        'routes[0].sticky.issue: only allowed with "cookie" (line 10)',
    ),
    (
        "  - name: a\n    split: {stable: 90, canary: 10}\n    sticky: {cookie: c, issue: {max_age: -1s}}\n",
        "routes[0].sticky.issue.max_age: must be > 0, got -1s (line 10)",
    ),
    (
        "  - name: a\n    split: {stable: 90, canary: 10}\n    sticky: {cookie: c, issue: {path: 'a b'}}\n",
        'routes[0].sticky.issue.path: invalid cookie path "a b" (must start with "/", no spaces or ";") (line 10)',
    ),
    (
        "  - name: a\n    split: {stable: 90, canary: 10}\n    sticky: {cookie: c, issue: {secure: maybe}}\n",
        "routes[0].sticky.issue.secure: expected true or false, got string (line 10)",
    ),
    (
        "  - name: a\n    to: stable\n    mirror: {to: canary, percent: 101}\n",
        "routes[0].mirror.percent: must be >= 0 and <= 100, got 101 (line 10)",
    ),
    (
        "  - name: a\n    to: stable\n    mirror: {to: canary, percent: -5}\n",
        "routes[0].mirror.percent: must be >= 0 and <= 100, got -5 (line 10)",
    ),
    (
        "  - name: a\n    to: stable\n    mirror: {to: stable}\n",
        'routes[0].mirror.to: mirror must not point at the route\'s own target ("stable") (line 10)',
    ),
    (
        "  - name: a\n    split: {stable: 100, canary: 0}\n    mirror: {to: stable}\n",
        'routes[0].mirror.to: mirror must not point at the route\'s own target ("stable") (line 10)',
    ),
    (
        "  - name: a\n    to: stable\n    mirror: {to: nowhere}\n",
        'routes[0].mirror.to: unknown upstream "nowhere" (known: stable, canary) (line 10)',
    ),
    (
        "  - name: a\n    to: stable\n    mirror: {percent: 5}\n",
        'routes[0].mirror: missing required key "to" (line 10)',
    ),
    (
        "  - name: a\n    match: {host: ['shop..example.com']}\n    to: stable\n",
        'routes[0].match.host[0]: invalid host name "shop..example.com" (letters, digits, "-" and "." only,'
        " as in DNS) (line 9)",
    ),
    (
        "  - name: a\n    match: {host: ['shop.*.com']}\n    to: stable\n",
        'routes[0].match.host[0]: invalid host "shop.*.com": only a leading "*." wildcard is allowed (line 9)',
    ),
    (
        "  - name: a\n    match: {host: ['shop.example.com:8080']}\n    to: stable\n",
        'routes[0].match.host[0]: invalid host "shop.example.com:8080": no port here (the port is ignored when'
        " matching) (line 9)",
    ),
    (
        "  - name: a\n    match: {host: ['*']}\n    to: stable\n",
        'routes[0].match.host[0]: "*" matches every host: omit match.host instead (line 9)',
    ),
    (
        "  - name: a\n    match: {host: []}\n    to: stable\n",
        "routes[0].match.host: must list at least one host (line 9)",
    ),
    (
        "  - name: a\n    match: {host: ['exa mple.com']}\n    to: stable\n",
        'routes[0].match.host[0]: invalid host name "exa mple.com" (letters, digits, "-" and "." only, as in DNS)'
        " (line 9)",
    ),
    (
        "  - name: a\n    split: {stable: 90, canary: 10}\n    sticky: {cookie: c, issue: {max_age: 500ms}}\n",
        "routes[0].sticky.issue.max_age: must be at least 1s (Max-Age=0 would delete the cookie) (line 10)",
    ),
    (
        "  - name: a\n    match: {host: ['[::1]:8080']}\n    to: stable\n",
        'routes[0].match.host[0]: invalid IPv6 literal "[::1]:8080" (write it as [::1], without a port) (line 9)',
    ),
]


@pytest.mark.parametrize(("routes", "error"), BAD)
def test_bad_input_is_refused_with_its_key_path(routes: str, error: str) -> None:
    assert errors_of(HEAD + routes) == [error]


def test_analyze_without_a_rollout_of_that_canary_is_warned() -> None:
    from proxy.config.lint import config_warnings

    routes = "  - name: a\n    split: {stable: 100, canary: 0}\n    mirror: {to: canary, analyze: true}\n"
    cfg = parse_config(HEAD + routes, env={})
    assert config_warnings(cfg) == [
        'routes[0].mirror.analyze: "canary" is no rollout\'s canary, so its mirror results judge nothing'
    ]
    cfg = parse_config(HEAD + routes + "rollout: {canary: canary, baseline: stable}\n", env={})
    assert config_warnings(cfg) == []


def test_mirror_analyze_into_a_baseline_is_refused() -> None:
    """`analyze: true` makes copies the canary's evidence; into a rollout's baseline it would make
    them the baseline's evidence instead, and judge the real canary against shadow traffic."""
    text = (
        HEAD
        + "  - name: a\n    split: {stable: 90, canary: 10}\n    mirror: {to: stable, analyze: true}\n"
        + "rollout: {canary: canary, baseline: stable}\n"
    )
    assert errors_of(text) == [
        'routes[0].mirror.analyze: "stable" is the baseline of rollout "default": analyze judges a canary (line 10)'
    ]
    ok = parse_config(text.replace("to: stable, analyze: true", "to: canary, analyze: true"), env={})
    assert ok.routes[0].mirror == Mirror("canary", analyze=True)
