"""The real operator (kopf, in a subprocess) against a real API server (tests/envtest.py:
etcd + kube-apiserver, no controllers), authenticated with its ServiceAccount's token and
authorized by the shipped namespaced RBAC. The tests play the Kubeflow Training Operator,
the Job controller, the kubelet and KServe by writing the status those controllers would
write; the API server validates it against the upstream CRDs. What the operator asked for
is read from the API server's audit log. (Real controllers: tests/cluster/.)"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from recjob_operator.api.v1alpha1.common import FINALIZER
from recjob_operator.controller.children import RECJOB_LABEL
from recjob_operator.local.backend import free_port
from tests.conftest import MINIMAL, REPO
from tests.envtest import INFERENCESERVICE_CRD, PYTORCHJOB_CRD, RECJOB_CRD, EnvTest

pytestmark = pytest.mark.slow
NS = "shop"
OPERATOR_NS = "recjob-system"
OPERATOR_USER = EnvTest.service_account_user(OPERATOR_NS, "recjob-operator")
BIN = Path(sys.executable).parent
MERGE = {"Content-Type": "application/merge-patch+json"}
RECJOBS = f"/apis/recjob.dev/v1alpha1/namespaces/{NS}/recjobs"
PYTORCHJOBS = f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
ISVCS = f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices"
PODS = f"/api/v1/namespaces/{NS}/pods"
GATE_OK = {"passed": True, "metric": "ndcg@10", "source_value": 0.91, "converted_value": 0.905,
           "relative_drop": 0.0055, "budget": 0.01, "rank_correlation": 0.99,
           "published_version": 1, "reasons": []}  # fmt: skip


#: The operator's configured Prometheus servers (RECJOB_PROMETHEUS_URL / _SOURCES): the
#: module's Prometheus on "default", a test's own (stopped mid-analysis) on "dark".
PROMETHEUS_PORTS = {"default": free_port(), "dark": free_port()}


class Operator:
    """`kopf run` of the operator, restartable. As the namespaced overlay runs it: no CRD /
    namespace scanning, leader election on a Lease in the operator's namespace (short
    timings here). ``pod_name`` is its identity: the same after a restart, so the Lease is
    taken back at once, as a restarted container in the same pod does."""

    def __init__(self, kubeconfig: Path, log: Path, pod_name: str = "recjob-operator-0"):
        self.kubeconfig, self.log, self.pod_name = kubeconfig, log, pod_name
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.metrics_port, self.health_port = free_port(), free_port()
        self.process = subprocess.Popen(
            [str(BIN / "kopf"), "run", "--standalone", "--namespace", NS, "-m",
             "recjob_operator.kube.handlers"],
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig),
                 "RECJOB_MAX_SLEEP_SECONDS": "0.3", "RECJOB_RESYNC_SECONDS": "300",
                 "RECJOB_METRICS_PORT": str(self.metrics_port),
                 "RECJOB_METRICS_ADDRESS": "127.0.0.1", "RECJOB_HEALTH_PORT": str(self.health_port),
                 "RECJOB_HEALTH_ADDRESS": "127.0.0.1", "RECJOB_WATCH_CRDS": "false",
                 "POD_NAME": self.pod_name, "POD_NAMESPACE": OPERATOR_NS,
                 "RECJOB_LEASE_DURATION_SECONDS": "3", "RECJOB_LEASE_RENEW_DEADLINE_SECONDS": "2",
                 "RECJOB_LEASE_RETRY_PERIOD_SECONDS": "0.5",
                 "RECJOB_PROMETHEUS_URL": f"http://127.0.0.1:{PROMETHEUS_PORTS['default']}",
                 "RECJOB_PROMETHEUS_SOURCES": f"dark=http://127.0.0.1:{PROMETHEUS_PORTS['dark']}"},
            stdout=self.log.open("a"), stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip

    def health(self) -> dict | None:
        """Its /healthz answer (None while it does not answer)."""
        try:
            return httpx.get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2).json()
        except httpx.HTTPError:
            return None

    def wait_health(self, predicate, timeout: float = 30) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            answer = self.health()
            if answer is not None and predicate(answer):
                return answer
            time.sleep(0.1)
        raise TimeoutError(f"{self.pod_name}: /healthz {self.health()}")

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


def start_env(root: Path, crds: list[Path]) -> tuple[EnvTest, Path]:
    """An envtest API server with ``crds``, namespace shop and the namespaced overlay
    (RBAC, ServiceAccount); returns it and the operator's ServiceAccount kubeconfig."""
    env = EnvTest(root, crds=crds).start()
    try:
        env.namespace(NS)
        overlay = env.kubectl("kustomize", str(REPO / "manifests" / "overlays" / "namespaced"))
        env.kubectl("apply", "--server-side", "-f", "-", input=overlay.stdout)
        wait_admissible(env)
        return env, env.service_account_kubeconfig(OPERATOR_NS, "recjob-operator")
    except BaseException:
        env.stop()
        raise


def wait_admissible(env: EnvTest, timeout: float = 60) -> None:
    """Wait until a RecJob create passes admission. The overlay's finalizer
    MutatingAdmissionPolicy needs the RecJob schema from the API server's OpenAPI, which
    it learns on a timer after the CRD is served: until then every create is refused with
    503 "Resource kind ... not found. There can be a delay ..." (seen in CI)."""
    deadline = time.monotonic() + timeout
    with env.http() as client:
        while True:
            response = post_dry_run(client, NS, "admission-probe")
            if response.status_code != 503:
                assert response.status_code == 201, response.text
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"RecJob creates refused for {timeout} s: {response.text}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Envtest API server + the operator (kopf run, its ServiceAccount) watching shop."""
    tmp = tmp_path_factory.mktemp("kopf")
    env, kubeconfig = start_env(tmp, [RECJOB_CRD, PYTORCHJOB_CRD, INFERENCESERVICE_CRD])
    operator = Operator(kubeconfig, tmp / "operator.log")
    operator.start()
    try:
        with env.http() as client:
            yield env, client, operator
    finally:
        operator.stop()
        env.stop()


