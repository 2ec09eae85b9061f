"""`make cluster-demo`: a RecJob applied with kubectl on the test cluster (make cluster).

    .venv/bin/python examples/cluster/demo.py [--namespace recjob-demo] [--keep]

1. installs RecJob (`kubectl apply -k manifests/default`: CRD, RBAC, the operator as a
   Deployment of two replicas with leader election);
2. makes two PersistentVolumeClaims and puts a slice of Amazon Scientific in one (what a
   data-loading Job would do);
3. `kubectl apply -f` a RecJob that trains on 2 nodes x 2 processes (a real PyTorchJob of
   the Kubeflow Training Operator: DeepSpeed ZeRO over gloo, 4 ranks in 2 pods) and
   converts to ONNX Runtime int8 behind the quality gate (a batch Job);
4. follows it with `kubectl get recjobs -w` until it serves: the first model of the
   service goes to 100% through the real KServe controller (RawDeployment: a Deployment
   and Service per model version, behind a Gateway API HTTPRoute);
5. starts the storefront (the replay driver through the test cluster's Gateway, feedback
   pinned to the revision that served) and applies a second RecJob for the same service:
   a canary at 50% then 100%, analysed from the real Prometheus that found the pods, and
   promoted; `kubectl get recjobs,inferenceservices,httproutes` is shown at each step.
Exits 1 unless both RecJobs succeed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.cluster.conftest import BIN, STATE, Cluster, deploy_operator  # noqa: E402
from tests.cluster.recjobs import (  # noqa: E402
    GATEWAY,
    SERVICE,
    open_claim,
    put_dataset,
    serving_recjob,
    storage,
)

GATEWAY_URL = "http://10.244.0.1:8081"


def follow(cluster: Cluster, ns: str, name: str, timeout: float = 1800) -> dict:
    """Wait until RecJob ``name`` ends; show the serving objects whenever its rollout moves."""
    started, last = time.monotonic(), None
    while time.monotonic() - started < timeout:
        status = (cluster.get("recjob", name, ns) or {}).get("status") or {}
        rollout = status.get("rollout") or {}
        moment = (status.get("phase"), rollout.get("canaryWeight"), rollout.get("state"))
        if moment != last and status.get("phase") == "RollingOut":
            last = moment
            print(f"$ kubectl get recjobs,inferenceservices,httproutes -n {ns}")
            print(cluster.kubectl("get", "recjobs,inferenceservices,httproutes", "-n", ns,
                                  check=False).stdout)  # fmt: skip
        if status.get("phase") in ("Succeeded", "Failed", "RolledBack"):
            return status
        time.sleep(3)
    return (cluster.get("recjob", name, ns) or {}).get("status") or {}


def main() -> int:
    """Run the demo."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--namespace", default="recjob-demo")
    parser.add_argument("--keep", action="store_true", help="keep the namespace afterwards")
    args = parser.parse_args()
    cluster, ns, name = Cluster(STATE / "kubeconfig"), args.namespace, "demo-two-by-two"
    kubectl = [str(BIN / "kubectl"), f"--kubeconfig={cluster.kubeconfig}"]
    print(f"$ export KUBECONFIG={cluster.kubeconfig}")
    print("$ kubectl apply -k manifests/default")
    deploy_operator(cluster)
    cluster.kubectl("delete", "namespace", ns, "--ignore-not-found", "--wait=true", timeout=300)
    cluster.kubectl("create", "namespace", ns)
    cluster.apply(*storage(ns))
    put_dataset(cluster.claim_path(ns, "data"))
    open_claim(cluster.claim_path(ns, "artifacts"))
    cluster.kubectl("apply", "--server-side", "-k", str(REPO / "manifests" / "serving"))
    print("$ kubectl apply -k manifests/serving   # the recjob-oip / recjob-triton runtimes")
    document = serving_recjob(name, ns)
    document["spec"]["training"].update({"nodes": 2, "processesPerNode": 2, "maxSteps": 6})
    document["spec"]["export"]["target"] = "onnxruntime-int8"
    manifest = STATE / "demo-recjob.yaml"
    manifest.write_text(yaml.safe_dump(document, sort_keys=False))
    print(f"$ kubectl apply -f {manifest}")
    print(cluster.kubectl("apply", "-f", str(manifest)).stdout.strip())
    print(f"$ kubectl get recjobs -n {ns} -w")
    watch = subprocess.Popen([*kubectl, "get", "recjobs", "-n", ns, "-w"], text=True)
    started = time.monotonic()
    try:
        first = follow(cluster, ns, name)
    finally:
        time.sleep(2)
        watch.terminate()
    print(f"\n$ kubectl describe recjob {name} -n {ns}")
    print(cluster.describe("recjob", name, ns))
    print(f"$ kubectl get pytorchjobs,jobs,pods -n {ns}")
    print(cluster.kubectl("get", "pytorchjobs,jobs,pods", "-n", ns).stdout)
    if first.get("phase") != "Succeeded":
        print(f"first RecJob: {first.get('phase')}: {first.get('message')}")
        return 1
    uid = cluster.get("recjob", name, ns)["metadata"]["uid"][:8]
    data = cluster.claim_path(ns, "artifacts") / "runs" / name / uid / "g1" / "train" / "data"
    host = f"{SERVICE}-{ns}.example.com"
    print(f"storefront: replay driver -> {GATEWAY_URL} (Host: {host}; Gateway {GATEWAY})")
    replay = subprocess.Popen(
        [sys.executable, "-m", "recjob_operator.local.replay", "--router", GATEWAY_URL,
         "--host", host, "--model", f"{SERVICE}-text", "--data", str(data), "--task",
         "recommendation", "--rate", "6", "--feedback-path", "/v2/feedback"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        canary = serving_recjob("demo-canary", ns)
        # trained as the first model was (a 1x1, 6-step model ranked worse: live NDCG@5 0.045
        # against the stable's 0.27, and the analysis rolled it back)
        canary["spec"]["training"].update({"nodes": 2, "processesPerNode": 2, "maxSteps": 6})
        print("$ kubectl apply -f - <<< demo-canary (same service: a canary)")
        cluster.apply(canary)
        second = follow(cluster, ns, "demo-canary")
    finally:
        replay.terminate()
    print(f"$ kubectl get recjobs,inferenceservices,httproutes -n {ns}")
    print(cluster.kubectl("get", "recjobs,inferenceservices,httproutes", "-n", ns).stdout)
    for record in (second.get("rollout") or {}).get("history", []):
        print(f"  {record['time']} step {record['step']} {record['weight']}%: {record['message']}")
    print(f"done in {time.monotonic() - started:.0f} s: {second.get('message')}")
    if not args.keep:
        cluster.kubectl("delete", "namespace", ns, "--wait=false")
    return 0 if second.get("phase") == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
