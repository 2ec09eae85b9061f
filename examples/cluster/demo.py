"""`make cluster-demo`: a RecJob applied with kubectl on the test cluster (make cluster).

    .venv/bin/python examples/cluster/demo.py [--namespace recjob-demo] [--keep]

1. installs RecJob (`kubectl apply -k manifests/default`: CRD, RBAC, the operator as a
   Deployment of two replicas with leader election);
2. makes two PersistentVolumeClaims and puts a slice of Amazon Scientific in one (what a
   data-loading Job would do);
3. `kubectl apply -f` a RecJob that trains on 2 nodes x 2 processes (a real PyTorchJob of
   the Kubeflow Training Operator: DeepSpeed ZeRO over gloo, 4 ranks in 2 pods) and
   converts to ONNX Runtime int8 behind the quality gate (a batch Job);
4. follows it with `kubectl get recjobs -w` until conversion ends, then prints
   `kubectl describe recjob`, the PyTorchJob and the pods.
Serving needs KServe, which this cluster does not run yet: the RecJob then reports the
refused InferenceService create in its ChildrenCreated condition. Exits 1 if training or
conversion fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.cluster.conftest import BIN, STATE, Cluster, deploy_operator  # noqa: E402
from tests.cluster.recjobs import open_claim, put_dataset, recjob, storage  # noqa: E402


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
    document = recjob(name, ns, nodes=2, processes=2, maxSteps=6)
    document["spec"]["export"]["target"] = "onnxruntime-int8"
    manifest = STATE / "demo-recjob.yaml"
    manifest.write_text(yaml.safe_dump(document, sort_keys=False))
    print(f"$ kubectl apply -f {manifest}")
    print(cluster.kubectl("apply", "-f", str(manifest)).stdout.strip())
    print(f"$ kubectl get recjobs -n {ns} -w")
    watch = subprocess.Popen([*kubectl, "get", "recjobs", "-n", ns, "-w"], text=True)
    started, state = time.monotonic(), None
    try:
        while time.monotonic() - started < 1800:
            status = (cluster.get("recjob", name, ns) or {}).get("status") or {}
            state = (status.get("conversion") or {}).get("state")
            if state in ("Succeeded", "Failed") or status.get("phase") == "Failed":
                break
            time.sleep(3)
    finally:
        time.sleep(2)
        watch.terminate()
    print(f"\n$ kubectl describe recjob {name} -n {ns}")
    print(cluster.describe("recjob", name, ns))
    print(f"$ kubectl get pytorchjobs,jobs,pods -n {ns}")
    print(cluster.kubectl("get", "pytorchjobs,jobs,pods", "-n", ns).stdout)
    status = cluster.get("recjob", name, ns)["status"]
    print(json.dumps({"training": status.get("training"), "conversion": status.get("conversion")},
                     indent=2)[:3000])  # fmt: skip
    print(f"done in {time.monotonic() - started:.0f} s")
    if not args.keep:
        cluster.kubectl("delete", "namespace", ns, "--wait=false")
    return 0 if state == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