def operator_requests(env: EnvTest, **filters) -> list:
    """The operator's requests so far (audit log), oldest first."""
    return env.audit(user=OPERATOR_USER, **filters)


def exposed_metrics(operator: Operator, expected: str, timeout: float = 10) -> str:
    """The operator's metrics once they hold the line ``expected`` (a pass records them
    just after it wrote the status a test waited for)."""
    deadline = time.monotonic() + timeout
    while expected not in (
        exposed := httpx.get(f"http://127.0.0.1:{operator.metrics_port}/metrics").text
    ):
        assert time.monotonic() < deadline, f"{expected!r} not in {exposed}"
        time.sleep(0.1)
    return exposed


def reconcile_passes(operator: Operator) -> float:
    """How many reconcile passes the operator has run (its histogram's count)."""
    exposed = httpx.get(f"http://127.0.0.1:{operator.metrics_port}/metrics").text
    for line in exposed.splitlines():
        if line.startswith("recjob_reconcile_duration_seconds_count "):
            return float(line.split()[1])
    return 0.0


def wait_for(client: httpx.Client, path: str, predicate=lambda o: True, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        response = client.get(path)
        if response.status_code == 200 and predicate(response.json()):
            return response.json()
        time.sleep(0.1)
    raise TimeoutError(f"{path}: {client.get(path).text[:2000]}")


def create_recjob(client: httpx.Client, name: str, **spec) -> dict:
    document = copy.deepcopy(MINIMAL)
    document["metadata"] = {"name": name, "namespace": NS}
    document["spec"].update(spec)
    deadline = time.monotonic() + 30
    # a 503 "Resource kind ... not found. There can be a delay" can follow a first admitted
    # dry run on a loaded machine (seen once): the API server's own advice is to retry
    while (response := client.post(RECJOBS, json=document)).status_code == 503:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.2)
    assert response.status_code == 201, response.text
    return response.json()


def dry_run_create(client: httpx.Client, namespace: str, name: str) -> dict:
    """The minimal RecJob ``namespace/name`` as the API server would create it (dry run:
    admission runs, nothing is stored)."""
    response = post_dry_run(client, namespace, name)
    assert response.status_code == 201, response.text
    return response.json()


def post_dry_run(client: httpx.Client, namespace: str, name: str) -> httpx.Response:
    """The API server's answer to a dry-run create of the minimal RecJob ``namespace/name``."""
    document = copy.deepcopy(MINIMAL)
    document["metadata"] = {"name": name, "namespace": namespace}
    path = f"/apis/recjob.dev/v1alpha1/namespaces/{namespace}/recjobs"
    return client.post(path, json=document, params={"dryRun": "All"})


def patch_status(client: httpx.Client, path: str, status: dict) -> None:
    """Write ``status`` through the status subresource, as the owning controller does."""
    response = client.patch(f"{path}/status", headers=MERGE, json={"status": status})
    assert response.status_code == 200, response.text


def finish_pod(client: httpx.Client, name: str, labels: dict, message: dict,
               exit_code: int = 0) -> None:  # fmt: skip
    """A finished pod whose container left ``message`` as its termination message (with
    the labels its PyTorchJob / Job template gives it, the RecJob's among them: its
    change wakes the RecJob), as the kubelet reports it."""
    component = "training" if "training.kubeflow.org/job-name" in labels else "conversion"
    child = labels.get("training.kubeflow.org/job-name") or labels["job-name"]
    recjob, generation = re.fullmatch(r"(.+)-g(\d+)-(?:train|convert.*)", child).groups()
    labels = {"app.kubernetes.io/managed-by": "recjob-operator",
              "app.kubernetes.io/component": component, RECJOB_LABEL: recjob,
              "recjob.dev/generation": generation, **labels}  # fmt: skip
    spec = {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}
    created = client.post(PODS, json={"apiVersion": "v1", "kind": "Pod", "spec": spec,
                                      "metadata": {"name": name, "labels": labels}})  # fmt: skip
    assert created.status_code == 201, created.text
    terminated = {"exitCode": exit_code, "reason": "Error" if exit_code else "Completed",
                  "message": json.dumps(message), "startedAt": "2026-11-29T11:59:00Z",
                  "finishedAt": "2026-11-29T12:00:00Z"}  # fmt: skip
    patch_status(client, f"{PODS}/{name}", {
        "phase": "Failed" if exit_code else "Succeeded", "containerStatuses": [
        {"name": "c", "image": "x", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"terminated": terminated}}]})  # fmt: skip


def condition(kind: str, message: str = "", reason: str = "") -> dict:
    return {"type": kind, "status": "True", "message": message, "reason": reason or kind,
            "lastTransitionTime": "2026-11-29T12:00:00Z"}  # fmt: skip


def training(client: httpx.Client, name: str, *conditions: dict) -> None:
    """The Training Operator's status of PyTorchJob ``name``."""
    patch_status(client, f"{PYTORCHJOBS}/{name}", {"conditions": list(conditions)})


def conversion_done(client: httpx.Client, name: str, ok: bool = True, message: str = "") -> None:
    """The Job controller's status of a finished Job ``name`` (the API server insists on
    SuccessCriteriaMet / FailureTarget before Complete / Failed, and on their times)."""
    started = {"startTime": "2026-11-29T11:59:00Z"}
    if ok:
        patch_status(client, f"{JOBS}/{name}", {**started, "succeeded": 1, "conditions": [
            condition("SuccessCriteriaMet", reason="CompletionsReached"),
            condition("Complete", reason="CompletionsReached")],
            "completionTime": "2026-11-29T12:00:00Z"})  # fmt: skip
    else:
        patch_status(client, f"{JOBS}/{name}", {**started, "failed": 1, "conditions": [
            condition("FailureTarget", message, "BackoffLimitExceeded"),
            condition("Failed", message, "BackoffLimitExceeded")]})  # fmt: skip


