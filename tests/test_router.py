"""Pure routing: matchers, route order, sticky buckets and their monotonicity."""

from __future__ import annotations

import random

import pytest

from proxy.routing.router import (
    BUCKETS,
    RequestView,
    RouteRule,
    SplitTable,
    parse_cookies,
    parse_query,
    select,
    sticky_bucket,
)


def view(headers: dict[bytes, bytes] | None = None, path: bytes = b"/", query: bytes = b"") -> RequestView:
    return RequestView(b"GET", path, query, headers or {})


def test_sticky_bucket_is_stable_and_in_range() -> None:
    assert sticky_bucket(b"user-1") == sticky_bucket(b"user-1")
    buckets = {sticky_bucket(f"user-{i}".encode()) for i in range(2000)}
    assert all(0 <= b < BUCKETS for b in buckets)
    assert len(buckets) > 1500  # well spread, not a handful of values


def test_sticky_bucket_is_uniform_enough() -> None:
    n = 20000
    below_5pct = sum(sticky_bucket(f"u{i}".encode()) < BUCKETS * 5 // 100 for i in range(n))
    assert 0.04 * n < below_5pct < 0.06 * n


def test_split_table_layout_is_cumulative_in_config_order() -> None:
    table = SplitTable((("stable", 95.0), ("canary", 5.0)))
    assert table.uppers == (9500, 10000)
    assert table.pick(0) == "stable"
    assert table.pick(9499) == "stable"
    assert table.pick(9500) == "canary"
    assert table.pick(9999) == "canary"


def test_zero_weight_entries_get_no_buckets() -> None:
    table = SplitTable((("stable", 100.0), ("canary", 0.0)))
    assert {table.pick(b) for b in range(0, BUCKETS, 7)} == {"stable"}
    empty: SplitTable[str] = SplitTable((("a", 0.0),))
    assert empty.pick(5) is None


def test_decimal_weights_have_basis_point_resolution() -> None:
    table = SplitTable((("stable", 99.5), ("canary", 0.5)))
    assert sum(table.pick(b) == "canary" for b in range(BUCKETS)) == 50


@pytest.mark.parametrize("old,new", [(5, 10), (10, 25), (1, 50), (0.5, 99.5)])
def test_raising_the_canary_only_moves_users_towards_it(old: float, new: float) -> None:
    before = SplitTable((("stable", 100 - old), ("canary", old)))
    after = SplitTable((("stable", 100 - new), ("canary", new)))
    users = [f"user-{i}".encode() for i in range(5000)]
    for u in users:
        b = sticky_bucket(u)
        if before.pick(b) == "canary":
            assert after.pick(b) == "canary", u
    moved = sum(before.pick(sticky_bucket(u)) != after.pick(sticky_bucket(u)) for u in users)
    assert moved > 0


def _rules() -> tuple[RouteRule[str], ...]:
    return (
        RouteRule(0, "beta", lambda v: v.headers.get(b"user-type") == b"beta-tester", "canary", None),
        RouteRule(1, "cookie", lambda v: v.cookie(b"canary") == b"always", "canary", None),
        RouteRule(2, "default", None, None, SplitTable((("stable", 90.0), ("canary", 10.0))), b"x-user-id"),
    )


def test_first_matching_route_wins() -> None:
    rules = _rules()
    picked = select(rules, view({b"user-type": b"beta-tester"}), random.random)
    assert picked is not None and picked[0].name == "beta" and picked[1] == "canary"
    picked = select(rules, view({b"cookie": b"a=1; canary=always"}), random.random)
    assert picked is not None and picked[0].name == "cookie"
    picked = select(rules, view({b"user-type": b"other"}), lambda: 0.0)
    assert picked is not None and picked[0].name == "default" and picked[1] == "stable"


def test_sticky_key_overrides_randomness() -> None:
    rules = _rules()
    results = {select(rules, view({b"x-user-id": b"alice"}), random.random)[1] for _ in range(50)}  # type: ignore[index]
    assert len(results) == 1


def test_without_key_the_random_source_decides() -> None:
    rules = _rules()
    assert select(rules, view(), lambda: 0.95)[1] == "canary"  # type: ignore[index]
    assert select(rules, view(), lambda: 0.10)[1] == "stable"  # type: ignore[index]


def test_no_matching_route() -> None:
    rules = _rules()[:2]
    assert select(rules, view(), random.random) is None


def test_cookie_and_query_parsing() -> None:
    assert parse_cookies(b'a=1; b="two"; a=3;junk; c=') == {b"a": b"1", b"b": b"two", b"c": b""}
    parsed = parse_query(b"x=1&x=2&name=J%C3%BCrgen&flag")
    assert parsed == {b"x": b"1", b"name": "Jürgen".encode(), b"flag": b""}
