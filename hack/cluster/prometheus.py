"""A real Prometheus for the test cluster: it finds the model servers' pods through the
API server (``kubernetes_sd_configs``, role pod) and scrapes them on their pod IPs.

The relabelling is manifests/monitoring/podmonitor.yaml's (what the Prometheus Operator
would generate from it): pods annotated ``prometheus.io/scrape`` with a
``recjob.dev/revision`` label, at their ``prometheus.io/port`` and ``/path``; every series
labelled ``revision``, ``service`` (the RecJob service, from ``recjob.dev/service``) and
``namespace``. It listens on the bridge (10.244.0.1:9090), so
pods (the operator) reach it too, by the name the operator's manifests are configured
with: ``prometheus-operated.monitoring.svc:9090`` (the Prometheus Operator's Service name),
a Service without selector whose EndpointSlice points at the bridge (:data:`SERVICE`).
Built from its Go module (``build``): Debian's prometheus package leaves the Kubernetes
service discovery out ("field kubernetes_sd_configs not found in type
config.ScrapeConfig").
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

HOST, PORT = "10.244.0.1", 9090
URL = f"http://{HOST}:{PORT}"
SCRAPE_SECONDS = 2
#: The in-cluster name of this Prometheus: what manifests/manager's RECJOB_PROMETHEUS_URL
#: names (prometheus-operated, as the Prometheus Operator calls its Service).
SERVICE = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: monitoring}}
---
apiVersion: v1
kind: Service
metadata: {{name: prometheus-operated, namespace: monitoring}}
spec:
  ports: [{{name: web, port: {PORT}, targetPort: {PORT}, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: prometheus-operated-host
  namespace: monitoring
  labels:
    kubernetes.io/service-name: prometheus-operated
    endpointslice.kubernetes.io/managed-by: recjob-test-cluster
addressType: IPv4
endpoints: [{{addresses: ["{HOST}"], conditions: {{ready: true}}}}]
ports: [{{name: web, port: {PORT}, protocol: TCP}}]
"""


def config(kubeconfig: Path) -> dict:
    """prometheus.yml: one pod-discovery scrape job for the model servers."""
    relabel = [
        {"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
         "regex": "true", "action": "keep"},
        {"source_labels": ["__meta_kubernetes_pod_label_recjob_dev_revision"],
         "regex": "(.+)", "action": "keep"},
        {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Running", "action": "keep"},
        {"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_path"],
         "regex": "(.+)", "target_label": "__metrics_path__"},
        {"source_labels": ["__meta_kubernetes_pod_ip",
                           "__meta_kubernetes_pod_annotation_prometheus_io_port"],
         "regex": r"(.+);(\d+)", "replacement": "$1:$2", "target_label": "__address__"},
        {"source_labels": ["__meta_kubernetes_pod_label_recjob_dev_revision"],
         "target_label": "revision"},
        {"source_labels": ["__meta_kubernetes_pod_label_recjob_dev_service"],
         "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ]  # fmt: skip
    return {
        "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "scrape_timeout": "1s",
                   "evaluation_interval": f"{SCRAPE_SECONDS}s"},
        "scrape_configs": [{
            "job_name": "recjob-model-servers",
            "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": str(kubeconfig)}],
            "relabel_configs": relabel,
        }],
    }  # fmt: skip


def build(go: str, version: str, bin_dir: Path, env: dict) -> None:
    """``go install`` Prometheus (its ``cmd/prometheus``, module version ``version``; the
    web UI's assets are not built in: the API is what the operator and tests use)."""
    module = f"github.com/prometheus/prometheus/cmd/prometheus@{version}"
    subprocess.run([go, "install", "-trimpath", module], check=True,
                   env={**env, "GOBIN": str(bin_dir)})  # fmt: skip


def argv(state: Path, bin_dir: Path) -> list[str]:
    """The Prometheus process (config written under ``state/prometheus``)."""
    binary = bin_dir / "prometheus"
    folder = state / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config(state / "kubeconfig"), sort_keys=False))
    return [
        str(binary), f"--config.file={path}", f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address={HOST}:{PORT}", "--storage.tsdb.retention.time=2h",
        "--log.level=warn",
    ]  # fmt: skip
