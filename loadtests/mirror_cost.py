"""The cost of mirroring: the headline load (small responses, 64 keep-alive connections) through
canary-proxy with a 10% mirror off and on, side by side with nginx in the same run.

    python -m loadtests.mirror_cost              # 3 rounds x 5 s (about 1 minute)
    python -m loadtests.mirror_cost --rounds 1 --duration 3

The mirror goes to a third upstream (`shadow`, the upstream nginx's canary port), so exactly 10% of
the default route's requests are copied. In each round the three proxies run once, the order
rotating. The result (medians, and the ratios against nginx) replaces the mirror section of
loadtests/RESULTS.md; `make bench` keeps that section when it rewrites the file.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import urllib.request
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests import wrk
from loadtests.bench import ensure_tools, plan_cores
from loadtests.harness import BenchError, CoreLoad, Usage, machine_info, sigterm_as_interrupt
from loadtests.lineup import Lineup
from loadtests.report import MIRROR_BEGIN, MIRROR_END, OURS
from loadtests.scenarios import CONNECTIONS, Target
from loadtests.topology import Files, Ports, proxy_config

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PERCENT = 10


def mirror_config(listen: int, admin: int, ports: Ports) -> str:
    """The bench config plus `shadow` and a 10% mirror on the default route."""
    text = proxy_config(listen, admin, ports)
    text = text.replace("routes:\n", f"  shadow: {{endpoints: [http://127.0.0.1:{ports.canary}]}}\nroutes:\n")
    return text.replace(
        "    sticky: {header: x-user-id}\n",
        f"    sticky: {{header: x-user-id}}\n    mirror: {{to: shadow, percent: {PERCENT}}}\n",
    )


def mirrored_count(admin: int) -> float:
    """canary_proxy_mirror_requests_total summed over its series (evidence the mirror ran)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith("canary_proxy_mirror_requests_total{")
    )


def sample(target: Target, script: Path, duration: float, cpus: str | None) -> dict[str, float]:
    usage, load = Usage(target.pid), CoreLoad(cpus)
    res = wrk.run(target.port, script, CONNECTIONS, duration, cpus)
    cpu = usage.cpu_percent()
    return {
        "req/s": res.rps,
        "p50 ms": res.p50_ms,
        "p99 ms": res.p99_ms,
        "CPU %": cpu,
        "req per CPU-s": res.rps / (cpu / 100) if cpu else 0.0,
        "peak RSS MiB": usage.peak_rss() / 2**20,
        "load-side CPU %": load.percent(),
        "errors": float(res.errors + res.status_errors),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--base-port", type=int, default=28000)
    p.add_argument("--python", default=str(REPO / ".venv/bin/python"))
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    a = p.parse_args(argv)
    python = a.python if Path(a.python).exists() else sys.executable
    ensure_tools()
    machine = machine_info(python)
    ports = Ports(a.base_port)
    rows: dict[str, list[dict[str, float]]] = {"nginx": [], "off": [], "on": []}
    with contextlib.ExitStack() as stack, sigterm_as_interrupt():
        bench = Lineup(
            stack,
            python=python,
            ports=ports,
            cores=plan_cores(1),
            work=HERE / ".work" / "mirror",
            files=Files(HERE / ".work" / "mirror", 1 << 20),
            workers=1,
            self_test=False,
        )
        try:
            ours, theirs = bench.setup()
            listen, admin = ports.fresh("ours")
            config = bench.work / "canary-proxy-mirror.yaml"
            config.write_text(mirror_config(listen, admin, ports))
            cmd = [bench.python, "-m", "proxy", "run", "-c", str(config)]
            label = f"canary-proxy + {PERCENT}% mirror"
            on = stack.enter_context(bench.instance(OURS, label, "mirror", cmd, listen, bench.cores.proxy))
            targets = {"nginx": theirs, "off": ours, "on": on}
            script = wrk.write_script(bench.work, "mirror", "/small")
            for t in targets.values():  # warm-up
                wrk.run(t.port, script, CONNECTIONS, 1, bench.cores.load)
            before = mirrored_count(admin)
            order = list(targets)
            for r in range(a.rounds):
                for key in order[r % 3 :] + order[: r % 3]:
                    rows[key].append(sample(targets[key], script, a.duration, bench.cores.load))
                    bench.check_alive()
            mirrored = mirrored_count(admin) - before
        except BenchError as e:
            print(f"mirror cost failed: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    lines = report_lines(rows, mirrored, a, machine, bench.cores.describe())
    print("\n".join(lines))
    write_section(Path(a.results), lines)
    print(f"\nwrote the mirror section of {a.results}")
    return 0


def report_lines(
    rows: dict[str, list[dict[str, float]]],
    mirrored: float,
    a: argparse.Namespace,
    machine: dict[str, str],
    cores: str,
) -> list[str]:
    """Markdown: one row per proxy (medians), then the ratios against nginx and the mirror's cost."""
    med = {k: {m: statistics.median(s[m] for s in v) for m in v[0]} for k, v in rows.items()}
    ratio_off = statistics.median(o["req/s"] / n["req/s"] for o, n in zip(rows["off"], rows["nginx"], strict=True))
    ratio_on = statistics.median(o["req/s"] / n["req/s"] for o, n in zip(rows["on"], rows["nginx"], strict=True))
    cost = 1 - med["on"]["req/s"] / med["off"]["req/s"]
    metrics = list(med["nginx"])
    labels = {"nginx": "nginx", "off": "canary-proxy, no mirror", "on": f"canary-proxy, {PERCENT}% mirror"}
    out = [
        f"Written by `python -m loadtests.mirror_cost --rounds {a.rounds} --duration {a.duration:g}` on "
        f"{machine.get('date', '?')} ({machine.get('cpu', '?')}, {machine.get('cores', '?')} cores). {cores}.",
        f"Headline load (GET /small, wrk 1 thread, {CONNECTIONS} connections, 1000 x-user-id values); the mirrored "
        f"instance copies {PERCENT}% of the default route's requests to a third upstream (`shadow`, the same "
        f"upstream nginx). Medians over {a.rounds} round(s) x {a.duration:g} s, the order rotating each round.",
        "",
        "| | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for key in ("nginx", "off", "on"):
        out.append(f"| {labels[key]} | " + " | ".join(f"{med[key][m]:,.1f}" for m in metrics) + " |")
    cpu_cost = 1 - med["on"]["req per CPU-s"] / med["off"]["req per CPU-s"]
    out += [
        "",
        f"- req/s vs nginx: no mirror {ratio_off:.2f}x, with the {PERCENT}% mirror {ratio_on:.2f}x",
        f"- cost of the {PERCENT}% mirror: {cost * 100:.1f}% of canary-proxy's req/s, {cpu_cost * 100:.1f}% of its "
        f"req per CPU-s ({mirrored:,.0f} copies sent during the measured runs)",
    ]
    if med["on"]["load-side CPU %"] >= 90:
        out.append(
            "- the load side (wrk and the upstream nginx, which also answers the copies) was saturated: req/s "
            "then includes the upstream's extra work for the copies; req per CPU-s is the proxy's own cost"
        )
    return out


def write_section(path: Path, lines: list[str]) -> None:
    """Replace (or append) the mirror section of RESULTS.md."""
    text = path.read_text() if path.exists() else ""
    section = "\n".join([MIRROR_BEGIN, "## Mirroring cost (10% mirror on vs off)", "", *lines, MIRROR_END])
    if MIRROR_BEGIN in text and MIRROR_END in text:
        head, rest = text.split(MIRROR_BEGIN, 1)
        text = head + section + rest.split(MIRROR_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
