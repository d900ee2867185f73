"""The servers of one run: upstream nginx, upload sink, nginx proxy, canary-proxy (or a second nginx in
--self-test), plus short-lived instances for the idle-memory and worker-scaling scenarios.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from loadtests import nginx
from loadtests.harness import BenchError, Cores, Proc, pinned, port_free, raise_nofile, wait_port
from loadtests.report import NGINX, OURS
from loadtests.scenarios import Target
from loadtests.topology import Files, Ports, proxy_config

REPO = Path(__file__).resolve().parent.parent


def proxy_support(python: str) -> tuple[bool, bool]:
    """(canary-proxy runs at all, it accepts ``run --workers``), judged from ``run --help``."""
    try:
        done = subprocess.run(
            [python, "-m", "proxy", "run", "--help"], capture_output=True, text=True, timeout=30, cwd=REPO
        )
    except (OSError, subprocess.TimeoutExpired):
        return False, False
    return done.returncode == 0, "--workers" in done.stdout


class Lineup:
    """Owns the work dir and every process of one run; ``stack`` stops them all on exit."""

    def __init__(
        self,
        stack: contextlib.ExitStack,
        *,
        python: str,
        ports: Ports,
        cores: Cores,
        work: Path,
        files: Files,
        workers: int,
        self_test: bool,
    ):
        self.stack = stack
        self.python = python
        self.ports = ports
        self.cores = cores
        self.work = work
        self.files = files
        self.workers = workers
        self.self_test = self_test
        self.runs, self.supports_workers = proxy_support(python)
        self.nofile = raise_nofile(65536)
        self.procs: list[Proc] = []
        self.ours_cmd: list[str] = []
        self.env = {**os.environ, "PYTHONPATH": str(REPO)}

    # -- commands --------------------------------------------------------------------------------

    def nginx_cmd(self, name: str, port: int, workers: int) -> list[str]:
        prefix = self.work / name
        return nginx.command(prefix, nginx.write_proxy(prefix, port, self.ports, workers, self.nofile))

    def ours_cmd_for(self, name: str, port: int, admin: int, workers: int) -> list[str]:
        config = self.work / f"{name}.yaml"
        config.write_text(proxy_config(port, admin, self.ports))
        cmd = [self.python, "-m", "proxy", "run", "-c", str(config)]
        if self.supports_workers and (workers > 1 or self.workers > 1):
            cmd += ["--workers", str(workers)]
        return cmd

    def slot_cmd(self, key: str, name: str, port: int, admin: int) -> list[str]:
        """The command for the OURS or NGINX slot (OURS is a second nginx in --self-test)."""
        if key == NGINX or self.self_test:
            return self.nginx_cmd(name, port, self.workers)
        return self.ours_cmd_for(name, port, admin, self.workers)

    # -- processes -------------------------------------------------------------------------------

    def start(self, name: str, cmd: list[str], port: int, cpus: str | None) -> Proc:
        """Start a process for the whole run."""
        proc = Proc(name, pinned(cmd, cpus), self.work, env=self.env)
        self.stack.callback(proc.stop)
        self.procs.append(proc)
        wait_port(port, proc)
        return proc

    def check_alive(self) -> None:
        """A process that died mid-run would turn the next numbers into connection errors."""
        for proc in self.procs:
            if not proc.alive():
                raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")

    def setup(self) -> tuple[Target, Target]:
        """Check ports, lay out the work dir, start everything, return the (OURS, NGINX) targets."""
        if not self.self_test and not self.runs:
            raise BenchError(
                "canary-proxy does not run yet (`python -m proxy run --help` failed); "
                "use --self-test to check the harness with nginx in both slots"
            )
        busy = [p for p in self.ports.all() if not port_free(p)]
        if busy:
            raise BenchError(f"ports already in use: {busy} (another bench running? try --base-port)")
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.files.create()
        load, ports = self.cores.load, self.ports
        self.start("sink", [self.python, "-m", "loadtests.sink", str(ports.sink)], ports.sink, load)
        prefix = self.work / "upstream"
        conf = nginx.write_upstream(prefix, ports, self.files, self.nofile)
        self.start("upstream", nginx.command(prefix, conf), ports.stable, load)
        theirs = self.start(
            "nginx-proxy", self.slot_cmd(NGINX, "nginx-proxy", ports.nginx, 0), ports.nginx, self.cores.proxy
        )
        self.ours_cmd = self.slot_cmd(OURS, "canary-proxy", ports.ours, ports.admin)
        ours = self.start("canary-proxy", self.ours_cmd, ports.ours, self.cores.proxy)
        label = "nginx (self-test)" if self.self_test else "canary-proxy"
        return Target(OURS, label, ports.ours, ours.pid), Target(NGINX, "nginx", ports.nginx, theirs.pid)

    @contextlib.contextmanager
    def instance(
        self, key: str, label: str, name: str, cmd: list[str], port: int, cpus: str | None
    ) -> Iterator[Target]:
        """A process that lives only for one measurement."""
        with contextlib.ExitStack() as own:
            proc = Proc(name, pinned(cmd, cpus), self.work, env=self.env)
            own.callback(proc.stop)
            wait_port(port, proc)
            yield Target(key, label, port, proc.pid)

    def fresh(self, key: str) -> contextlib.AbstractContextManager[Target]:
        """A new instance of one slot, pinned like the long-lived one: memory not yet grown by earlier
        scenarios, so an RSS delta measures what new connections cost."""
        port, admin = self.ports.fresh(key)
        cmd = self.slot_cmd(key, f"fresh-{key}", port, admin)
        return self.instance(key, f"fresh {key}", f"fresh-{key}", cmd, port, self.cores.proxy)

    def tls_cert(self) -> tuple[Path, Path]:
        """A self-signed EC P-256 certificate for 127.0.0.1 (both proxies serve the same one)."""
        cert, key = self.work / "tls.crt", self.work / "tls.key"
        if not cert.exists():
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost", "-days", "7",
                 "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        return cert, key

    @contextlib.contextmanager
    def tls_pair(self) -> Iterator[tuple[Target, Target]]:
        """Both slots terminating TLS (same certificate, same pinning), for the TLS scenarios."""
        pair = self.tls_cert()
        ours_port, admin = self.ports.tls(OURS)
        nginx_port, _ = self.ports.tls(NGINX)
        config = self.work / "canary-proxy-tls.yaml"
        config.write_text(proxy_config(ours_port, admin, self.ports, pair))
        ours_cmd = [self.python, "-m", "proxy", "run", "-c", str(config)]
        prefix = self.work / "nginx-proxy-tls"
        conf = nginx.write_proxy(prefix, nginx_port, self.ports, self.workers, self.nofile, pair)
        if self.self_test:
            own = self.work / "self-tls"
            own_conf = nginx.write_proxy(own, ours_port, self.ports, self.workers, self.nofile, pair)
            ours_cmd = nginx.command(own, own_conf)
        cpus = self.cores.proxy
        nginx_cmd = nginx.command(prefix, conf)
        with (
            self.instance(OURS, "canary-proxy (TLS)", "canary-proxy-tls", ours_cmd, ours_port, cpus) as ours,
            self.instance(NGINX, "nginx (TLS)", "nginx-proxy-tls", nginx_cmd, nginx_port, cpus) as theirs,
        ):
            yield ours, theirs

    def scaled(self, workers: int) -> contextlib.AbstractContextManager[Target]:
        """An unpinned canary-proxy with ``workers`` workers, for the scaling line."""
        port, admin = self.ports.scaling(workers)
        cmd = self.ours_cmd_for(f"scaling-{workers}", port, admin, 1)
        cmd = [*cmd[: cmd.index("-c") + 2], "--workers", str(workers)]
        return self.instance(OURS, f"canary-proxy x{workers}", f"canary-proxy-w{workers}", cmd, port, None)

    def metrics_line(self) -> str:
        """Evidence that metrics were on: how many series canary-proxy's /metrics served at the end."""
        if self.self_test:
            return "canary-proxy /metrics: not applicable (self-test)"
        url = f"http://127.0.0.1:{self.ports.admin}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = resp.read().decode(errors="replace")
        except OSError as e:
            return f"canary-proxy /metrics: unreachable ({e})"
        series = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
        return f"canary-proxy /metrics at the end of the run: {series} series served"
