"""HTTP/2 towards clients: h2load with several streams per connection through canary-proxy (h2c with
prior knowledge on its usual listener) and, side by side in the same run, through nginx
(`listen ... http2`, cleartext prior knowledge), both proxying HTTP/1.1 to the same upstream nginx.

    python -m loadtests.http2                    # 3 rounds x 10 s (about 1 minute)
    python -m loadtests.http2 --rounds 1 --duration 3

Both proxies are pinned to one core, h2load and the upstream to the other(s). The figure that counts
is the ratio per core: requests per CPU-second of the proxy process, ours over nginx's (target at
least 0.3x); the raw req/s ratio is printed too. The result replaces the HTTP/2 section of
loadtests/RESULTS.md (`make bench` keeps that section when it rewrites the file).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests import nginx
from loadtests.bench import ensure_tools, plan_cores
from loadtests.harness import BenchError, CoreLoad, Usage, machine_info, pinned, sigterm_as_interrupt
from loadtests.lineup import Lineup
from loadtests.report import HTTP2_BEGIN, HTTP2_END, NGINX, OURS
from loadtests.scenarios import Target
from loadtests.topology import Files, Ports

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONNECTIONS = 16
STREAMS = 10  # concurrent streams per connection (h2load -m)
TARGET = 0.3  # ours/nginx, requests per CPU-second


def nginx_h2_cmd(bench: Lineup, port: int) -> list[str]:
    """The bench's nginx proxy config (same routes), listening for cleartext HTTP/2 (prior knowledge)."""
    prefix = bench.work / "nginx-h2"
    conf = nginx.write_proxy(prefix, port, bench.ports, 1, bench.nofile)
    text = conf.read_text()
    listen = f"listen 127.0.0.1:{port} backlog=4096;"
    assert listen in text
    conf.write_text(
        text.replace(listen, f"listen 127.0.0.1:{port} http2 backlog=4096;\n        http2_max_concurrent_streams 100;")
    )
    return nginx.command(prefix, conf)


def h2load(port: int, duration: float, cpus: str | None) -> dict[str, float]:
    """One h2load run: req/s, and how many requests did not get a 2xx."""
    cmd = ["h2load", "-D", f"{duration:g}", "--warm-up-time", "1", "-c", str(CONNECTIONS), "-m", str(STREAMS)]
    cmd += ["-H", "x-user-id: 4242", f"http://127.0.0.1:{port}/small"]
    done = subprocess.run(pinned(cmd, cpus), capture_output=True, text=True, timeout=duration + 60)
    out = done.stdout + done.stderr
    rps = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    requests = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    if done.returncode != 0 or rps is None or codes is None or requests is None:
        raise BenchError(f"h2load failed ({done.returncode}):\n{out[-2000:]}")
    bad = int(requests.group(2)) - int(codes.group(1))
    return {"req/s": float(rps.group(1)), "non-2xx": float(bad), "done": float(requests.group(2))}