def record(client: httpx.Client, service: str) -> dict:
    """The service record's data (ConfigMap ``<service>-recjob``)."""
    response = client.get(f"/api/v1/namespaces/{NS}/configmaps/{service}-recjob")
    assert response.status_code == 200, response.text
    return response.json().get("data") or {}


def phase(name: str, *phases: str):
    return lambda o: (o.get("status") or {}).get("phase") in phases


def test_happy_path_to_succeeded(cluster) -> None:
    env, client, operator = cluster
    created = create_recjob(client, "happy")
    job = wait_for(client, f"{PYTORCHJOBS}/happy-g1-train")
    assert job["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert (
        client.get(f"/api/v1/namespaces/{NS}/configmaps/happy-g1-train-config").status_code == 200
    )
    wait_for(client, f"{RECJOBS}/happy", phase("happy", "Training"))
    training(client, "happy-g1-train", condition("Created"), condition("Running"))
    finish_pod(client, "happy-master-0", {"training.kubeflow.org/job-name": "happy-g1-train",
               "training.kubeflow.org/replica-type": "master"},
               {"main_metric": "ndcg@10", "model": {"ndcg@10": 0.91}})  # fmt: skip
    training(client, "happy-g1-train", condition("Created"), condition("Succeeded"))
    wait_for(client, f"{JOBS}/happy-g1-convert")
    recjob = wait_for(client, f"{RECJOBS}/happy", phase("happy", "Converting"))
    assert recjob["status"]["quality"] == {"metric": "ndcg@10", "value": 0.91}
    finish_pod(client, "happy-convert-x", {"job-name": "happy-g1-convert"}, GATE_OK)
    conversion_done(client, "happy-g1-convert")
    isvc = wait_for(client, f"{ISVCS}/happy")
    assert record(client, "happy")["stableModelVersion"] == "1"
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    assert "ownerReferences" not in isvc["metadata"]  # the service outlives its RecJobs
    ready = {
        "conditions": [condition("Ready")],
        "components": {"predictor": {"latestReadyRevision": "happy-predictor-00001"}},
    }
    patch_status(client, f"{ISVCS}/happy", ready)
    done = wait_for(client, f"{RECJOBS}/happy", phase("happy", "Succeeded"))
    status = done["status"]
    assert status["lineage"]["modelVersion"] == 1
    assert status["conversion"]["qualityGate"]["passed"] is True
    events = sorted(client.get(f"/api/v1/namespaces/{NS}/events").json()["items"],
                    key=lambda e: int(e["metadata"]["resourceVersion"]))  # fmt: skip
    reasons = [e["reason"] for e in events if e["involvedObject"]["name"] == "happy"]
    assert reasons[:3] == ["TrainingCreated", "TrainingSucceeded", "ConversionCreated"]
    exposed = exposed_metrics(
        operator, 'recjob_phase{namespace="shop",phase="Succeeded",recjob="happy"} 1.0'
    )
    assert 'recjob_phase{namespace="shop",phase="Training",recjob="happy"} 0.0' in exposed
    assert "recjob_reconcile_duration_seconds_count" in exposed
    assert "Promoted" in reasons
    creates = [r.code for r in operator_requests(env) if r.verb == "create"
               and r.resource == "pytorchjobs" and r.name == "happy-g1-train"]  # fmt: skip
    assert creates.count(201) == 1 and set(creates) <= {201, 409}  # level-triggered: once


def test_the_finalizer_is_added_at_admission_not_patched_in(cluster) -> None:
    """manifests/manager/finalizer_policy.yaml (bound to shop by the namespaced overlay):
    the API server adds the finalizer as a RecJob is created, so kopf patches nothing in;
    outside shop it adds none (no operator there would release it)."""
    env, client, _ = cluster
    deadline = time.time() + 30  # until the API server's policy informers have it
    while "finalizers" not in dry_run_create(client, NS, "probe")["metadata"]:
        assert time.time() < deadline, "the finalizer policy never applied"
        time.sleep(0.2)
    since = datetime.now(UTC)
    created = create_recjob(client, "admitted")
    assert created["metadata"]["finalizers"] == [FINALIZER]  # the name the operator releases
    wait_for(client, f"{RECJOBS}/admitted", phase("admitted", "Training"))
    patches = [r for r in operator_requests(env, since=since) if r.verb == "patch"
               and r.resource == "recjobs" and r.name == "admitted"]  # fmt: skip
    assert patches == [], patches
    client.delete(f"{RECJOBS}/admitted")
    deadline = time.time() + 30
    while client.get(f"{RECJOBS}/admitted").status_code != 404:
        assert time.time() < deadline, "the finalizer was never released"
        time.sleep(0.1)
    assert "finalizers" not in dry_run_create(client, "default", "elsewhere")["metadata"]


def test_failed_training_fails_with_its_reason(cluster) -> None:
    """The Training Operator says which replica failed; the trainer's own error, left in
    the master's termination message, says why: the RecJob's message has both."""
    _, client, _ = cluster
    create_recjob(client, "oom")
    wait_for(client, f"{PYTORCHJOBS}/oom-g1-train")
    error = "FileNotFoundError: pvc://data/train.inter: no such file"
    finish_pod(client, "oom-master-0", {"training.kubeflow.org/job-name": "oom-g1-train",
               "training.kubeflow.org/replica-type": "master"}, {"error": error},
               exit_code=1)  # fmt: skip
    training(client, "oom-g1-train", condition("Failed", "master-0 OOMKilled"))
    failed = wait_for(client, f"{RECJOBS}/oom", phase("oom", "Failed"))
    assert "master-0 OOMKilled; trainer: " + error in failed["status"]["message"]
    assert client.get(f"{JOBS}/oom-g1-convert").status_code == 404


