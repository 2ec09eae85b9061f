"""Operator scale: 200 RecJobs created at once against the fake API server.

    .venv/bin/python bench/operator_scale.py [--recjobs 200]

Starts the project's fake Kubernetes API server, the real operator (`kopf run`) in a
subprocess, creates N RecJobs as fast as the API takes them, and measures the time until
every PyTorchJob exists (and until every RecJob reports phase Training), the operator's
peak RSS (sampled every 0.2 s with psutil, children included), and the requests it made.
Baseline in the same run: the time the fake API server itself needs to create the N
RecJobs and N PyTorchJobs from one client (what no operator can beat). Writes
bench/results/operator_scale.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from recjob_operator.testing.fakeapi import DEFAULT_RESOURCES, FakeApiServer  # noqa: E402

NS = "shop"
RECJOBS = f"/apis/recjob.dev/v1alpha1/namespaces/{NS}/recjobs"
PYTORCHJOBS = f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"
DOCUMENT = {
    "apiVersion": "recjob.dev/v1alpha1",
    "kind": "RecJob",
    "metadata": {"namespace": NS},
    "spec": {
        "data": {
            "task": "search-ranking",
            "train": "pvc://data/queries.csv",
            "columns": {"query": "q", "itemText": "title", "label": "relevance"},
        }
    },
}


def peak_rss(pid: int, stop: threading.Event, out: dict) -> None:
    """Sample the RSS of ``pid`` and its children until ``stop``."""
    process = psutil.Process(pid)
    peak = 0
    while not stop.is_set():
        try:
            rss = process.memory_info().rss + sum(
                c.memory_info().rss for c in process.children(recursive=True)
            )
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    out["peak_rss_mib"] = peak / 2**20


def baseline(count: int) -> float:
    """Seconds for one client to create ``count`` RecJobs and PyTorchJobs (no operator)."""
    server = FakeApiServer().start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            started = time.perf_counter()
            for i in range(count):
                doc = copy.deepcopy(DOCUMENT)
                doc["metadata"]["name"] = f"r{i:04d}"
                client.post(RECJOBS, json=doc).raise_for_status()
                job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
                       "metadata": {"name": f"r{i:04d}-g1-train"},
                       "spec": {"pytorchReplicaSpecs": {}}}  # fmt: skip
                client.post(PYTORCHJOBS, json=job).raise_for_status()
            return time.perf_counter() - started
    finally:
        server.stop()


def run(count: int, timeout: float) -> dict:
    server = FakeApiServer().start()
    namespaces = next(r for r in DEFAULT_RESOURCES if r.plural == "namespaces")
    server.call(server.store.seed, namespaces, {"metadata": {"name": NS}})
    tmp = Path(tempfile.mkdtemp())
    server.kubeconfig(tmp / "kubeconfig")
    env = {**os.environ, "KUBECONFIG": str(tmp / "kubeconfig"), "RECJOB_METRICS_PORT": "0"}
    operator = subprocess.Popen(
        [str(Path(sys.executable).parent / "kopf"), "run", "--standalone", "--namespace", NS,
         "-m", "recjob_operator.kube.handlers"],
        env=env, stdout=(tmp / "operator.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    stop, memory = threading.Event(), {}
    sampler = threading.Thread(target=peak_rss, args=(operator.pid, stop, memory))
    sampler.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            time.sleep(2.0)  # kopf's startup (~1 s measured) before the burst
            started = time.perf_counter()
            for i in range(count):
                doc = copy.deepcopy(DOCUMENT)
                doc["metadata"]["name"] = f"r{i:04d}"
                client.post(RECJOBS, json=doc).raise_for_status()
            created = time.perf_counter() - started
            all_jobs = all_training = None
            while time.perf_counter() - started < timeout:
                jobs = len(client.get(PYTORCHJOBS).json()["items"])
                if all_jobs is None and jobs >= count:
                    all_jobs = time.perf_counter() - started
                items = client.get(RECJOBS).json()["items"]
                training = sum((o.get("status") or {}).get("phase") == "Training" for o in items)
                if all_training is None and training >= count:
                    all_training = time.perf_counter() - started
                if all_jobs is not None and all_training is not None:
                    break
                time.sleep(0.2)
    finally:
        stop.set()
        sampler.join()
        operator.terminate()
        operator.wait(30)
        log = [r for r in server.store.log if r.client == "operator"]
        server.stop()
    return {
        "recjobs": count,
        "create_burst_seconds": created,
        "seconds_until_every_pytorchjob_exists": all_jobs,
        "seconds_until_every_recjob_is_training": all_training,
        "operator_peak_rss_mib": memory.get("peak_rss_mib"),
        "operator_requests": len(log),
        "operator_requests_per_recjob": len(log) / count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recjobs", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    floor = baseline(args.recjobs)
    result = run(args.recjobs, args.timeout)
    result["baseline_single_client_seconds"] = floor
    if result["seconds_until_every_pytorchjob_exists"]:
        result["ratio_vs_baseline"] = result["seconds_until_every_pytorchjob_exists"] / floor
    out = HERE / "results" / "operator_scale.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
