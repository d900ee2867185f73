"""Ops files after issue 12: metrics under systemd, drain-safe and locked-down Kubernetes examples."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.test_ops_files import K8S, UNIT, k8s_objects


def test_systemd_keeps_proc_stat_visible() -> None:
    text = UNIT.read_text()
    directives = {m.group(1) for m in re.finditer(r"^(\w+)=", text, re.M)}
    assert "ProcSubset" not in directives, "ProcSubset=pid hides /proc/stat: every process_* metric disappears"
    assert re.search(r"^ProtectProc=invisible$", text, re.M)


def test_kubernetes_examples_drain_safely_and_lock_down_the_admin_port() -> None:
    objs = k8s_objects()
    deploys = [o for (kind, _), o in objs.items() if kind == "Deployment"]
    for dep in deploys:
        assert dep["spec"]["template"]["spec"].get("automountServiceAccountToken") is False, dep["metadata"]["name"]
    sidecar = next(
        d for d in deploys if any(c["name"] == "canary-proxy" for c in d["spec"]["template"]["spec"]["containers"])
    )
    spec = sidecar["spec"]["template"]["spec"]
    proxy = next(c for c in spec["containers"] if c["name"] == "canary-proxy")
    command = proxy["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop >= 3
    grace = 20  # shutdown_grace in configmap.yaml (test_ops_files checks the config itself)
    assert spec["terminationGracePeriodSeconds"] > pre_stop + grace
    token = next(e for e in proxy["env"] if e["name"] == "CANARY_PROXY_ADMIN_TOKEN")
    assert not token["valueFrom"]["secretKeyRef"].get("optional", False), "the token must be required"

    policies = [o for (kind, _), o in objs.items() if kind == "NetworkPolicy"]
    assert policies, "a NetworkPolicy limits who reaches the admin port"
    pod_labels = sidecar["spec"]["template"]["metadata"]["labels"].items()
    policy = next(p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels)
    rules = policy["spec"]["ingress"]
    admin_rules = [r for r in rules if any(p["port"] == 9901 for p in r.get("ports", []))]
    assert admin_rules and all(r.get("from") for r in admin_rules), "admin port only from named sources"
    assert not any(r.get("from") is None and not r.get("ports") for r in rules), "no allow-all rule"


def test_edge_kubernetes_example(tmp_path: Path) -> None:
    from proxy.config import load_config
    from proxy.control.adminguard import exposure_problem

    docs = [d for d in yaml.safe_load_all((K8S / "edge" / "edge.yaml").read_text()) if d]
    objs = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    dep = objs[("Deployment", "canary-proxy-edge")]
    spec = dep["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    proxy = spec["containers"][0]
    cm = objs[("ConfigMap", spec["volumes"][0]["configMap"]["name"])]
    (tmp_path / "canary.yaml").write_text(cm["data"]["canary.yaml"])
    cfg = load_config(str(tmp_path / "canary.yaml"), env={"CANARY_PROXY_ADMIN_TOKEN": "t"})
    assert exposure_problem(cfg) is None
    pre_stop = int(proxy["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + cfg.shutdown_grace
    token = next(e for e in proxy["env"] if e["name"] == "CANARY_PROXY_ADMIN_TOKEN")
    assert not token["valueFrom"]["secretKeyRef"].get("optional", False)
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    admin_rules = [r for r in policy["spec"]["ingress"] if any(p["port"] == cfg.admin.port for p in r["ports"])]
    assert admin_rules and all(r.get("from") for r in admin_rules)
