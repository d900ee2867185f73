"""canary-proxy vs nginx, side by side in one run: ``python -m loadtests.bench [--quick]``.

Starts an upstream nginx, an upload sink, the nginx proxy and canary-proxy (same routing), runs the
selected scenarios alternating between the two proxies, prints a table per scenario and rewrites
loadtests/RESULTS.md. Every process it starts is stopped on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # allow `python loadtests/bench.py` as well as `-m loadtests.bench`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests import clients, report, scenarios
from loadtests.harness import (
    BenchError,
    CoreLoad,
    Cores,
    machine_info,
    sigterm_as_interrupt,
)
from loadtests.lineup import Lineup
from loadtests.topology import Files, Ports

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass(frozen=True)
class Options:
    rounds: int
    duration: float
    scenarios: tuple[int, ...]
    quick: bool
    workers: int
    self_test: bool
    base_port: int
    stream_size: int
    idle_count: int
    python: str
    results: str | None = None


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 round x 3 s, 64 MiB transfers, 1000 idle connections (CI-sized)",
    )
    p.add_argument("--rounds", type=int, help="rounds per scenario (default 3, quick 1)")
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 10, quick 3)")
    p.add_argument(
        "--scenarios",
        default="1,2,3,4,5,6,7,8,9",
        help="comma list of 1-9 (7 = worker scaling, 8/9 = HTTPS keep-alive / TLS handshakes)",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes for both proxies (passed through)")
    p.add_argument(
        "--self-test",
        action="store_true",
        help="put a second nginx in canary-proxy's slot: every ratio should come out near 1.0",
    )
    p.add_argument("--base-port", type=int, default=28000, help="all ports are derived from this one")
    p.add_argument("--stream-mib", type=int, help="size of the streamed transfers (default 1024, quick 64)")
    p.add_argument("--idle", type=int, help="idle connections for scenario 5 (default 10000, quick 1000)")
    p.add_argument("--python", default=str(REPO / ".venv/bin/python"), help="interpreter for canary-proxy")
    p.add_argument("--results", default=None, help="where to write the results (default loadtests/RESULTS.md)")
    a = p.parse_args(argv)
    chosen = tuple(sorted({int(x) for x in a.scenarios.split(",") if x.strip()}))
    if not chosen or not set(chosen) <= set(scenarios.SCENARIOS):
        p.error(f"--scenarios must name some of {sorted(scenarios.SCENARIOS)}")
    return Options(
        rounds=a.rounds or (1 if a.quick else 3),
        duration=a.duration or (3.0 if a.quick else 10.0),
        scenarios=chosen,
        quick=a.quick,
        workers=max(1, a.workers),
        self_test=a.self_test,
        base_port=a.base_port,
        stream_size=(a.stream_mib or (64 if a.quick else 1024)) * 2**20,
        idle_count=a.idle or (1000 if a.quick else 10_000),
        python=a.python if Path(a.python).exists() else sys.executable,
        results=a.results,
    )


def ensure_tools() -> None:
    """Install nginx, wrk and curl from Debian when one is missing (install.sh needs root)."""
    if all(shutil.which(t) for t in ("nginx", "wrk", "curl", "taskset")):
        return
    print("installing nginx-light, wrk, curl (loadtests/install.sh) ...", flush=True)
    subprocess.run(["bash", str(HERE / "install.sh")], check=True)


def plan_cores(workers: int) -> Cores:
    cores = Cores.plan()
    if workers == 1 or cores.proxy is None:
        return cores
    cpus = sorted(os.sched_getaffinity(0))
    if workers >= len(cpus):
        return Cores(proxy=None, load=None)  # no core left for the load side: don't pretend to isolate
    return Cores(proxy=",".join(map(str, cpus[:workers])), load=",".join(map(str, cpus[workers:])))


def setup_lines(opts: Options, bench: Lineup, targets: tuple[scenarios.Target, scenarios.Target]) -> list[str]:
    ours_desc = (
        "a second nginx with the same config as the nginx proxy (--self-test)"
        if opts.self_test
        else f"`{' '.join(bench.ours_cmd)}`, access log off, rollout analysis on"
    )
    return [
        f"{opts.rounds} round(s) x {opts.duration:g} s per scenario; in each round both proxies run once, "
        "the order alternating between rounds",
        bench.cores.describe(),
        f"proxy workers: {opts.workers} for both; canary-proxy `run --workers` "
        f"{'supported' if bench.supports_workers else 'not supported'}",
        f"canary-proxy slot: {ours_desc}",
        "nginx proxy: same routes (map on x-canary -> canary, split_clients on x-user-id 90/10), upstream "
        "keepalive 64, access_log off, keepalive_requests unlimited",
        "upstreams: one nginx (1 worker) serving identical fixed bodies as stable and canary, so upstream "
        "cost is the same for both proxies; uploads relayed to a Python sink that discards the body",
        f"load: wrk 1 thread, {scenarios.CONNECTIONS} connections; requests cycle through 1000 x-user-id "
        "values, 1 in 100 with x-canary: always",
        "peak RSS and CPU % are for the whole process tree (nginx master + worker; the Python process)",
        *[f"{t.label} on 127.0.0.1:{t.port}" for t in targets],
    ]


def run_scenarios(
    opts: Options, bench: Lineup, ctx: scenarios.Context
) -> tuple[list[report.ScenarioResult], list[str]]:
    """Run the selected scenarios; one that fails is reported and the others still run."""
    results: list[report.ScenarioResult] = []
    failures: list[str] = []
    for number in opts.scenarios:
        t0 = time.monotonic()
        try:
            result = scenarios.SCENARIOS[number](ctx)
        except (BenchError, subprocess.SubprocessError, OSError) as e:
            failures.append(f"[{number}] failed: {e}")
            print(failures[-1] + "\n", flush=True)
            bench.check_alive()  # a dead proxy ends the run; anything else lets the next scenario try
            continue
        bench.check_alive()
        if result is None:
            print(f"[{number}] skipped: not available in this run\n", flush=True)
            continue
        results.append(result)
        print(report.console_table(result), f"\n  ({time.monotonic() - t0:.0f} s)\n", flush=True)
    return results, failures


def main(argv: list[str] | None = None) -> int:
    """Run the bench; exit 0 when every selected scenario produced numbers (PASS/FAIL is only printed)."""
    opts = parse_args(argv)
    ensure_tools()
    started = time.monotonic()
    machine = machine_info(opts.python)  # before the harness pins itself to the load CPUs
    background = CoreLoad(None)
    time.sleep(1.0)
    busy = background.percent()
    if busy > 10:
        print(
            f"warning: the machine was {busy:.0f}% busy before the bench started; expect noisy numbers",
            flush=True,
        )
    with contextlib.ExitStack() as stack, sigterm_as_interrupt():
        bench = Lineup(
            stack,
            python=opts.python,
            ports=Ports(opts.base_port),
            cores=plan_cores(opts.workers),
            work=HERE / ".work" / "run",
            files=Files(HERE / ".work" / "run", opts.stream_size),
            workers=opts.workers,
            self_test=opts.self_test,
        )
        if bench.cores.load:  # the harness itself is a client (routing checks, idle connections)
            os.sched_setaffinity(0, {int(c) for c in bench.cores.load.split(",")})
        try:
            targets = bench.setup()
            for t in targets:
                print(f"routing check {t.label}: {clients.check_routing(t.port)}", flush=True)
            ctx = scenarios.Context(
                targets=targets,
                rounds=opts.rounds,
                duration=opts.duration,
                cores=bench.cores,
                work=bench.work,
                files=bench.files,
                idle_count=opts.idle_count,
                fresh=bench.fresh,
                scaled=bench.scaled if bench.supports_workers and not opts.self_test else None,
                tls=bench.tls_pair,
            )
            results, failures = run_scenarios(opts, bench, ctx)
            setup = [
                *setup_lines(opts, bench, targets),
                f"CPU busy (all CPUs) in the second before the bench started: {busy:.0f}%",
                bench.metrics_line(),
            ]
        except BenchError as e:
            print(f"bench failed: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\ninterrupted: stopping every process started", file=sys.stderr)
            return 130
    command = "make bench-quick" if opts.quick else "make bench"
    if argv is not None or sys.argv[1:] not in ([], ["--quick"]):
        command = "python -m loadtests.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    # A self-test validates the harness; it must not overwrite the real comparison.
    results_path = HERE / ".work" / "RESULTS-selftest.md" if opts.self_test else HERE / "RESULTS.md"
    if opts.results:
        results_path = Path(opts.results).resolve()
    report.write_results(results_path, machine, setup, results, command, failures)
    print("\n".join(report.summary(results) + failures))
    print(f"\nwrote {results_path} ({time.monotonic() - started:.0f} s in all)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
