"""The container image's exact command line, run outside a container (no Docker engine here):
ENTRYPOINT + CMD from the Dockerfile, with the image's default config, must start and serve."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from tests.conftest import ROOT, Upstream, free_port

IMAGE_CONFIG = "/etc/canary-proxy/canary.yaml"


def dockerfile_command() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD\s+(\[.*\])\s*$", text, re.M).group(1))  # type: ignore[union-attr]
    assert isinstance(entry, list) and isinstance(cmd, list)
    return [*entry, *cmd]


def test_entrypoint_is_the_cli_with_the_image_config() -> None:
    assert dockerfile_command() == ["canary-proxy", "run", "-c", IMAGE_CONFIG]
    assert f"COPY config/canary.yaml {IMAGE_CONFIG}" in (ROOT / "Dockerfile").read_text()


async def test_image_command_line_serves(upstream_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stable: Upstream = await upstream_factory("stable")
    canary: Upstream = await upstream_factory("canary")
    port, admin = free_port(), free_port()
    # The image's default config, as the image ships it, with only addresses moved to free ports.
    text = (ROOT / "config" / "canary.yaml").read_text()
    text = text.replace("listen: 0.0.0.0:8080", f"listen: 127.0.0.1:{port}")
    text = text.replace("admin: 127.0.0.1:9901", f"admin: 127.0.0.1:{admin}")
    text = text.replace("http://127.0.0.1:9001", stable.url).replace("http://127.0.0.1:9002", canary.url)
    config = tmp_path / "canary.yaml"
    config.write_text(text)
    argv = [arg if arg != IMAGE_CONFIG else str(config) for arg in dockerfile_command()]
    exe = Path(sys.executable).parent / argv[0]  # the console script installed by pip, like in the image
    assert exe.exists(), f"{exe} is not installed"
    proc = subprocess.Popen([str(exe), *argv[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{admin}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the image command did not become healthy"
                await asyncio.sleep(0.1)
            async with session.get(f"http://127.0.0.1:{port}/x", headers={"user-type": "beta-tester"}) as resp:
                assert resp.status == 200
                assert (await resp.text()).startswith("canary GET /x")
            async with session.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=25) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
