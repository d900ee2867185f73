"""proxy.dataplane.exchange without sockets: every failure kind and every retry rule.

The context is real (compiled snapshot, pools, balancers, counters); the legs are fakes that record
what the exchange asked of them (tests/support/fakes.py). Pools hold idle fake connections, so an
attempt or a retry takes one instead of connecting.
"""

from __future__ import annotations

from support.fakes import FakeClient, plane_context

from proxy.analysis.stats import KIND_CONNECT, KIND_PROTOCOL, KIND_RESET, KIND_TIMEOUT
from proxy.dataplane import exchange, recording
from proxy.dataplane.context import PlaneContext
from proxy.dataplane.request import Request

ONE_ENDPOINT = (
    "listen: 127.0.0.1:0\naccess_log: false\n"
    "upstreams:\n  stable: {endpoints: [http://10.0.0.1:80]}\nroutes:\n  - name: d\n    to: stable\n"
)


def start(ctx: PlaneContext, method: bytes = b"GET", canary: bool = False) -> tuple[FakeClient, Request]:
    """A request routed and begun: it holds its first upstream connection."""
    client = FakeClient()
    req = Request(ctx.snapshot)
    req.method, req.target, req.path, req.host = method, b"/", b"/", b"h"
    req.lines = [b"Host: h\r\n"]
    if canary:
        req.rhdrs[b"x-canary"] = b"always"
    req.complete = True
    exchange.route(ctx, req, client.peer)
    client.current = req
    exchange.begin(ctx, client, req)  # type: ignore[arg-type]
    assert len(client.ready) == 1
    req.attempts += 1  # the client leg counts attempts when it writes the head
    return client, req


def upstream_of(req: Request) -> str:
    assert req.binding is not None
    return req.binding.upstream.name


def test_routing_binds_and_builds_the_head() -> None:
    ctx = plane_context()
    _, req = start(ctx)
    assert req.route == "default" and upstream_of(req) == "stable"
    assert req.head.startswith(b"GET / HTTP/1.1\r\n") and b"X-Request-Id: " in req.head
    assert req.pool is not None and ctx.stats.in_flight == 1


def test_no_route_is_404_and_no_endpoint_attempt() -> None:
    ctx = plane_context(
        "listen: 127.0.0.1:0\naccess_log: false\nupstreams:\n  stable: {endpoints: [http://10.0.0.1:80]}\n"
        "routes:\n  - name: only\n    match: {path_prefix: /api}\n    to: stable\n"
    )
    client = FakeClient()
    req = Request(ctx.snapshot)
    req.method, req.path, req.target = b"GET", b"/x", b"/x"
    exchange.route(ctx, req, client.peer)
    client.current = req
    exchange.begin(ctx, client, req)  # type: ignore[arg-type]
    assert client.answered == [404] and not client.ready


def test_connect_failure_retries_on_another_endpoint() -> None:
    ctx = plane_context()
    client, req = start(ctx)
    first = req.pool
    exchange.fail(ctx, client, req, KIND_CONNECT, 502)  # type: ignore[arg-type]
    assert len(client.ready) == 2 and req.pool is not first
    assert client.answered == [] and req.retries == 1 and ctx.retrying == 1
    assert ctx.stats.retries == {"stable": 1}
    assert ctx.stats.upstreams["stable"].errors[KIND_CONNECT] == 1


def test_a_failed_canary_request_falls_over_to_the_baseline_outside_the_budget() -> None:
    ctx = plane_context()
    ctx.retrying = 1000  # budget exhausted: the fallback is not held back by it
    client, req = start(ctx, canary=True)
    assert upstream_of(req) == "canary"
    exchange.fail(ctx, client, req, KIND_RESET, 502)  # type: ignore[arg-type]
    assert upstream_of(req) == "stable" and len(client.ready) == 2
    assert ctx.stats.upstreams["canary"].errors[KIND_RESET] == 1


def test_after_sending_only_idempotent_methods_retry() -> None:
    ctx = plane_context()
    client, req = start(ctx, method=b"POST")
    exchange.fail(ctx, client, req, KIND_RESET, 502)  # type: ignore[arg-type]
    assert client.answered == [502] and len(client.ready) == 1
    ctx = plane_context()
    client, req = start(ctx, method=b"PUT")
    exchange.fail(ctx, client, req, KIND_RESET, 502)  # type: ignore[arg-type]
    assert client.answered == [] and len(client.ready) == 2


