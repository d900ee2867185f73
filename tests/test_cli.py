"""The command line as a user runs it: real subprocesses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp

from proxy import __version__
from proxy.config import load_config
from tests.conftest import ROOT, ProxyProcess, Upstream, config_text


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def test_version() -> None:
    out = cli("--version")
    assert out.returncode == 0
    version, hot_path = out.stdout.strip().splitlines()
    assert version == f"canary-proxy {__version__}"
    assert hot_path.startswith(("hot path: compiled (mypyc)", "hot path: pure ("))


def test_validate_good_config_prints_a_summary() -> None:
    out = cli("validate", "-c", str(ROOT / "config" / "canary.yaml"))
    assert out.returncode == 0, out.stderr
    assert "beta-testers" in out.stdout and "default" in out.stdout
    assert "95" in out.stdout and "5" in out.stdout
    assert "test is successful" in out.stdout


def test_validate_lists_every_error_with_key_path_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "listen: 127.0.0.1:8080\n"
        "upstreams:\n"
        "  stable: {endpoints: [http://127.0.0.1:9001]}\n"
        "  canary: {endpoints: [http://127.0.0.1:9002]}\n"
        "routes:\n"
        "  - name: beta\n"
        "    match: {headers: {x-beta: {regex: '(['}}}\n"
        "    to: canary\n"
        "  - name: default\n"
        "    split: {stable: 90, canary: 5}\n"
        "bogus: 1\n"
    )
    out = cli("validate", "-c", str(bad))
    assert out.returncode == 1
    err = out.stderr
    assert "routes[1].split: weights sum to 95, expected 100 (line 10)" in err
    assert "routes[0].match.headers.x-beta" in err
    assert "bogus" in err
    assert "test failed" in err


def test_run_refuses_an_invalid_config_and_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: 127.0.0.1:0\nupstreams: {}\nroutes: []\n")
    out = cli("run", "-c", str(bad))
    assert out.returncode == 1
    assert "invalid config" in out.stderr


async def test_run_logs_listen_address_and_config_hash(upstream_factory, proxy_process) -> None:  # type: ignore[no-untyped-def]
    stable: Upstream = await upstream_factory("stable")
    canary: Upstream = await upstream_factory("canary")
    pp: ProxyProcess = proxy_process(config_text(stable.url, canary.url))
    line = next(ln for ln in pp.lines if "listening on" in ln)
    assert f"127.0.0.1:{pp.port}" in line
    assert f"hash {load_config(str(pp.config)).source_hash}" in line
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{pp.port}/hello") as resp:
        assert (await resp.text()).startswith("stable GET /hello")
