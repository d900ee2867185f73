"""Process plumbing for the bench: start/stop process groups, CPU pinning, RSS and CPU accounting."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A setup step failed; the message says what to look at."""


@dataclass(frozen=True)
class Cores:
    """Which CPUs the proxies under test and the load side (upstreams, clients) run on."""

    proxy: str | None  # taskset list, None = no pinning (single-core machine)
    load: str | None

    @classmethod
    def plan(cls) -> Cores:
        """Proxies on CPU 0, everything else on the remaining CPUs (when there are any)."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2 or shutil.which("taskset") is None:
            return cls(proxy=None, load=None)
        return cls(proxy=str(cpus[0]), load=",".join(str(c) for c in cpus[1:]))

    def describe(self) -> str:
        if self.proxy is None:
            return "no CPU pinning (fewer than 2 CPUs or no taskset)"
        return f"proxies pinned to CPU {self.proxy}; upstreams and clients on CPU {self.load}"


def pinned(cmd: Sequence[str], cpus: str | None) -> list[str]:
    """Prefix ``cmd`` with ``taskset -c cpus`` when pinning is possible."""
    return ["taskset", "-c", cpus, *cmd] if cpus else list(cmd)


REPO = Path(__file__).resolve().parent.parent


def child_env(cmd: Sequence[str], env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: a `python -m proxy` child runs the installed package (compiled
    when a C compiler was there), never the sources in ./proxy, so the repository is kept off its
    path (PYTHONSAFEPATH: no current directory; PYTHONPATH without the repository)."""
    out = dict(os.environ if env is None else env)
    if "proxy" in cmd and "-m" in cmd:
        parts = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
        out["PYTHONPATH"] = os.pathsep.join(parts)
        out["PYTHONSAFEPATH"] = "1"
    return out


class Proc:
    """A child started in its own session, so stopping it reaches its whole process group only."""

    def __init__(self, name: str, cmd: Sequence[str], log_dir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.cmd = list(cmd)
        self.log = log_dir / f"{name}.log"
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=child_env(self.cmd, env),
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL whatever is left after 3 s."""
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(wait)
                return


def wait_port(port: int, proc: Proc, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    """Block until ``host:port`` accepts connections; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"{proc.name} did not listen on {host}:{port} within {timeout:.0f}s:\n{proc.log_tail()}")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing accepts on ``host:port`` (so a stale instance would not be measured)."""
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) != 0


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (nginx master + workers, proxy supervisor + workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes(root: int) -> int:
    """Current resident set size of the whole process tree (sum over processes)."""
    return sum(_status_kib(pid, "VmRSS") for pid in process_tree(root)) * 1024


def cpu_seconds(root: int) -> float:
    """User + system CPU time consumed so far by the process tree."""
    total = 0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


class Usage:
    """Peak RSS and CPU share of a process tree over a measured interval.

    The peak comes from VmHWM after resetting it through ``/proc/PID/clear_refs`` (value 5); if the
    reset is refused the lifetime peak is reported instead, which can only overstate.
    """

    def __init__(self, root: int):
        self.root = root
        self.pids = process_tree(root)
        for pid in self.pids:
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")
        self.cpu0 = cpu_seconds(root)
        self.t0 = time.monotonic()

    def peak_rss(self) -> int:
        return sum(_status_kib(pid, "VmHWM") for pid in process_tree(self.root)) * 1024

    def cpu_percent(self) -> float:
        elapsed = time.monotonic() - self.t0
        return 100.0 * (cpu_seconds(self.root) - self.cpu0) / elapsed if elapsed > 0 else 0.0


class CoreLoad:
    """Busy share of a set of CPUs (from /proc/stat) over an interval: shows when the load side, not the
    proxy under test, was the bottleneck."""

    def __init__(self, cpus: str | None):
        self.cpus = {f"cpu{c}" for c in cpus.split(",")} if cpus else {"cpu"}
        self.start = self._sample()

    def _sample(self) -> tuple[int, int]:
        busy = total = 0
        for line in Path("/proc/stat").read_text().splitlines():
            fields = line.split()
            if fields and fields[0] in self.cpus:
                ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]
        return busy, total

    def percent(self) -> float:
        busy, total = self._sample()
        d_total = total - self.start[1]
        return 100.0 * (busy - self.start[0]) / d_total if d_total else 0.0


def raise_nofile(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE for us and every child we start (root may raise the hard limit too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, want)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
    except (ValueError, OSError):
        target = hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return target


def _first_line(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def machine_info(python: str) -> dict[str, str]:
    """What RESULTS.md records about the machine and tool versions."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": model,
        "cores": f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        "memory": f"{os.sysconf('SC_PHYS_PAGES') * _PAGE / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "python": _first_line([python, "--version"]),
        "harness python": sys.version.split()[0],
        "nginx": _first_line(["nginx", "-v"]),
        "wrk": _first_line(["wrk", "--version"]).split(" Copyright")[0],
        "curl": " ".join(_first_line(["curl", "--version"]).split()[:2]),
    }


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so the same cleanup path runs for Ctrl-C and kill."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