def sample(target: Target, duration: float, cpus: str | None) -> dict[str, float]:
    usage, load = Usage(target.pid), CoreLoad(cpus)
    res = h2load(target.port, duration, cpus)
    cpu = usage.cpu_percent()
    return {
        "req/s": res["req/s"],
        "CPU %": cpu,
        "req per CPU-s": res["req/s"] / (cpu / 100) if cpu else 0.0,
        "peak RSS MiB": usage.peak_rss() / 2**20,
        "load-side CPU %": load.percent(),
        "non-2xx": res["non-2xx"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--base-port", type=int, default=28000)
    p.add_argument("--python", default=str(REPO / ".venv/bin/python"))
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    a = p.parse_args(argv)
    python = a.python if Path(a.python).exists() else sys.executable
    ensure_tools()
    if shutil.which("h2load") is None:
        print("h2load not found: install nghttp2-client (.ci/system-deps.sh)", file=sys.stderr)
        return 2
    machine = machine_info(python)
    ports = Ports(a.base_port)
    rows: dict[str, list[dict[str, float]]] = {OURS: [], NGINX: []}
    with contextlib.ExitStack() as stack, sigterm_as_interrupt():
        bench = Lineup(
            stack,
            python=python,
            ports=ports,
            cores=plan_cores(1),
            work=HERE / ".work" / "http2",
            files=Files(HERE / ".work" / "http2", 1 << 20),
            workers=1,
            self_test=False,
        )
        try:
            ours, _ = bench.setup()
            port = ports.fresh(NGINX)[0]
            theirs = stack.enter_context(
                bench.instance(NGINX, "nginx (http2)", "nginx-h2", nginx_h2_cmd(bench, port), port, bench.cores.proxy)
            )
            targets = {OURS: ours, NGINX: theirs}
            for t in targets.values():  # warm-up (and a check that both speak h2c)
                h2load(t.port, 2, bench.cores.load)
            for r in range(a.rounds):
                order = [OURS, NGINX] if r % 2 == 0 else [NGINX, OURS]
                for key in order:
                    rows[key].append(sample(targets[key], a.duration, bench.cores.load))
                    bench.check_alive()
        except BenchError as e:
            print(f"http2 bench failed: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    lines = report_lines(rows, a, machine, bench.cores.describe())
    print("\n".join(lines))
    if not a.no_write:
        write_section(Path(a.results), lines)
        print(f"\nwrote the HTTP/2 section of {a.results}")
    return 0


def report_lines(
    rows: dict[str, list[dict[str, float]]], a: argparse.Namespace, machine: dict[str, str], cores: str
) -> list[str]:
    """Markdown: medians per proxy, then the ratios against nginx (per round, median)."""
    med = {k: {m: statistics.median(s[m] for s in v) for m in v[0]} for k, v in rows.items()}
    pairs = list(zip(rows[OURS], rows[NGINX], strict=True))
    ratio = statistics.median(o["req/s"] / n["req/s"] for o, n in pairs)
    per_core = statistics.median(o["req per CPU-s"] / n["req per CPU-s"] for o, n in pairs)
    metrics = list(med[NGINX])
    out = [
        f"Written by `python -m loadtests.http2 --rounds {a.rounds} --duration {a.duration:g}` on "
        f"{machine.get('date', '?')} ({machine.get('cpu', '?')}, {machine.get('cores', '?')} cores). {cores}.",
        f"h2load, {CONNECTIONS} connections x {STREAMS} concurrent streams, GET /small (10-byte body) with one "
        "x-user-id; canary-proxy speaks h2c (prior knowledge) on its usual listener, nginx `listen ... http2`; "
        f"both proxy HTTP/1.1 to the same upstream nginx. Medians over {a.rounds} round(s) x {a.duration:g} s, "
        "the order alternating each round. The machine is shared (other jobs ran meanwhile): treat the "
        "absolute numbers as rough; the ratios come from runs taken side by side.",
        "",
        "| | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for key, label in ((NGINX, "nginx (http2)"), (OURS, "canary-proxy (h2c)")):
        out.append(f"| {label} | " + " | ".join(f"{med[key][m]:,.1f}" for m in metrics) + " |")
    verdict = "PASS" if per_core >= TARGET else "FAIL"
    out += [
        "",
        f"- per core (requests per CPU-second of the proxy process): ours/nginx {per_core:.2f}x "
        f"(target >= {TARGET}: {verdict})",
        f"- req/s: ours/nginx {ratio:.2f}x",
    ]
    return out


def write_section(path: Path, lines: list[str]) -> None:
    """Replace (or append) the HTTP/2 section of RESULTS.md."""
    text = path.read_text() if path.exists() else ""
    section = "\n".join(
        [HTTP2_BEGIN, "## HTTP/2 towards clients (h2load, several streams per connection)", "", *lines, HTTP2_END]
    )
    if HTTP2_BEGIN in text and HTTP2_END in text:
        head, rest = text.split(HTTP2_BEGIN, 1)
        text = head + section + rest.split(HTTP2_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