def test_quality_gate_failure_is_never_deployed(cluster) -> None:
    _, client, _ = cluster
    create_recjob(client, "gated", serving={"name": "gated-svc"})
    wait_for(client, f"{PYTORCHJOBS}/gated-g1-train")
    training(client, "gated-g1-train", condition("Succeeded"))
    wait_for(client, f"{JOBS}/gated-g1-convert")
    bad = dict(GATE_OK, passed=False, published_version=None, reasons=["ndcg@10 fell 4%"])
    finish_pod(client, "gated-convert-x", {"job-name": "gated-g1-convert"}, bad)
    conversion_done(client, "gated-g1-convert", ok=False, message="exit code 2")
    failed = wait_for(client, f"{RECJOBS}/gated", phase("gated", "Failed"))
    assert "quality gate failed" in failed["status"]["message"]
    assert "ndcg@10 fell 4%" in failed["status"]["message"]
    assert client.get(f"{ISVCS}/gated-svc").status_code == 404


def test_invalid_recjob_gets_failed_with_the_problems(cluster) -> None:
    _, client, _ = cluster
    """What the CRD (schema, CEL) accepts and only the operator refuses: Failed with every
    problem, nothing created. (What CEL refuses never gets here: tests/cluster.)"""
    bad = client.post(
        RECJOBS,
        json={
            **MINIMAL,
            "metadata": {"name": "refused", "namespace": NS},
            "spec": {**MINIMAL["spec"], "rollout": {"steps": [50, 10]}},
        },
    )
    assert bad.status_code == 422 and "spec.rollout.steps" in bad.text  # the API server's CEL
    data = dict(MINIMAL["spec"]["data"], train="pvc://data/../../etc/passwd")
    create_recjob(client, "invalid", data=data, artifactsUri="s3://recjob-artifacts/runs",
                  training={"nodes": 2})  # fmt: skip
    failed = wait_for(client, f"{RECJOBS}/invalid", phase("invalid", "Failed"))
    assert "spec.data.train" in failed["status"]["message"]
    assert "spec.training.nodes" in failed["status"]["message"]
    assert client.get(f"{PYTORCHJOBS}/invalid-g1-train").status_code == 404


def test_spec_change_mid_training_supersedes_the_generation(cluster) -> None:
    _, client, _ = cluster
    create_recjob(client, "edited")
    wait_for(client, f"{PYTORCHJOBS}/edited-g1-train")
    client.patch(f"{RECJOBS}/edited", headers=MERGE,
                 json={"spec": {"training": {"learningRate": 1e-4}}})  # fmt: skip
    wait_for(client, f"{PYTORCHJOBS}/edited-g2-train")
    deadline = time.time() + 10
    while client.get(f"{PYTORCHJOBS}/edited-g1-train").status_code != 404:
        assert time.time() < deadline, "generation 1 training was not cleaned up"
        time.sleep(0.1)
    status = wait_for(client, f"{RECJOBS}/edited", lambda o: (o.get("status") or {}).get(
        "observedGeneration") == 2)["status"]  # fmt: skip
    assert status["phase"] == "Training"


def test_export_change_mid_conversion_replaces_the_conversion_job(cluster) -> None:
    _, client, _ = cluster
    create_recjob(client, "reexport")
    wait_for(client, f"{PYTORCHJOBS}/reexport-g1-train")
    training(client, "reexport-g1-train", condition("Succeeded"))
    wait_for(client, f"{JOBS}/reexport-g1-convert")
    client.patch(f"{RECJOBS}/reexport", headers=MERGE,
                 json={"spec": {"export": {"opset": 18}}})  # fmt: skip
    wait_for(client, f"{JOBS}/reexport-g1-convert-2")  # converted again, not retrained
    deadline = time.time() + 60  # the operator reacts in ~1 s; CI shares 2 cores
    while client.get(f"{JOBS}/reexport-g1-convert").status_code != 404:
        assert time.time() < deadline, "the superseded conversion Job was not deleted"
        time.sleep(0.1)
    assert client.get(f"{PYTORCHJOBS}/reexport-g1-train").status_code == 200


