"""The API server's own CPU for each write a new RecJob costs (issue 12's floor).

    .venv/bin/python bench/api_write_costs.py [--count 2000]   # about 4 min

bench/operator_scale.py times N RecJobs until every PyTorchJob exists; on the 2-core test
machine its cores are full all along, the API server taking most. This bench asks what
the API server needs with no operator logic at all. On the test cluster (hack/cluster),
with the in-cluster operator and the Training Operator at zero as in operator_scale.py
(no pods run), it creates N RecJobs, then one kind at a time, from 8 threads and with
nothing else running, the writes the operator's first pass makes for each of them: the
core's decision for a new RecJob (``controller.reconcile`` with nothing observed), its
children built by ``KubeBackend.child_objects`` (the trainer ConfigMap, the PyTorchJob),
its event and status written by ``KubeBackend`` with the operator's ServiceAccount token
(so the real authorizer runs as for the operator). Everything sent is built before its
phase's clock starts.

Per kind: wall seconds and the CPU each cluster component used, per write. Then the
floor of operator_scale.py's target: the seconds the cluster's components alone need, on
this machine's cores, for 2,000 RecJobs' creates plus the operator's writes (as if the
operator cost no CPU), and the same with only the writes no operator can skip (the
PyTorchJob and one status write); each also with the CPU of the clients sending those
writes (the bench's process: the user's creates, and the operator's writes sent with its
own code and the Python Kubernetes client, from 8 threads as the operator sends them).
The finalizer policy's binding is removed meanwhile (no operator runs to release
finalizers) and applied again after: its cost at admission is not in the RecJob creates
here (bench/operator_scale.py measures with it). Writes results/api_write_costs.json (or
``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from cpu_use import CpuUse
from kubernetes import client
from operator_scale import (
    ADMIN,
    FINALIZER_BINDING,
    FINALIZER_POLICY,
    NAMESPACES,
    REPO,
    api_client,
    busy_tests,
    create_namespaces,
    delete_namespaces,
    kubectl,
    operator_kubeconfig,
    prepare,
    recjob,
    restore,
    wait_finalizer_policy,
)

from recjob_operator.api.validation import validate_document
from recjob_operator.controller.actions import CreateTraining, EmitEvent, Observed
from recjob_operator.controller.reconcile import reconcile
from recjob_operator.kube.backend import KubeBackend
from recjob_operator.kube.cache import KUBEFLOW
from recjob_operator.kube.reconciler import recjob_document

THREADS = 8
#: operator_scale.py's large size: the floor is stated for it
TARGET_SIZE, TARGET_SECONDS = 2000, 60.0
#: the writes any operator must make per RecJob: its training child and one status
INDISPENSABLE = ("create pytorchjobs", "update recjobs/status")


def timed(calls: list[Callable[[], object]]) -> tuple[float, dict[str, float]]:
    """Run ``calls`` from :data:`THREADS` threads: wall seconds, CPU seconds per process."""
    cpu, started = CpuUse(), time.monotonic()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(lambda call: call(), calls))
    return time.monotonic() - started, cpu.seconds()


def per_write(phase: str, count: int, wall: float, cpu: dict[str, float]) -> dict:
    """One phase's record: wall seconds, and per write the milliseconds of CPU of each
    cluster component (the bench's own left out)."""
    cluster = {name: seconds for name, seconds in cpu.items() if name != "bench"}
    return {
        "phase": phase,
        "writes": count,
        "wall_seconds": wall,
        "cpu_ms_per_write": {name: 1000 * s / count for name, s in cluster.items()},
        "cluster_cpu_ms_per_write": 1000 * sum(cluster.values()) / count,
        "bench_cpu_seconds": cpu.get("bench", 0.0),
    }


def floor(phases: list[dict], size: int, cores: int, kinds: tuple[str, ...] | None) -> dict:
    """Seconds the cluster's components alone need for ``size`` RecJobs' creates plus the
    writes of ``kinds`` (all phases when None) on ``cores`` cores (``seconds``), and the
    same with the CPU of the clients that send those writes (``seconds_with_clients``):
    the user's creates and the operator's writes through the Python Kubernetes client, as
    operator_scale.py runs them on the same cores. Both assume every core busy all along."""
    used = [p for p in phases if kinds is None or p["phase"] in ("create recjobs", *kinds)]
    ms = sum(p["cluster_cpu_ms_per_write"] for p in used)
    client_ms = sum(1000 * p["bench_cpu_seconds"] / p["writes"] for p in used)
    return {"phases": [p["phase"] for p in used], "cluster_cpu_ms_per_recjob": ms,
            "seconds": ms * size / 1000 / cores, "client_cpu_ms_per_recjob": client_ms,
            "seconds_with_clients": (ms + client_ms) * size / 1000 / cores}  # fmt: skip


def first_pass(created: dict) -> tuple:
    """The RecJob as the operator reads it from ``created`` (the create's answer) and the
    core's decision for it with nothing observed: (recjob, its ConfigMap and PyTorchJob,
    its events, its status)."""
    recjob_, problems = validate_document(recjob_document(created))
    if recjob_ is None or problems:
        raise RuntimeError(f"bench RecJob invalid: {problems}")
    decision = reconcile(recjob_, Observed(), None, datetime.now(UTC))
    action = next(a for a in decision.actions if isinstance(a, CreateTraining))
    config_map, job = KubeBackend.child_objects(recjob_, action)
    events = [a for a in decision.actions if isinstance(a, EmitEvent)]
    return recjob_, config_map, job, events, decision.status


def run(count: int) -> list[dict]:
    """Create ``count`` RecJobs, then their first pass's writes, one kind at a time."""
    objects = client.CustomObjectsApi(api_client(ADMIN, THREADS))
    kubeconfig = operator_kubeconfig(Path(tempfile.mkdtemp(prefix="api-write-costs-")))
    api = api_client(kubeconfig, THREADS)
    backend, core, custom = KubeBackend(api), client.CoreV1Api(api), client.CustomObjectsApi(api)
    create_namespaces("api-write-costs")
    docs = [recjob(f"w{i:04d}", NAMESPACES[i % len(NAMESPACES)]) for i in range(count)]
    # no operator runs to release finalizers: the policy's binding is removed meanwhile
    kubectl("delete", FINALIZER_BINDING, "--ignore-not-found")
    if wait_finalizer_policy(objects, docs[0], bound=False):
        raise RuntimeError("the API server still adds the finalizer with no binding")
    answers: list[dict] = []

    def create(doc: dict) -> None:
        answers.append(objects.create_namespaced_custom_object(
            "recjob.dev", "v1alpha1", doc["metadata"]["namespace"], "recjobs", doc))  # fmt: skip

    wall, cpu = timed([lambda d=d: create(d) for d in docs])
    phases = [per_write("create recjobs", count, wall, cpu)]
    passes = [first_pass(answer) for answer in answers]
    writes: dict[str, list[Callable[[], object]]] = {
        "create configmaps": [
            lambda r=r, c=c: core.create_namespaced_config_map(r.metadata.namespace, c)
            for r, c, *_ in passes
        ],
        "create pytorchjobs": [
            lambda r=r, j=j: custom.create_namespaced_custom_object(
                *KUBEFLOW[:2], r.metadata.namespace, KUBEFLOW[2], j)
            for r, _, j, *_ in passes
        ],
        "create events": [
            lambda r=r, e=e: backend.emit_event(r, e)
            for r, _, _, events, _ in passes
            for e in events
        ],
        "update recjobs/status": [
            lambda r=r, s=s: backend.write_status(r, s) for r, *_, s in passes
        ],
    }  # fmt: skip
    for phase, calls in writes.items():
        wall, cpu = timed(calls)
        phases.append(per_write(phase, len(calls), wall, cpu))
        print(f"{phase}: {len(calls)} in {wall:.1f} s", flush=True)
    return phases


def table(report: dict) -> None:
    """Per write kind, then the floors against the target."""
    print(f"{'phase':24} {'writes':>6} {'wall s':>7} {'cluster CPU ms/write':>21}  apiserver  etcd")
    for p in report["phases"]:
        ms = p["cpu_ms_per_write"]
        print(f"{p['phase']:24} {p['writes']:6d} {p['wall_seconds']:7.1f} "
              f"{p['cluster_cpu_ms_per_write']:21.1f} {ms.get('kube-apiserver', 0):10.1f} "
              f"{ms.get('etcd', 0):5.1f}")  # fmt: skip
    for name, f in report["floors"].items():
        ratio = f["seconds"] / TARGET_SECONDS
        print(f"floor, {name}: {f['cluster_cpu_ms_per_recjob']:.1f} CPU ms per RecJob -> "
              f"{f['seconds']:.1f} s for {TARGET_SIZE:,} RecJobs on {report['cpus']} cores "
              f"(target {TARGET_SECONDS:.0f} s: ratio {ratio:.2f})")  # fmt: skip
        ratio = f["seconds_with_clients"] / TARGET_SECONDS
        print(f"{'':7}with their clients' {f['client_cpu_ms_per_recjob']:.1f} CPU ms per "
              f"RecJob: {f['seconds_with_clients']:.1f} s (ratio {ratio:.2f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=TARGET_SIZE,
                        help=f"RecJobs (default {TARGET_SIZE}: the cost per write grows with "
                        "the objects stored)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/api_write_costs.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # restore() still runs
    if busy := busy_tests():
        raise SystemExit(f"a cluster test is running ({', '.join(busy[:4])}); try later")
    delete_namespaces()
    saved: dict = {}
    try:
        prepare(saved)
        phases = run(args.count)
        delete_namespaces()
    finally:
        restore(saved)
        kubectl("apply", "-f", str(FINALIZER_POLICY), check=False)
    cores = os.cpu_count() or 1
    report = {
        "recjobs": args.count, "threads": THREADS, "cpus": cores, "phases": phases,
        "floors": {
            "the operator's writes": floor(phases, TARGET_SIZE, cores, None),
            "indispensable writes": floor(phases, TARGET_SIZE, cores, INDISPENSABLE),
        },
        "target": {"recjobs": TARGET_SIZE, "seconds": TARGET_SECONDS},
    }  # fmt: skip
    table(report)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
