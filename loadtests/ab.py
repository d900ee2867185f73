"""A/B of CPU per request: two or more canary-proxy builds beside nginx, in one run.

    python -m loadtests.ab --build main=.venv/bin/python --build old=/path/to/old/.venv/bin/python

Each build is an interpreter whose ``python -m proxy`` runs that build (an installed wheel, or an
editable checkout). All of them run for the whole measurement, pinned to the same CPU as the nginx
proxy, behind the same upstream nginx, and take turns under the same wrk load (scenario 1 of the
bench: small responses, 64 keep-alive connections, routing and rollout analysis on); the order
rotates every round, so a machine that gets busier or quieter hits every build alike.

The figure that matters is **req per CPU-second** of the proxy process: requests served divided by
the CPU time the proxy used. It moves much less than req/s when other work shares the machine. The
access log is on (the default config, as users run it) unless ``--no-access-log``; it goes to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

from loadtests import nginx, wrk
from loadtests.harness import BenchError, Cores, Proc, Usage, raise_nofile, sigterm_as_interrupt, wait_port
from loadtests.topology import Files, Ports, proxy_config

HERE = Path(__file__).resolve().parent
CONNECTIONS = 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", action="append", required=True, help="LABEL=PYTHON (two or more)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    p.add_argument("--no-access-log", action="store_true", help="access_log: false for every build")
    p.add_argument("--base-port", type=int, default=29000)
    return p.parse_args(argv)


def _config(port: int, admin: int, ports: Ports, access_log: bool) -> str:
    text = proxy_config(port, admin, ports)
    return text if not access_log else text.replace("access_log: false\n", "")


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print one table (medians over rounds); exit 2 when setup failed."""
    opts = parse_args(argv)
    builds = [b.split("=", 1) for b in opts.build]
    ports = Ports(opts.base_port)
    cores = Cores.plan()
    work = HERE / ".work" / "ab"
    files = Files(work, 1 << 20)
    samples: dict[str, list[tuple[float, float]]] = {}
    with contextlib.ExitStack() as stack, sigterm_as_interrupt():
        try:
            work.mkdir(parents=True, exist_ok=True)
            files.create()
            nofile = raise_nofile(65536)

            def start(name: str, cmd: list[str], port: int, cpus: str | None) -> Proc:
                proc = Proc(name, ["taskset", "-c", cpus, *cmd] if cpus else cmd, work)
                stack.callback(proc.stop)
                wait_port(port, proc)
                return proc

            conf = nginx.write_upstream(work / "upstream", ports, files, nofile)
            start("upstream", nginx.command(work / "upstream", conf), ports.stable, cores.load)
            targets: list[tuple[str, int, int]] = []
            conf = nginx.write_proxy(work / "nginx-proxy", ports.nginx, ports, 1, nofile)
            proc = start("nginx-proxy", nginx.command(work / "nginx-proxy", conf), ports.nginx, cores.proxy)
            targets.append(("nginx", ports.nginx, proc.pid))
            for i, (label, python) in enumerate(builds):
                port, admin = opts.base_port + 100 + i, opts.base_port + 950 + i
                config = work / f"{label}.yaml"
                config.write_text(_config(port, admin, ports, not opts.no_access_log))
                cmd = [python, "-m", "proxy", "run", "-c", str(config)]
                targets.append((label, port, start(label, cmd, port, cores.proxy).pid))
            if cores.load:
                os.sched_setaffinity(0, {int(c) for c in cores.load.split(",")})
            script = wrk.write_script(work, "small", "/small")
            for _, port, _ in targets:  # warm-up: pools, allocator
                wrk.run(port, script, CONNECTIONS, 2, cores.load)
            for r in range(opts.rounds):
                order = targets[r % len(targets) :] + targets[: r % len(targets)]
                for label, port, pid in order:
                    usage = Usage(pid)
                    res = wrk.run(port, script, CONNECTIONS, opts.duration, cores.load)
                    cpu = usage.cpu_percent()
                    if res.errors or res.status_errors:
                        raise BenchError(f"{label}: {res.errors} errors, {res.status_errors} bad statuses")
                    samples.setdefault(label, []).append((res.rps, res.rps / (cpu / 100) if cpu else 0.0))
                line = "  ".join(f"{k} {v[-1][0]:,.0f} req/s {v[-1][1]:,.0f} req/CPU-s" for k, v in samples.items())
                print(f"round {r + 1}: {line}", flush=True)
        except BenchError as e:
            print(f"ab failed: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    print(report(samples, opts))
    return 0


def report(samples: dict[str, list[tuple[float, float]]], opts: argparse.Namespace) -> str:
    """Markdown table: medians, and per-round ratios to nginx and to the first build (each the
    median of the rounds' ratios: both sides of a ratio ran in the same round)."""
    ref = samples["nginx"]
    first = next(k for k in samples if k != "nginx")  # the A of the A/B
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    log = "off" if opts.no_access_log else "on (to a file)"
    lines = [
        f"{when}; {opts.rounds} rounds x {opts.duration:.0f} s, access log {log}, 64 connections, small responses",
        "",
        f"| build | req/s | req per CPU-s | req/s vs nginx | req per CPU-s vs nginx | req per CPU-s vs {first} |",
        "|---|---|---|---|---|---|",
    ]
    for label, vals in samples.items():
        rps = statistics.median(v[0] for v in vals)
        per_cpu = statistics.median(v[1] for v in vals)
        r_rps = statistics.median(v[0] / n[0] for v, n in zip(vals, ref, strict=True))
        r_cpu = statistics.median(v[1] / n[1] for v, n in zip(vals, ref, strict=True))
        r_first = statistics.median(v[1] / a[1] for v, a in zip(vals, samples[first], strict=True))
        lines.append(f"| {label} | {rps:,.0f} | {per_cpu:,.0f} | {r_rps:.2f}x | {r_cpu:.2f}x | {r_first:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