class RevisionExporter:
    """Plays the serving revisions' metrics: requests and errors per revision, served on
    127.0.0.1 for a real Prometheus to scrape."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, start_http_server

        self.registry = CollectorRegistry()
        self.requests = Counter("recjob_inference_requests_total", "requests", ["revision"],
                                registry=self.registry)  # fmt: skip
        self.errors = Counter("recjob_inference_errors_total", "errors", ["revision"],
                              registry=self.registry)  # fmt: skip
        self.error_share: dict[str, float] = {}
        self.server, self.thread = start_http_server(0, "127.0.0.1", registry=self.registry)
        self.port = self.server.server_port
        self.running = True
        threading.Thread(target=self._traffic, daemon=True).start()

    def _traffic(self) -> None:
        while self.running:
            for revision, share in list(self.error_share.items()):
                self.requests.labels(revision=revision).inc(10)
                self.errors.labels(revision=revision).inc(10 * share)
            time.sleep(0.2)

    def stop(self) -> None:
        self.running = False
        self.server.shutdown()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    from recjob_operator.prometheus import (
        prometheus_binary,
        prometheus_command,
        prometheus_config,
        wait_ready,
    )

    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed")
    tmp = tmp_path_factory.mktemp("prometheus")
    exporter = RevisionExporter()
    config = tmp / "prometheus.yml"
    config.write_text(prometheus_config([f"127.0.0.1:{exporter.port}"], 0.5, {"namespace": NS}))
    port = PROMETHEUS_PORTS["default"]
    process = subprocess.Popen(prometheus_command(config, tmp / "data", port),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    yield url, exporter, process
    exporter.stop()
    process.terminate()
    process.wait(10)


ERROR_RATE = {
    "name": "error-rate",
    "query": 'sum(rate(recjob_inference_errors_total{revision="{{revision}}",'
    'namespace="{{namespace}}"}[5s])) / sum(rate(recjob_inference_requests_total'
    '{revision="{{revision}}",namespace="{{namespace}}"}[5s]))',
    "max": 0.05,
}


def deploy_first(client: httpx.Client, name: str, service: str) -> None:
    """Drive RecJob ``name`` to Succeeded as the first model of ``service``."""
    create_recjob(client, name, serving={"name": service})
    wait_for(client, f"{PYTORCHJOBS}/{name}-g1-train")
    training(client, f"{name}-g1-train", condition("Succeeded"))
    wait_for(client, f"{JOBS}/{name}-g1-convert")
    finish_pod(client, f"{name}-convert-x", {"job-name": f"{name}-g1-convert"}, GATE_OK)
    conversion_done(client, f"{name}-g1-convert")
    wait_for(client, f"{ISVCS}/{service}")
    ready = {
        "conditions": [condition("Ready")],
        "components": {"predictor": {"latestReadyRevision": f"{service}-00001"}},
    }
    patch_status(client, f"{ISVCS}/{service}", ready)
    wait_for(client, f"{RECJOBS}/{name}", phase(name, "Succeeded"))


def start_canary(client: httpx.Client, name: str, service: str, version: int,
                 **rollout) -> None:  # fmt: skip
    """RecJob ``name`` trained and converted to ``version``; KServe shows the canary. It
    reads the operator's default Prometheus unless ``rollout`` names another."""
    rollout = {"steps": [50, 100], "interval": "2s", "failureLimit": 2, "metrics": [ERROR_RATE],
               **rollout}  # fmt: skip
    create_recjob(client, name, serving={"name": service}, rollout=rollout)
    wait_for(client, f"{PYTORCHJOBS}/{name}-g1-train")
    training(client, f"{name}-g1-train", condition("Succeeded"))
    wait_for(client, f"{JOBS}/{name}-g1-convert")
    gate = dict(GATE_OK, published_version=version)
    finish_pod(client, f"{name}-convert-x", {"job-name": f"{name}-g1-convert"}, gate)
    conversion_done(client, f"{name}-g1-convert")
    canary = wait_for(client, f"{ISVCS}/{service}", lambda o: o["spec"]["predictor"].get(
        "canaryTrafficPercent") == 50)  # fmt: skip
    # KServe's status of a Serverless canary whose new revision is ready: the 100% revision
    # stays latestRolledoutRevision (as in KServe's own controller tests)
    traffic = {
        "latestCreatedRevision": f"{service}-predictor-0000{version}",
        "latestReadyRevision": f"{service}-predictor-0000{version}",
        "latestRolledoutRevision": f"{service}-predictor-00001",
        "traffic": [
            {"revisionName": f"{service}-predictor-00001", "percent": 50, "latestRevision": False},
            {"revisionName": f"{service}-predictor-0000{version}", "percent": 50,
             "latestRevision": True, "tag": "latest"},
        ],
    }  # fmt: skip
    patch_status(client, f"{ISVCS}/{service}", {
        "observedGeneration": canary["metadata"]["generation"],
        "conditions": [condition("Ready")], "components": {"predictor": traffic}})  # fmt: skip


def test_good_canary_is_promoted(cluster, prometheus) -> None:
    _, client, _ = cluster
    _, exporter, _ = prometheus
    deploy_first(client, "stable", "svc-a")
    exporter.error_share.update({"svc-a-v1": 0.0, "svc-a-v2": 0.0})
    start_canary(client, "better", "svc-a", version=2)
    done = wait_for(client, f"{RECJOBS}/better", phase("better", "Succeeded", "RolledBack"),
                    timeout=60)  # fmt: skip
    assert done["status"]["phase"] == "Succeeded", done["status"]["message"]
    history = done["status"]["rollout"]["history"]
    assert {h["weight"] for h in history} == {50, 100}
    assert history[-1]["verdict"] == "pass" and history[-1]["revision"] == "svc-a-v2"
    assert done["status"]["lineage"]["inferenceServiceRevision"] == "svc-a-predictor-00002"
    isvc = client.get(f"{ISVCS}/svc-a").json()
    assert record(client, "svc-a") == {"stableModelVersion": "2"}  # and released
    # promotion is a traffic change only: the revision template is the canary's, untouched
    assert isvc["spec"]["predictor"].get("canaryTrafficPercent") is None
    assert isvc["spec"]["predictor"]["model"]["storageUri"].endswith("-snapshots/v2")


def test_bad_canary_is_rolled_back_after_the_failure_limit(cluster, prometheus) -> None:
    _, client, operator = cluster
    _, exporter, _ = prometheus
    deploy_first(client, "base", "svc-b")
    exporter.error_share.update({"svc-b-v3": 0.5})
    start_canary(client, "broken", "svc-b", version=3)
    done = wait_for(client, f"{RECJOBS}/broken", phase("broken", "Succeeded", "RolledBack"),
                    timeout=60)  # fmt: skip
    assert done["status"]["phase"] == "RolledBack"
    assert "error-rate = 0.5 (wanted <= 0.05): fail" in done["status"]["message"]
    assert done["status"]["rollout"]["failedChecks"] == 2
    isvc = client.get(f"{ISVCS}/svc-b").json()
    assert record(client, "svc-b") == {"stableModelVersion": "1"}
    # KServe's documented rollback: canaryTrafficPercent 0 sends everything back to the
    # last rolled-out revision; no new revision (a re-pointed storageUri would be one,
    # routed 100% to the failed model until it is ready)
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 0
    assert isvc["spec"]["predictor"]["model"]["storageUri"].endswith("-snapshots/v3")
    exposed = exposed_metrics(
        operator, 'recjob_rollbacks_total{namespace="shop",recjob="broken"} 1.0'
    )
    assert ('recjob_analysis_threshold{bound="max",metric="error-rate",namespace="shop",'
            'recjob="broken"} 0.05') in exposed  # fmt: skip
    assert (
        'recjob_analysis_value{metric="error-rate",namespace="shop",recjob="broken"} 0.5' in exposed
    )


