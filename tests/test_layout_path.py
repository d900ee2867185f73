"""The README's "Layout" path of one request, checked against the code: a request is traced through
the data plane (pure-Python sources, where every call is visible to a profiler). The steps' modules
must first be entered in the README's order, the exchange never again once the upstream leg sends
(no failure here), recording last; only the interleavings the README names are allowed."""

from __future__ import annotations

import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from conftest import RawClient, Upstream, config_text

from proxy import native
from proxy.control.app import ProxyApp

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_steps() -> list[str]:
    """The module of each numbered step under "One request, from the client's bytes"."""
    text = README.read_text()
    section = text[text.index("One request, from the client's bytes") :]
    steps = re.findall(r"^\d\. `dataplane/([\w/]+)\.py`", section, re.M)
    return ["proxy.dataplane." + s.replace("/", ".") for s in steps]


def test_readme_names_five_steps_in_different_modules() -> None:
    steps = readme_steps()
    assert 1 < len(steps) <= 5 and len(set(steps)) == len(steps), steps


@pytest.mark.skipif(bool(native.compiled_modules()), reason="compiled modules are invisible to a profiler")
async def test_one_request_enters_the_steps_in_order(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: Callable[..., Awaitable[ProxyApp]]
) -> None:
    steps = readme_steps()
    stable = await upstream_factory("stable")
    app = await proxy_factory(config_text(stable.url, stable.url))
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    assert (await client.request(b"GET /warm HTTP/1.1\r\nHost: h\r\n\r\n")).status == 200  # pooled now
    entered: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            module = frame.f_globals.get("__name__", "")
            if module in steps and (not entered or entered[-1] != module):
                entered.append(module)

    sys.setprofile(profile)
    try:
        resp = await client.request(b"GET /traced HTTP/1.1\r\nHost: h\r\n\r\n")
    finally:
        sys.setprofile(None)
    client.close()
    assert resp.status == 200
    first = list(dict.fromkeys(entered))
    assert first == steps, f"README steps {steps}, first entered in this order: {first}"
    client_leg, exchange, upstream, respond, recording = steps
    after_send = entered[entered.index(upstream) :]
    assert exchange not in after_send, entered  # the exchange is done once the request is sent
    assert set(after_send) <= {client_leg, upstream, respond, recording}, entered
    assert client_leg not in entered[entered.index(respond) :], entered  # the request ended before
    assert entered[-1] == recording and entered.count(recording) == 1, entered
