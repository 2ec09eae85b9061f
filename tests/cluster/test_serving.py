"""Serving on the real cluster through the real KServe controller (RawDeployment mode):
a first model to 100%, a good canary promoted and a bad canary rolled back, with real
model-server pods answering the replay driver (the storefront) through the test cluster's
Gateway API data plane, analysis read from a real Prometheus that found the pods through
the API server, and one service shared by RecJobs that come and go.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter

import pytest
import yaml

from recjob_operator.api.v1alpha1.promql import render_query
from recjob_operator.api.v1alpha1.spec_delivery import RolloutSpec
from recjob_operator.controller.analysis import query_values
from tests.cluster.conftest import REPO, Cluster
from tests.cluster.recjobs import (
    AMAZON,
    GATEWAY,
    SERVICE,
    open_claim,
    put_dataset,
    serving_recjob,
    storage,
)


def _cluster_module(name: str) -> types.ModuleType:
    """hack/cluster/<name>.py, loaded by path under its own name: hack/cluster on sys.path
    would shadow real packages for every test collected after this one (its kserve.py hid
    KServe from tests/fuzz in CI)."""
    spec = importlib.util.spec_from_file_location(
        f"recjob_test_cluster_{name}", REPO / "hack" / "cluster" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gateway = _cluster_module("gateway")
prometheus = _cluster_module("prometheus")

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.skipif(not AMAZON.exists(), reason="../shared/data not present"),
]


def _status(cluster: Cluster, name: str, namespace: str) -> dict:
    return (cluster.get("recjob", name, namespace) or {}).get("status") or {}


def _diagnose(cluster: Cluster, namespace: str) -> str:
    return "\n".join([
        cluster.kubectl("get", "recjobs,inferenceservices,httproutes,deployments,pods,configmaps",
                        "-n", namespace, "-o", "wide", check=False).stdout,
        cluster.kubectl("get", "recjobs", "-n", namespace, "-o", "yaml",
                        check=False).stdout[-6000:],
        cluster.kubectl("get", "inferenceservices,httproutes", "-n", namespace, "-o", "yaml",
                        check=False).stdout[-6000:],
        cluster.pod_logs(namespace, "app.kubernetes.io/component=serving"),
        cluster.pod_logs("recjob-system", "app.kubernetes.io/name=recjob-operator")[-6000:],
    ])  # fmt: skip


def _phase(cluster: Cluster, name: str, namespace: str, *phases: str, timeout: float = 600):
    return cluster.wait(
        f"RecJob {name} in {phases}",
        lambda: (s := _status(cluster, name, namespace)).get("phase") in phases and s,
        timeout=timeout, on_timeout=lambda: _diagnose(cluster, namespace),
    )  # fmt: skip


def _get(url: str, host: str, body: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(url, data=body, headers={"Host": host, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()  # case-insensitive
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def _served_revisions(host: str, count: int = 20) -> Counter:
    """Which revisions answer ``count`` inference requests through the Gateway."""
    body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 1],
                                   "data": ["a microscope", "a lab coat"]}]}).encode()  # fmt: skip
    seen: Counter = Counter()
    for _ in range(count):
        code, headers, _ = _get(f"{gateway.GATEWAY_URL}/v2/models/{SERVICE}-text/infer", host,
                                body, {"Content-Type": "application/json"})  # fmt: skip
        seen[(code, headers.get("x-recjob-revision"))] += 1
    return seen


def _shipped_queries() -> list[tuple[str, str]]:
    """(where, query) of the API's default checks and of every example's checks."""
    out = [(f"default {m.name}", m.query) for m in RolloutSpec().metrics]
    for path in sorted((REPO / "examples").glob("recjob-*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            rollout = ((document or {}).get("spec") or {}).get("rollout") or {}
            out += [(f"{path.name} {m['name']}", m["query"]) for m in rollout.get("metrics", [])]
    return out


def _query(promql: str) -> list:
    url = f"{prometheus.URL}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())["data"]["result"]


@pytest.mark.timeout(1800)
def test_first_model_then_a_promoted_and_a_rolled_back_canary(operator: Cluster, namespace):
    cluster = operator
    assert GATEWAY == (gateway.GATEWAY_NAMESPACE, gateway.GATEWAY_NAME)
    # the operator reads the Prometheus its manifests name (a RecJob names no URL): the
    # test cluster's, through a Service of that name (hack/cluster/prometheus.py)
    manager = cluster.get("deployment", "recjob-operator", "recjob-system")
    container = manager["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RECJOB_PROMETHEUS_URL"] == "http://prometheus-operated.monitoring.svc:9090"
    assert cluster.get("service", "prometheus-operated", "monitoring") is not None
    cluster.kubectl("apply", "--server-side", "-k", str(REPO / "manifests" / "serving"))
    cluster.apply(*storage(namespace))
    put_dataset(cluster.claim_path(namespace, "data"))
    open_claim(cluster.claim_path(namespace, "artifacts"))
    host = f"{SERVICE}-{namespace}.example.com"

    # 1. the first model: straight to 100% through KServe's Deployment and Service. The
    #    next RecJob trains meanwhile (once the first holds the service: it then waits)
    cluster.apply(serving_recjob("first", namespace))
    _phase(cluster, "first", namespace, "RollingOut", "Succeeded", "Failed", "RolledBack")
    good = serving_recjob("better", namespace)
    good["spec"]["rollout"]["manualApproval"] = True
    cluster.apply(good)
    first = _phase(cluster, "first", namespace, "Succeeded", "Failed", "RolledBack")
    assert first["phase"] == "Succeeded", first.get("message")
    v1 = first["lineage"]["modelVersion"]
    isvc = cluster.get("inferenceservice", f"{SERVICE}-v{v1}", namespace)
    assert {c["type"]: c["status"] for c in isvc["status"]["conditions"]}["Ready"] == "True"
    assert "ownerReferences" not in isvc["metadata"]  # outlives the RecJob
    deployment = cluster.get("deployment", f"{SERVICE}-v{v1}-predictor", namespace)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]  # KServe kept ours: schedulable
    route = cluster.get("httproute", SERVICE, namespace)
    split = route["spec"]["rules"][-1]["backendRefs"]
    assert [(b["name"], b["weight"]) for b in split] == [(f"{SERVICE}-v{v1}-predictor", 100)]
    parents = route["status"]["parents"]
    assert {c["type"]: c["status"] for c in parents[0]["conditions"]}["Accepted"] == "True"
    assert _served_revisions(host, 5) == Counter({(200, f"{SERVICE}-v{v1}"): 5})

    # 2. the storefront: the replay driver through the Gateway, feedback pinned by revision
    uid = cluster.get("recjob", "first", namespace)["metadata"]["uid"][:8]
    data = cluster.claim_path(namespace, "artifacts") / "runs" / "first" / uid / "g1" / "train"
    replay = subprocess.Popen(
        [sys.executable, "-m", "recjob_operator.local.replay", "--router", gateway.GATEWAY_URL,
         "--host", host, "--model", f"{SERVICE}-text", "--data", str(data / "data"),
         "--task", "recommendation", "--rate", "6", "--feedback-path", "/v2/feedback"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # 3. a good canary held before its last step (manual approval) keeps the service;
        #    a second RecJob for the same service waits for it, saying so. The second is
        #    bad: a model version that refuses the storefront's batches (the user and 20
        #    candidates, over its maxBatchSize of 4): its pods answer real traffic with 400
        # (worse trains while better canaries: applied once better holds the service)
        _phase(cluster, "better", namespace, "RollingOut", "Succeeded", "Failed", "RolledBack")
        cluster.wait(
            "better holding the service",
            lambda: (_status(cluster, "better", namespace).get("rollout") or {}).get("state")
            in ("Progressing", "Holding", "AwaitingApproval"),
            timeout=600, on_timeout=lambda: _diagnose(cluster, namespace),
        )  # fmt: skip
        cluster.apply(serving_recjob("worse", namespace, maxBatchSize=4))
        cluster.wait(
            "better awaiting approval at 50%",
            lambda: (_status(cluster, "better", namespace).get("rollout") or {}).get("state")
            == "AwaitingApproval",
            timeout=900, on_timeout=lambda: _diagnose(cluster, namespace),
        )  # fmt: skip
        v2 = _status(cluster, "better", namespace)["rollout"]["canaryModelVersion"]
        split = cluster.get("httproute", SERVICE, namespace)["spec"]["rules"][-1]["backendRefs"]
        assert {(b["name"], b["weight"]) for b in split} == {
            (f"{SERVICE}-v{v1}-predictor", 50), (f"{SERVICE}-v{v2}-predictor", 50)
        }  # fmt: skip
        # every default query of the API and every query of the examples finds data here
        values = query_values(f"{SERVICE}-v{v2}", f"{SERVICE}-v{v1}", namespace, SERVICE, 60)
        for check, query in _shipped_queries():
            found = _query(render_query(query, values))
            number = float(found[0]["value"][1]) if found else float("nan")
            assert number == number, f"{check}: no data in the cluster's Prometheus: {query}"
        seen = _served_revisions(host, 40)
        assert {rev for (_, rev) in seen} == {f"{SERVICE}-v{v1}", f"{SERVICE}-v{v2}"}, seen
        assert all(code == 200 for (code, _) in seen), seen
        waiting = cluster.wait(
            "worse waiting for the service",
            lambda: next((c for c in _status(cluster, "worse", namespace).get("conditions", [])
                          if c["reason"] == "WaitingForService"), None),
            timeout=900, on_timeout=lambda: _diagnose(cluster, namespace),
        )  # fmt: skip
        assert "RecJob better is rolling out to it" in waiting["message"]
        assert _status(cluster, "worse", namespace)["phase"] == "RollingOut"
        cluster.kubectl("annotate", "-n", namespace, "recjob/better",
                        "recjob.dev/approve-generation=1")  # fmt: skip
        better = _phase(cluster, "better", namespace, "Succeeded", "RolledBack", "Failed")
        assert better["phase"] == "Succeeded", better.get("message")
        assert better["lineage"]["modelVersion"] == v2
        passes = [h for h in better["rollout"]["history"] if h["verdict"] == "pass"]
        assert {h["metric"] for h in passes} == {"error-rate", "live-ndcg"}
        assert all(h["revision"] == f"{SERVICE}-v{v2}" for h in passes)
        cluster.wait("the old stable InferenceService gone", lambda: cluster.get(
            "inferenceservice", f"{SERVICE}-v{v1}", namespace) is None, timeout=120)  # fmt: skip

        # 4. the bad canary: real errors in real metrics, rolled back by the analysis
        worse = _phase(cluster, "worse", namespace, "Succeeded", "RolledBack", "Failed")
        assert worse["phase"] == "RolledBack", worse.get("message")
        assert "error-rate" in worse["message"] and ": fail" in worse["message"]
        v3 = worse["rollout"]["canaryModelVersion"]
        failed = [h for h in worse["rollout"]["history"] if h["verdict"] == "fail"]
        assert failed and failed[0]["revision"] == f"{SERVICE}-v{v3}" and failed[0]["value"] > 0.05
        # Prometheus found the canary's pod and its errors through the API server
        # (over a range: the rolled-back pod is gone, its series are marked stale)
        errors = _query(f'sum(max_over_time(recjob_inference_errors_total{{revision='
                        f'"{SERVICE}-v{v3}",namespace="{namespace}"}}[30m]))')  # fmt: skip
        assert errors and float(errors[0]["value"][1]) > 0
    finally:
        replay.terminate()
        output = replay.communicate(timeout=30)[0]
    assert '"ok"' in output, output[-2000:]

    # 5. after the rollback: the stable model serves 100%, no pod of the failed one is left
    route = cluster.get("httproute", SERVICE, namespace)
    split = route["spec"]["rules"][-1]["backendRefs"]
    assert [(b["name"], b["weight"]) for b in split] == [(f"{SERVICE}-v{v2}-predictor", 100)]
    cluster.wait("the failed model's pods gone", lambda: not [
        p for p in cluster.get("pods", namespace=namespace)["items"]
        if p["metadata"].get("labels", {}).get("recjob.dev/revision") == f"{SERVICE}-v{v3}"
    ], timeout=120, on_timeout=lambda: _diagnose(cluster, namespace))  # fmt: skip
    assert cluster.get("inferenceservice", f"{SERVICE}-v{v3}", namespace) is None
    assert _served_revisions(host, 20) == Counter({(200, f"{SERVICE}-v{v2}"): 20})

    # 6. the service outlives the RecJobs that rolled out to it (GitOps pruning old runs)
    for name in ("first", "better", "worse"):
        cluster.kubectl("delete", "recjob", name, "-n", namespace, "--wait=true",
                        "--timeout=120s")  # fmt: skip
    time.sleep(5)  # the garbage collector had its chance
    assert cluster.get("inferenceservice", f"{SERVICE}-v{v2}", namespace) is not None
    assert _served_revisions(host, 5) == Counter({(200, f"{SERVICE}-v{v2}"): 5})
    record = cluster.get("configmap", f"{SERVICE}-recjob", namespace)
    assert record["data"] == {"stableModelVersion": str(v2)}  # released by everyone