def test_no_data_holds_then_rolls_back_at_the_deadline(cluster, prometheus) -> None:
    _, client, _ = cluster
    _ = prometheus
    deploy_first(client, "quiet-base", "svc-c")
    start_canary(client, "quiet", "svc-c", version=4,
                 noData={"action": "hold", "deadline": "4s"})  # fmt: skip
    done = wait_for(client, f"{RECJOBS}/quiet", phase("quiet", "Succeeded", "RolledBack"),
                    timeout=60)  # fmt: skip
    assert done["status"]["phase"] == "RolledBack"
    assert "no conclusive analysis" in done["status"]["message"]
    assert {h["verdict"] for h in done["status"]["rollout"]["history"]} == {"no-data"}


def test_prometheus_down_mid_analysis_is_counted_apart(cluster, prometheus, tmp_path) -> None:
    from recjob_operator.prometheus import prometheus_command, prometheus_config, wait_ready

    _, client, _ = cluster
    _, exporter, _ = prometheus
    config = tmp_path / "prometheus.yml"  # a Prometheus of its own, to stop mid-analysis
    config.write_text(prometheus_config([f"127.0.0.1:{exporter.port}"], 0.5, {"namespace": NS}))
    port = PROMETHEUS_PORTS["dark"]  # the operator's source "dark"
    own = subprocess.Popen(prometheus_command(config, tmp_path / "data", port),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    time.sleep(3)  # a few scrapes, so the 5s rate windows have data
    deploy_first(client, "dark-base", "svc-d")
    exporter.error_share.update({"svc-d-v5": 0.0})
    start_canary(client, "dark", "svc-d", version=5, analysesPerStep=100, prometheus="dark",
                 noData={"action": "hold", "deadline": "6s"})  # fmt: skip
    wait_for(client, f"{RECJOBS}/dark", lambda o: any(
        h["verdict"] == "pass" for h in ((o.get("status") or {}).get("rollout") or {}).get(
            "history", [])), timeout=60)  # fmt: skip
    own.kill()
    own.wait(10)
    done = wait_for(client, f"{RECJOBS}/dark", phase("dark", "Succeeded", "RolledBack"),
                    timeout=60)  # fmt: skip
    rollout = done["status"]["rollout"]
    assert done["status"]["phase"] == "RolledBack" and rollout["failedChecks"] == 0
    assert rollout["queryErrors"] >= 2
    verdicts = [h["verdict"] for h in rollout["history"]]
    assert verdicts[0] == "pass" and verdicts[-1] == "error" and "fail" not in verdicts
    assert "unreachable" in rollout["history"][-1]["message"]


def test_an_inference_service_the_operator_did_not_create_is_never_modified(cluster) -> None:
    """Someone's own InferenceService of the service's name: the RecJob stops and says
    why; the service is left exactly as it was."""
    _, client, _ = cluster
    theirs = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
              "metadata": {"name": "svc-f", "namespace": NS, "labels": {"team": "search"}},
              "spec": {"predictor": {"model": {"modelFormat": {"name": "sklearn"},
                                               "storageUri": "gs://theirs/model"}}}}  # fmt: skip
    assert client.post(ISVCS, json=theirs).status_code == 201
    before = client.get(f"{ISVCS}/svc-f").json()
    create_recjob(client, "intruder", serving={"name": "svc-f"})
    wait_for(client, f"{PYTORCHJOBS}/intruder-g1-train")
    training(client, "intruder-g1-train", condition("Succeeded"))
    wait_for(client, f"{JOBS}/intruder-g1-convert")
    finish_pod(client, "intruder-convert-x", {"job-name": "intruder-g1-convert"}, GATE_OK)
    conversion_done(client, "intruder-g1-convert")
    refused = wait_for(client, f"{RECJOBS}/intruder", lambda o: any(
        c["type"] == "ChildrenCreated" and c["status"] == "False"
        for c in (o.get("status") or {}).get("conditions", [])))  # fmt: skip
    message = next(c["message"] for c in refused["status"]["conditions"]
                   if c["type"] == "ChildrenCreated")  # fmt: skip
    assert "InferenceService svc-f exists and was not created by the RecJob operator" in message
    after = client.get(f"{ISVCS}/svc-f").json()
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    client.delete(f"{RECJOBS}/intruder")  # it retries with backoff until then
    deadline = time.time() + 30
    while client.get(f"{RECJOBS}/intruder").status_code != 404:
        assert time.time() < deadline, "the finalizer was never released"
        time.sleep(0.1)
    assert (
        client.get(f"{ISVCS}/svc-f").json()["metadata"]["resourceVersion"]
        == (before["metadata"]["resourceVersion"])
    )