def test_a_connect_failure_retries_even_non_idempotent_requests() -> None:
    ctx = plane_context()
    client, req = start(ctx, method=b"POST")
    exchange.fail(ctx, client, req, KIND_CONNECT, 502)  # type: ignore[arg-type]
    assert client.answered == [] and len(client.ready) == 2


def test_timeouts_and_invalid_responses_never_retry() -> None:
    for kind, status in ((KIND_TIMEOUT, 504), (KIND_PROTOCOL, 502)):
        ctx = plane_context()
        client, req = start(ctx)
        exchange.fail(ctx, client, req, kind, status)  # type: ignore[arg-type]
        assert client.answered == [status] and len(client.ready) == 1, kind
        assert ctx.stats.upstreams["stable"].errors[kind] == 1


def test_a_connect_timeout_is_504_when_no_retry_is_left() -> None:
    ctx = plane_context(ONE_ENDPOINT + "retries: {attempts: 0}\n")
    client, req = start(ctx)
    exchange.fail(ctx, client, req, KIND_CONNECT, 504)  # type: ignore[arg-type]
    assert client.answered == [504]


def test_never_after_the_response_started_truncate_instead() -> None:
    ctx = plane_context()
    client, req = start(ctx)
    req.status = 200  # the head went to the client
    exchange.fail(ctx, client, req, KIND_RESET, 502)  # type: ignore[arg-type]
    assert client.aborted and client.answered == [] and len(client.ready) == 1


def test_never_after_the_body_was_streamed_on() -> None:
    ctx = plane_context()
    client, req = start(ctx, method=b"PUT")
    req.body_forwarded = True
    exchange.fail(ctx, client, req, KIND_CONNECT, 502)  # type: ignore[arg-type]
    assert client.answered == [502]


def test_at_most_retries_attempts() -> None:
    ctx = plane_context()
    client, req = start(ctx)
    exchange.fail(ctx, client, req, KIND_CONNECT, 502)  # type: ignore[arg-type]
    exchange.fail(ctx, client, req, KIND_CONNECT, 502)  # type: ignore[arg-type]
    assert req.retries == 1 and client.answered == [502]


def test_the_budget_holds_back_retries() -> None:
    ctx = plane_context()
    ctx.retrying = 3  # min_concurrent 3, few requests in flight
    client, req = start(ctx)
    exchange.fail(ctx, client, req, KIND_CONNECT, 502)  # type: ignore[arg-type]
    assert client.answered == [502] and ctx.stats.retries == {}


def test_a_stale_pooled_connection_retries_on_the_same_endpoint_over_a_new_one() -> None:
    ctx = plane_context(ONE_ENDPOINT)
    client, req = start(ctx)
    tasks: list[object] = []
    exchange.fail(ctx, client, req, KIND_RESET, 502, reused=False)  # type: ignore[arg-type]
    assert client.answered == [502], "a fresh connection that failed is not retried on the same endpoint"
    ctx = plane_context(ONE_ENDPOINT)
    client, req = start(ctx)
    pool = req.pool
    ctx.loop.create_task = lambda coro: tasks.append(coro) or coro.close()  # type: ignore[method-assign,assignment,func-returns-value]
    exchange.fail(ctx, client, req, KIND_RESET, 502, reused=True)  # type: ignore[arg-type]
    assert client.answered == [] and req.pool is pool and tasks, "a new connection to the same endpoint"


def test_a_client_that_left_gets_nothing_but_the_failure_is_recorded() -> None:
    ctx = plane_context()
    client, req = start(ctx)
    client.closed = True
    exchange.fail(ctx, client, req, KIND_RESET, 502)  # type: ignore[arg-type]
    assert client.answered == [] and len(client.ready) == 1
    assert ctx.stats.upstreams["stable"].errors[KIND_RESET] == 1


def test_finish_records_the_outcome_and_releases_the_budget() -> None:
    ctx = plane_context()
    client, req = start(ctx)
    exchange.fail(ctx, client, req, KIND_CONNECT, 502)  # type: ignore[arg-type]
    req.status = 200
    recording.finish(ctx, req, aborted=False)
    assert ctx.stats.in_flight == 0 and ctx.retrying == 0
    assert req.binding is not None and req.binding.counts.by_class[2] == 1


def test_consecutive_5xx_eject_an_endpoint() -> None:
    ctx = plane_context(ONE_ENDPOINT, idle=10)
    for _ in range(5):  # outlier_detection.consecutive_failures defaults to 5
        _, req = start(ctx)
        req.status = 503
        recording.finish(ctx, req, aborted=False)
    assert sum(ctx.stats.ejections.values()) == 1
