"""Fleet mode costs and rollback time: ``python -m loadtests.fleet [--quick] [--rollback-only]``.

1. Headline, side by side in one run: nginx, canary-proxy without `fleet:`, and canary-proxy with
   `fleet:` against a real redis-server (the replica under test is the leader, the busiest role:
   it pushes evidence, merges the fleet's window, renews the lease and publishes the verdict).
   Same wrk workload as `make bench` scenario 1, rounds alternating the order. Target: fleet mode
   costs under 5% of req/s.
2. Rollback time with 3 replicas: open-loop traffic spread over three fleet replicas; at t0 the
   canary starts failing every request; we measure the seconds until the canary's weight is 0 on
   the last replica (every replica's /status polled every 50 ms).

The numbers go to the "Fleet mode" section of loadtests/RESULTS.md (kept by `make bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from loadtests import nginx, rollback_time, wrk
from loadtests.harness import BenchError, CoreLoad, Cores, Proc, Usage, pinned, raise_nofile, wait_port
from loadtests.topology import Files, Ports, proxy_config

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- fleet:begin -->", "<!-- fleet:end -->"


def fleet_section(redis_port: int, replica: str, lease: str = "5s") -> str:
    return (
        f'fleet: {{redis: "redis://127.0.0.1:{redis_port}/0", namespace: bench, replica: {replica}, lease: {lease}}}\n'
    )


def start_redis(work: Path, port: int, cpus: str | None) -> Proc:
    exe = shutil.which("redis-server")
    if exe is None:
        raise BenchError("redis-server not installed (bash .ci/system-deps.sh)")
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
           "--dir", str(work)]  # fmt: skip
    proc = Proc("redis", pinned(cmd, cpus), work)
    wait_port(port, proc)
    return proc


# -- 1. headline ---------------------------------------------------------------------------------------


def headline(rounds: int, duration: float, base: int, python: str, idle_seconds: float = 10.0) -> list[str]:
    ports, cores = Ports(base), Cores.plan()
    work = HERE / ".work" / "fleet"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    files = Files(work / "files", 1 << 20)
    files.create()
    nofile = raise_nofile(65536)
    on_port, on_admin, redis_port = base + 82, base + 902, base + 5
    with contextlib.ExitStack() as stack:

        def start(name: str, cmd: list[str], port: int, cpus: str | None) -> Proc:
            proc = Proc(name, pinned(cmd, cpus), work)
            stack.callback(proc.stop)
            wait_port(port, proc)
            return proc

        stack.callback(start_redis(work, redis_port, cores.load).stop)
        up = work / "upstream"
        start("upstream", nginx.command(up, nginx.write_upstream(up, ports, files, nofile)), ports.stable, cores.load)
        px = work / "nginx-proxy"
        theirs = start("nginx", nginx.command(px, nginx.write_proxy(px, ports.nginx, ports, 1, nofile)), ports.nginx,
                       cores.proxy)  # fmt: skip
        off_cfg, on_cfg = work / "off.yaml", work / "on.yaml"
        off_cfg.write_text(proxy_config(ports.ours, ports.admin, ports))
        on_cfg.write_text(proxy_config(on_port, on_admin, ports) + fleet_section(redis_port, "bench-1"))
        off = start("off", [python, "-m", "proxy", "run", "-c", str(off_cfg)], ports.ours, cores.proxy)
        on = start("on", [python, "-m", "proxy", "run", "-c", str(on_cfg)], on_port, cores.proxy)
        targets = {
            "nginx": (ports.nginx, theirs.pid),
            "fleet off": (ports.ours, off.pid),
            "fleet on": (on_port, on.pid),
        }
        script = wrk.write_script(work, "small", "/small")
        for port, _ in targets.values():
            wrk.run(port, script, 64, 1, cores.load)
        samples: dict[str, list[dict[str, float]]] = {k: [] for k in targets}
        names = list(targets)
        for r in range(rounds):
            for name in names[r % 3 :] + names[: r % 3]:
                port, pid = targets[name]
                usage, load = Usage(pid), CoreLoad(cores.load)
                res = wrk.run(port, script, 64, duration, cores.load)
                cpu = usage.cpu_percent()
                sample = {"req/s": res.rps, "p99 ms": res.p99_ms, "CPU %": cpu}
                sample["req per CPU-s"] = res.rps / (cpu / 100) if cpu else 0.0
                sample.update(errors=float(res.errors + res.status_errors), load=load.percent())
                samples[name].append(sample)
        # The fixed cost of fleet membership (lease, state polls, evidence, reports), without traffic.
        idle = {name: Usage(targets[name][1]) for name in ("fleet off", "fleet on")}
        time.sleep(idle_seconds)
        idle_cpu = {name: u.cpu_percent() for name, u in idle.items()}
        leader = _metric(on_admin, "canary_proxy_fleet_leader")
        connected = _metric(on_admin, "canary_proxy_fleet_connected")

    def med(name: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[name])

    def paired(a: str, b: str) -> float:
        return statistics.median(x["req/s"] / y["req/s"] for x, y in zip(samples[a], samples[b], strict=True))

    lines = [
        f"### Headline with fleet mode on vs off ({rounds} round(s) x {duration:g} s,"
        " wrk 1 thread, 64 connections, /small)",
        "",
        "| metric (median of rounds) | nginx | canary-proxy, fleet off | canary-proxy, fleet on (leader) |",
        "|---|---|---|---|",
    ]
    for key in ("req/s", "p99 ms", "CPU %", "req per CPU-s", "errors"):
        lines.append(f"| {key} | " + " | ".join(f"{med(n, key):,.2f}" for n in names) + " |")
    cost = 1 - paired("fleet on", "fleet off")
    lines += [
        "",
        f"- fleet off / nginx: {paired('fleet off', 'nginx'):.2f}x;"
        f" fleet on / nginx: {paired('fleet on', 'nginx'):.2f}x",
        f"- fleet on / fleet off: {paired('fleet on', 'fleet off'):.3f}x, a cost of {cost * 100:.1f}% of req/s "
        f"({'PASS' if cost < 0.05 else 'FAIL'}: target under 5%)",
        "- req/s by round: " + " | ".join(f"{n} " + ", ".join(f"{x['req/s']:,.0f}" for x in samples[n]) for n in names),
        f"- idle for {idle_seconds:g} s after the rounds: fleet off used {idle_cpu['fleet off']:.2f}% of a core,"
        f" fleet on {idle_cpu['fleet on']:.2f}% (the fixed cost of membership)",
        f"- the fleet replica was connected ({connected}) and the leader ({leader}) at the end;"
        " redis-server on the load CPU",
        f"- {cores.describe()}; load average {os.getloadavg()[0]:.1f} at the end (a shared machine spreads"
        " the per-round req/s: req per CPU-s and the idle CPU are the steadier figures)",
    ]
    return lines


def _metric(admin: int, name: str) -> float | None:
    import urllib.request

    with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return None


# -- 2. rollback time with three replicas -------------------------------------------------------------


async def rollback_run(rate: int, warmup: float, settle: float) -> list[str]:
    work = HERE / ".work" / "fleet-rollback"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    port = rollback_time.free_port
    stable, canary, redis_port = port(), port(), port()
    redis = start_redis(work, redis_port, None)
    ups = [rollback_time.start(["-m", "loadtests.rollback_time", "--serve", n, str(p)]) for n, p in
           (("stable", stable), ("canary", canary))]  # fmt: skip
    replicas: list[tuple[int, int]] = [(port(), port()) for _ in range(3)]
    procs = []
    try:
        for i, (listen, admin) in enumerate(replicas, 1):
            cfg = work / f"r{i}.yaml"
            text = rollback_time.proxy_config(listen, admin, stable, canary, "tight") + fleet_section(
                redis_port, f"r{i}", "2s"
            )
            cfg.write_text(text)
            procs.append(rollback_time.start(["-m", "proxy", "run", "-c", str(cfg)], cfg.with_suffix(".log")))
        for p in (stable, canary, *[x for pair in replicas for x in pair]):
            await asyncio.to_thread(rollback_time.wait_port, p)
        loads = [rollback_time.Load(listen, rate // 3) for listen, _ in replicas]
        halt = asyncio.Event()
        tasks = [asyncio.create_task(load.run(halt)) for load in loads]
        async with aiohttp.ClientSession() as session:
            await asyncio.sleep(warmup)
            flipped = time.time()
            async with session.post(f"http://127.0.0.1:{canary}/_fail?rate=1.0") as r:
                r.raise_for_status()
            zero: dict[int, float] = {}
            deadline = time.monotonic() + settle
            while time.monotonic() < deadline and len(zero) < 3:
                for i, (_, admin) in enumerate(replicas):
                    if i not in zero:
                        doc = await rollback_time.get_json(session, f"http://127.0.0.1:{admin}/status")
                        if rollback_time.canary_weight(doc) == 0:
                            zero[i] = time.time() - flipped
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            halt.set()
            await asyncio.gather(*tasks)
            doc = await rollback_time.get_json(session, f"http://127.0.0.1:{replicas[0][1]}/status")
        records = [rec for load in loads for rec in load.records if rec[0] >= flipped]
        failed = sum(1 for rec in records if rec[1] == 0 or rec[1] >= 500)
        first, last = (min(zero.values()), max(zero.values())) if len(zero) == 3 else (None, None)
        reason = doc["rollout"]["reason"]  # type: ignore[index]
    finally:
        for proc in [*procs, *ups]:
            rollback_time.stop(proc)
        redis.stop()
    fmt = lambda v: "not within the settle time" if v is None else f"{v:.2f} s"  # noqa: E731
    return [
        f"### Rollback time with 3 fleet replicas ({rate} req/s offered in total, split over the replicas)",
        "",
        "Profile `tight` of `loadtests/rollback_time.py` (window 10s, min_requests 20, fast_fail 5), lease 2s;"
        f" {warmup:g} s healthy warm-up, then the canary answers 500 to every request.",
        "",
        f"- canary bad -> weight 0 on the first replica: {fmt(first)}; on the last replica: {fmt(last)}",
        "- per replica: " + ", ".join(f"r{i + 1} {fmt(zero.get(i))}" for i in range(3)),
        f"- user requests sent after the flip: {len(records)}, failed: {failed}",
        f"- rollback reason: {reason}",
    ]


def write_section(lines: list[str]) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if BEGIN in text:
        text = text[: text.index(BEGIN)].rstrip("\n") + "\n" + text[text.index(END) + len(END) :].lstrip("\n")
    block = [BEGIN, "", "## Fleet mode", "", "Written by `python -m loadtests.fleet` (`make bench-fleet`).", "",
             *lines, "", END, ""]  # fmt: skip
    RESULTS.write_text(text.rstrip("\n") + "\n\n" + "\n".join(block))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.fleet", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round x 3 s; 10 s warm-up")
    p.add_argument("--rounds", type=int)
    p.add_argument("--duration", type=float)
    p.add_argument("--rate", type=int, default=300, help="rollback run: total offered req/s (default 300)")
    p.add_argument("--rollback-only", action="store_true")
    p.add_argument("--headline-only", action="store_true")
    p.add_argument("--base-port", type=int, default=29000)
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    opts = p.parse_args(argv)
    rounds = opts.rounds or (1 if opts.quick else 3)
    duration = opts.duration or (3.0 if opts.quick else 10.0)
    lines: list[str] = []
    try:
        if not opts.rollback_only:
            lines += headline(rounds, duration, opts.base_port, sys.executable)
            lines.append("")
        if not opts.headline_only:
            lines += asyncio.run(rollback_run(opts.rate, 10.0 if opts.quick else 20.0, 30.0))
    except BenchError as exc:
        print(f"fleet bench: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    if not opts.no_write:
        write_section(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