def test_status_conflicts_are_retried(cluster) -> None:
    """Another writer keeps changing the RecJob (labels) while the operator writes its
    status with a resourceVersion precondition: the API server answers 409 and the
    operator re-reads, recomputes and writes again; nothing it wrote is lost."""
    env, client, _ = cluster
    since = datetime.now(UTC)
    create_recjob(client, "contested")
    stop = threading.Event()

    def relabel() -> None:
        count = 0
        while not stop.is_set():
            count += 1
            client.patch(f"{RECJOBS}/contested", headers=MERGE,
                         json={"metadata": {"labels": {"touched": str(count)}}})  # fmt: skip

    writer = threading.Thread(target=relabel, daemon=True)
    writer.start()
    try:
        deadline = time.time() + 30
        while not any(r.code == 409 for r in status_writes(env, "contested", since)):
            assert time.time() < deadline, "no status write met a conflict"
            time.sleep(0.2)
    finally:
        stop.set()
        writer.join(10)
    wait_for(client, f"{RECJOBS}/contested", phase("contested", "Training"))
    # a pass may still be retrying a write the last relabels refused; once the writes
    # settle, the last one either landed (200) or met a 409 whose re-read showed the
    # status already stored was the one the pass recomputed (nothing left to write)
    codes, deadline = [], time.time() + 30
    while codes != (codes := [r.code for r in status_writes(env, "contested", since)]):
        assert time.time() < deadline, codes
        time.sleep(3)
    assert 409 in codes and 200 in codes, codes
    recjob = client.get(f"{RECJOBS}/contested").json()
    assert recjob["status"]["phase"] == "Training", recjob["status"]
    assert recjob["status"]["observedGeneration"] == 1
    assert client.get(f"{PYTORCHJOBS}/contested-g1-train").status_code == 200


def status_writes(env: EnvTest, name: str, since: datetime) -> list:
    """The operator's writes of RecJob ``name``'s status since ``since``."""
    return [r for r in operator_requests(env, since=since) if r.resource == "recjobs"
            and r.subresource == "status" and r.name == name]  # fmt: skip


def test_operator_killed_at_each_phase_resumes_without_duplicates(cluster) -> None:
    env, client, operator = cluster

    def restart() -> None:
        operator.kill()
        operator.start()

    create_recjob(client, "phoenix", serving={"name": "svc-p"})
    wait_for(client, f"{PYTORCHJOBS}/phoenix-g1-train")
    restart()  # Training
    training(client, "phoenix-g1-train", condition("Succeeded"))
    wait_for(client, f"{JOBS}/phoenix-g1-convert")
    restart()  # Converting
    finish_pod(client, "phoenix-convert-x", {"job-name": "phoenix-g1-convert"}, GATE_OK)
    conversion_done(client, "phoenix-g1-convert")
    wait_for(client, f"{ISVCS}/svc-p")
    restart()  # RollingOut
    ready = {
        "conditions": [condition("Ready")],
        "components": {"predictor": {"latestReadyRevision": "svc-p-00001"}},
    }
    patch_status(client, f"{ISVCS}/svc-p", ready)
    wait_for(client, f"{RECJOBS}/phoenix", phase("phoenix", "Succeeded"), timeout=60)
    # each child was created once; later attempts (if any) met 409 AlreadyExists
    for resource, name in (("pytorchjobs", "phoenix-g1-train"), ("jobs", "phoenix-g1-convert"),
                           ("configmaps", "phoenix-g1-train-config")):  # fmt: skip
        statuses = [
            r.code for r in operator_requests(env)
            if r.verb == "create" and r.resource == resource and r.name == name
        ]  # fmt: skip
        assert statuses.count(201) == 1 and set(statuses) <= {201, 409}, (resource, statuses)
    for path in (f"{PYTORCHJOBS}/phoenix-g1-train", f"{JOBS}/phoenix-g1-convert", f"{ISVCS}/svc-p"):
        assert client.get(path).status_code == 200
    events = [e["reason"] for e in client.get(f"/api/v1/namespaces/{NS}/events").json()["items"]
              if e["involvedObject"]["name"] == "phoenix"]  # fmt: skip
    assert events.count("TrainingCreated") == 1 and events.count("ConversionCreated") == 1


def test_recjob_deleted_mid_rollout_rolls_back_and_goes(cluster, prometheus) -> None:
    _, client, _ = cluster
    _, exporter, _ = prometheus
    deploy_first(client, "keep", "svc-e")
    exporter.error_share.update({"svc-e-v6": 0.0})
    start_canary(client, "doomed", "svc-e", version=6, analysesPerStep=100,
                 noData={"action": "hold", "deadline": "10m"})  # fmt: skip
    wait_for(client, f"{RECJOBS}/doomed", lambda o: (o.get("status") or {}).get(
        "rollout", {}).get("canaryWeight") == 50)  # fmt: skip
    client.delete(f"{RECJOBS}/doomed")
    deadline = time.time() + 30
    while client.get(f"{RECJOBS}/doomed").status_code != 404:
        assert time.time() < deadline, "the finalizer was never released"
        time.sleep(0.1)
    isvc = client.get(f"{ISVCS}/svc-e").json()
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 0
    assert record(client, "svc-e") == {"stableModelVersion": "1"}  # released


def test_children_are_read_from_watches_not_polled(cluster) -> None:
    env, client, operator = cluster
    create_recjob(client, "cached")
    wait_for(client, f"{RECJOBS}/cached", phase("cached", "Training"))
    training(client, "cached-g1-train", condition("Created"), condition("Running"))
    wait_for(client, f"{RECJOBS}/cached", lambda o: o["status"]["training"]["state"] == "Running")
    since, passes = datetime.now(UTC), reconcile_passes(operator)
    time.sleep(3)  # ~10 looks at the RecJob if it polled (RECJOB_MAX_SLEEP_SECONDS=0.3)
    reads = [(r.verb, r.resource) for r in operator_requests(env, since=since)
             if r.verb in ("get", "list")]  # fmt: skip
    # only the leader's Lease renewals (every 0.5 s here, 2 s by default): none per RecJob
    assert {read for read in reads if read[1] != "leases"} == set(), reads
    # nor is it looked at while its PyTorchJob does not change (it waits for a change)
    assert reconcile_passes(operator) == passes
    training(client, "cached-g1-train", condition("Failed", "evicted"))
    # the PyTorchJob's change wakes it (RECJOB_RESYNC_SECONDS=300: no look before that)
    wait_for(client, f"{RECJOBS}/cached", phase("cached", "Failed"), timeout=30)
    exposed = httpx.get(f"http://127.0.0.1:{operator.metrics_port}/metrics").text
    assert 'recjob_api_requests_total{code="201",resource="pytorchjobs",verb="create"}' in exposed
    assert "recjob_leader 1.0" in exposed


