"""The Kubernetes TLS example (config/kubernetes/tls/): valid YAML whose proxy config loads with a real
certificate in the Secret's place, mounted the way that lets the proxy see renewals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from support.certs import CA

from proxy.config import load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "kubernetes" / "tls" / "edge-tls.yaml"


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d}


def test_the_tls_secret_is_mounted_as_a_directory_and_the_config_loads(tmp_path: Path) -> None:
    objs = objects()
    (dep,) = [o for (kind, _), o in objs.items() if kind == "Deployment"]
    spec = dep["spec"]["template"]["spec"]
    (proxy,) = [c for c in spec["containers"] if c["name"] == "canary-proxy"]
    tls_volume = next(v for v in spec["volumes"] if "secret" in v)
    mount = next(m for m in proxy["volumeMounts"] if m["name"] == tls_volume["name"])
    assert "subPath" not in mount, "a subPath mount never sees a renewed Secret"
    config_volume = next(v for v in spec["volumes"] if "configMap" in v)
    cm = objs[("ConfigMap", config_volume["configMap"]["name"])]
    text = cm["data"]["canary.yaml"]
    assert f"cert: {mount['mountPath']}/tls.crt" in text and f"key: {mount['mountPath']}/tls.key" in text

    issued = CA(tmp_path / "pki").issue("www.example.com", dns=["www.example.com"])
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "tls.crt").write_bytes(issued.cert.read_bytes())  # the kubernetes.io/tls key names
    (secret / "tls.key").write_bytes(issued.key.read_bytes())
    (tmp_path / "canary.yaml").write_text(text.replace(mount["mountPath"], str(secret)))
    cfg = load_config(str(tmp_path / "canary.yaml"))
    assert cfg.tls is not None and cfg.tls.cert == str(secret / "tls.crt")

    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports["https"] == cfg.listen.port
    svc = objs[("Service", dep["metadata"]["name"])]
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(443, "https")]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    policy = objs[("NetworkPolicy", dep["metadata"]["name"])]
    assert {"port": cfg.listen.port, "protocol": "TCP"} in policy["spec"]["ingress"][0]["ports"]
