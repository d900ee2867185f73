"""Results model, medians and paired ratios, PASS/FAIL checks, console tables and RESULTS.md."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

OURS = "ours"
NGINX = "nginx"

Sample = dict[str, float]  # one target, one round: metric name -> value


@dataclass(frozen=True)
class Check:
    """A target from the issue. ``on="ratio"`` compares ours/nginx; ``on="ours"`` our absolute value."""

    metric: str
    op: Literal[">=", "<=", "<"]
    threshold: float
    on: Literal["ratio", "ours"] = "ratio"

    def passes(self, value: float) -> bool:
        if self.op == ">=":
            return value >= self.threshold
        if self.op == "<=":
            return value <= self.threshold
        return value < self.threshold

    def describe(self) -> str:
        subject = "ours/nginx" if self.on == "ratio" else "ours"
        return f"{subject} {self.op} {self.threshold:g}"


@dataclass(frozen=True)
class ScenarioResult:
    key: str
    title: str
    metrics: tuple[str, ...]  # display order; units are part of the name
    samples: dict[str, list[Sample]]  # OURS / NGINX -> one Sample per round
    checks: tuple[Check, ...] = ()
    notes: tuple[str, ...] = ()
    extra: tuple[str, ...] = field(default=())  # free-form lines printed under the table

    def median(self, target: str, metric: str) -> float | None:
        values = [s[metric] for s in self.samples.get(target, []) if metric in s]
        return statistics.median(values) if values else None

    def ratio(self, metric: str) -> float | None:
        """Median over rounds of the per-round ours/nginx ratio (rounds are adjacent in time)."""
        pairs = zip(self.samples.get(OURS, []), self.samples.get(NGINX, []), strict=False)
        ratios = [o[metric] / n[metric] for o, n in pairs if metric in o and metric in n and n[metric]]
        return statistics.median(ratios) if ratios else None

    def verdicts(self) -> list[tuple[Check, float | None, bool]]:
        out = []
        for check in self.checks:
            value = self.ratio(check.metric) if check.on == "ratio" else self.median(OURS, check.metric)
            out.append((check, value, value is not None and check.passes(value)))
        return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _rows(result: ScenarioResult) -> list[list[str]]:
    checks = {c.metric: (c, v, ok) for c, v, ok in result.verdicts()}
    rows = []
    for metric in result.metrics:
        ratio = result.ratio(metric)
        verdict = ""
        if metric in checks:
            check, _, ok = checks[metric]
            verdict = f"{check.describe()}  {'PASS' if ok else 'FAIL'}"
        rows.append(
            [
                metric,
                _fmt(result.median(OURS, metric)),
                _fmt(result.median(NGINX, metric)),
                f"{ratio:.2f}x" if ratio is not None else "-",
                verdict,
            ]
        )
    return rows


HEADER = ["metric (median of rounds)", "canary-proxy", "nginx", "ours/nginx", "target"]


def _by_round(result: ScenarioResult) -> list[str]:
    """Per-round values of the checked metrics, so the spread behind a median is visible."""
    lines = []
    for metric in dict.fromkeys(c.metric for c in result.checks):
        parts = [
            f"{label} " + ", ".join(_fmt(s.get(metric)) for s in result.samples.get(key, []))
            for key, label in ((OURS, "ours"), (NGINX, "nginx"))
        ]
        lines.append(f"{metric} by round: " + " | ".join(parts))
    return lines


def console_table(result: ScenarioResult) -> str:
    rows = [HEADER, *_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = [f"[{result.key}] {result.title}"]
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:4], widths[1:4], strict=True)]
        lines.append("  " + "  ".join(cells) + ("  " + row[4] if row[4] else ""))
        if n == 0:
            lines.append("  " + "-" * (sum(widths[:4]) + 6))
    lines += [f"  {line}" for line in (*result.extra, *_by_round(result))]
    lines += [f"  note: {line}" for line in result.notes]
    return "\n".join(lines)


def markdown_table(result: ScenarioResult) -> str:
    lines = [
        f"### {result.key}. {result.title}",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(result)]
    extra = [*result.extra, *_by_round(result)]
    if extra or result.notes:
        lines.append("")
    lines += [f"- {line}" for line in extra]
    lines += [f"- note: {line}" for line in result.notes]
    return "\n".join(lines) + "\n"


def summary(results: list[ScenarioResult]) -> list[str]:
    """One line per checked target, e.g. ``PASS  [1] req/s: ours/nginx >= 0.7 (got 0.82)``."""
    lines = []
    for result in results:
        for check, value, ok in result.verdicts():
            got = "no data" if value is None else f"got {value:.2f}"
            lines.append(f"{'PASS' if ok else 'FAIL'}  [{result.key}] {check.metric}: {check.describe()} ({got})")
    return lines


# loadtests/mirror_cost.py writes its section between these markers; a bench run keeps it.
MIRROR_BEGIN = "<!-- mirror-cost:begin -->"
MIRROR_END = "<!-- mirror-cost:end -->"
# loadtests/http2.py's section (h2load beside nginx), kept by a bench run too.
HTTP2_BEGIN = "<!-- http2:begin -->"
HTTP2_END = "<!-- http2:end -->"
KEPT_SECTIONS = ("mirror-cost", "http2", "fleet", "decisions", "tls", "ab")


def write_results(
    path: Path,
    machine: dict[str, str],
    setup: list[str],
    results: list[ScenarioResult],
    command: str,
    failures: list[str],
) -> None:
    """Overwrite RESULTS.md with this run: machine, setup, one table per scenario, the checks."""
    parts = [
        "# Benchmark results: canary-proxy vs nginx",
        "",
        f"Written by `{command}` (see README.md). Each number is the median over rounds; a ratio is the",
        "median of the per-round ours/nginx ratios (the two proxies are driven alternately in each round).",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine.items()],
        "",
        "## Setup",
        "",
        *[f"- {line}" for line in setup],
        "",
        "## Targets",
        "",
        "```",
        *(summary(results) + failures or ["(no checked scenario ran)"]),
        "```",
        "",
        "## Scenarios",
        "",
    ]
    parts += [markdown_table(r) for r in results]
    old = path.read_text() if path.exists() else ""
    # Sections other scripts write between markers survive a bench run: mirror_cost.py, http2.py, fleet.py,
    # decision_quality.py / rollback_time.py ("Rollout decisions"), tls_scenarios.py (scenarios 8
    # and 9), ab.py (CPU per request A/B).
    for name in KEPT_SECTIONS:
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if begin in old and end in old:
            parts += ["", old[old.index(begin) : old.index(end) + len(end)], ""]
    path.write_text("\n".join(parts))
