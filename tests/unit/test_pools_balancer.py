"""Pools and balancing without sockets: fake upstream legs, a clock moved by hand."""

from __future__ import annotations

from support.fakes import FakeLeg, Plane

from proxy.config.model import Endpoint, OutlierDetection
from proxy.dataplane.balancer import Balancer
from proxy.dataplane.pools import EndpointPool, PoolRegistry


def endpoint(port: int) -> Endpoint:
    return Endpoint(host="10.0.0.1", port=port)


def pool(port: int = 80, plane: Plane | None = None) -> EndpointPool:
    return EndpointPool(endpoint(port), plane or Plane(), FakeLeg)  # type: ignore[arg-type]


OD = OutlierDetection(consecutive_failures=3, base_ejection_time=30.0, max_ejection_time=300.0)


def test_released_connections_are_reused_with_an_idle_deadline() -> None:
    plane = Plane(now=50.0)
    p = pool(plane=plane)
    leg = FakeLeg()
    leg.client, leg.started = object(), True
    p.release(leg, True, 60.0)  # type: ignore[arg-type]
    assert leg.client is None and not leg.started and leg.deadline == 110.0
    assert p.take_idle() is leg and leg.reused
    assert p.take_idle() is None


def test_unreusable_closed_or_retired_connections_are_closed_not_pooled() -> None:
    p = pool()
    a, b = FakeLeg(), FakeLeg()
    p.release(a, False, 60.0)  # type: ignore[arg-type]
    assert b.transport is not None
    b.transport.closing = True
    p.release(b, True, 60.0)  # type: ignore[arg-type]
    assert a.closed and b.closed and p.take_idle() is None
    c = FakeLeg()
    p.release(c, True, 60.0)  # type: ignore[arg-type]
    p.retire()
    assert c.closed and p.take_idle() is None
    d = FakeLeg()
    p.release(d, True, 60.0)  # type: ignore[arg-type]
    assert d.closed, "a retired pool pools nothing"


def test_take_idle_skips_connections_that_closed_while_idle() -> None:
    p = pool()
    dead, alive = FakeLeg(), FakeLeg()
    p.release(alive, True, 60.0)  # type: ignore[arg-type]
    p.release(dead, True, 60.0)  # type: ignore[arg-type]
    assert dead.transport is not None
    dead.transport.closing = True
    assert p.take_idle() is alive


def test_consecutive_failures_eject_for_growing_times_and_success_resets() -> None:
    p = pool()
    assert not p.record_failure(OD, 0.0) and not p.record_failure(OD, 0.0)
    p.record_success()
    assert not p.record_failure(OD, 0.0) and not p.record_failure(OD, 0.0)
    assert p.record_failure(OD, 0.0)  # third in a row
    assert p.ejected_until == 30.0
    assert not p.record_failure(OD, 10.0), "failures while ejected do not count"
    for _ in range(2):
        assert not p.record_failure(OD, 31.0)
    assert p.record_failure(OD, 31.0) and p.ejected_until == 31.0 + 60.0  # second ejection: 2x
    p.ejections = 100
    p.ejected_until = 0.0
    for _ in range(3):
        p.record_failure(OD, 200.0)
    assert p.ejected_until == 200.0 + 300.0  # capped at max_ejection_time


def test_zero_consecutive_failures_disables_ejection() -> None:
    p = pool()
    od = OutlierDetection(consecutive_failures=0, base_ejection_time=30.0, max_ejection_time=300.0)
    assert not any(p.record_failure(od, 0.0) for _ in range(50))


def test_round_robin_skips_ejected_and_excluded_endpoints() -> None:
    a, b, c = pool(1), pool(2), pool(3)
    bal = Balancer("stable", (a, b, c))
    assert [bal.pick(0.0) for _ in range(6)] == [b, c, a, b, c, a]
    b.ejected_until = 100.0
    assert [bal.pick(0.0) for _ in range(4)] == [c, a, c, a]
    assert bal.pick(0.0, exclude=a) is c
    assert bal.pick(200.0) is not None  # ejection over


def test_all_ejected_is_panic_mode_not_failure() -> None:
    a, b = pool(1), pool(2)
    a.ejected_until = b.ejected_until = 100.0
    bal = Balancer("stable", (a, b))
    assert bal.pick(0.0) in (a, b)
    assert bal.pick(0.0, exclude=a) is b


def test_single_endpoint_excluded_leaves_nothing() -> None:
    a = pool(1)
    bal = Balancer("stable", (a,))
    assert bal.pick(0.0) is a
    assert bal.pick(0.0, exclude=a) is None


def test_registry_keeps_pools_across_reloads_and_retires_removed_ones() -> None:
    reg = PoolRegistry(Plane(), FakeLeg)  # type: ignore[arg-type]
    first = reg.pool_for(endpoint(1))
    assert reg.pool_for(endpoint(1)) is first
    leg = FakeLeg()
    first.release(leg, True, 60.0)  # type: ignore[arg-type]
    reg.retain({"10.0.0.1:2"})
    assert first.retired and leg.closed
    assert reg.pool_for(endpoint(1)) is not first  # a retired pool is replaced