def test_standby_replica_takes_over_when_the_leader_dies(cluster, tmp_path) -> None:
    _, client, operator = cluster
    standby = Operator(operator.kubeconfig, tmp_path / "standby.log", "recjob-operator-1")
    standby.start()
    try:
        assert standby.wait_health(lambda h: True)["leader"] is False
        assert operator.wait_health(lambda h: True)["leader"] is True
        create_recjob(client, "failover")
        wait_for(client, f"{RECJOBS}/failover", phase("failover", "Training"))
        operator.kill()
        standby.wait_health(lambda h: h["leader"], timeout=15)  # within the lease (3 s)
        training(client, "failover-g1-train", condition("Failed", "node lost"))
        failed = wait_for(client, f"{RECJOBS}/failover", phase("failover", "Failed"))
        assert "node lost" in failed["status"]["message"]
        lease = client.get(f"/apis/coordination.k8s.io/v1/namespaces/{OPERATOR_NS}/leases/"
                           "recjob-operator").json()  # fmt: skip
        assert lease["spec"]["holderIdentity"] == "recjob-operator-1"
        operator.start()  # back, as the standby now
        assert operator.wait_health(lambda h: True)["leader"] is False
    finally:
        standby.stop()  # SIGTERM: it releases the Lease on its way out
    operator.wait_health(lambda h: h["leader"], timeout=10)


def test_operator_survives_absent_crds_and_reports_refused_creates(tmp_path) -> None:
    """Kubeflow and KServe not installed: the operator runs, the refused create is in the
    RecJob's status and events; once Kubeflow's CRD is installed, the RecJob proceeds."""
    env, kubeconfig = start_env(tmp_path, [RECJOB_CRD])
    operator = Operator(kubeconfig, tmp_path / "operator.log")
    operator.start()
    try:
        with env.http() as client:
            create_recjob(client, "early")
            refused = wait_for(client, f"{RECJOBS}/early", lambda o: any(
                c["type"] == "ChildrenCreated" and c["status"] == "False"
                for c in (o.get("status") or {}).get("conditions", [])))  # fmt: skip
            (condition_,) = [c for c in refused["status"]["conditions"]
                             if c["type"] == "ChildrenCreated"]  # fmt: skip
            assert condition_["reason"] == "CreateFailed"
            assert "create PyTorchJob early-g1-train: 404" in condition_["message"]
            events = wait_for(client, f"/api/v1/namespaces/{NS}/events",
                              lambda o: o["items"])["items"]  # fmt: skip
            assert [e["reason"] for e in events if e["type"] == "Warning"] == ["CreateFailed"]
            assert operator.health()["healthy"] is True
            env.install_crds(PYTORCHJOB_CRD)  # Kubeflow installed (not watched: read via the API)
            done = wait_for(client, f"{RECJOBS}/early", lambda o: any(
                c["type"] == "ChildrenCreated" and c["status"] == "True"
                for c in o["status"]["conditions"]), timeout=60)  # fmt: skip
            assert done["status"]["phase"] == "Training"
            assert client.get(f"{PYTORCHJOBS}/early-g1-train").status_code == 200
    finally:
        operator.stop()
        env.stop()


def test_every_request_is_allowed_by_the_shipped_rbac(cluster) -> None:
    """Runs last: the real RBAC authorizer judged every request the scenarios above made
    (the operator runs as the namespaced overlay's ServiceAccount): none was refused, and
    every rule of the overlay was needed by some request (run the whole module)."""
    from tests.cluster.audit import used_permissions
    from tests.operator.rbac import grants
    from tests.operator.test_manifests import build

    env, _, _ = cluster
    requests = operator_requests(env)
    assert requests, "no request was made with the operator's ServiceAccount"
    denied = sorted({r.describe() for r in requests if r.denied})
    assert not denied, f"requests the shipped RBAC does not allow: {denied}"
    used = used_permissions(requests)
    # checked by the API server's admission (blockOwnerDeletion), never requested
    never_requested = {("recjob.dev", "recjobs/finalizers", "update")}
    # RawDeployment/Standard serving (HTTPRoutes; per-version InferenceServices deleted at
    # promotion and rollback) runs on the real cluster with real KServe instead
    # (tests/cluster/test_serving.py; tests/cluster/test_zz_rbac.py checks those rules)
    never_requested |= {("gateway.networking.k8s.io", "httproutes", v)
                        for v in ("list", "watch", "create", "patch")}  # fmt: skip
    never_requested.add(("serving.kserve.io", "inferenceservices", "delete"))
    # a federation's objects are created on the real cluster (tests/cluster/test_federated.py;
    # test_zz_rbac.py checks them); their deletecollection is used here by every cleanup
    never_requested |= {("", "services", "create"), ("", "secrets", "create"),
                        ("apps", "deployments", "create"),
                        ("networking.k8s.io", "networkpolicies", "create")}  # fmt: skip
    unused = []
    for grant in grants(build("overlays/namespaced")):
        rule = grant.rule
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                for verb in rule["verbs"]:
                    if (group, res, verb) in never_requested:
                        continue
                    if not any(grant.namespace is None or e.namespace == grant.namespace
                               for e in used.get((group, res, verb), [])):  # fmt: skip
                        unused.append((grant.namespace, group, res, verb))
    assert not unused, f"rules no request needed: {unused}"
