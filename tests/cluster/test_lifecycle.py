"""A RecJob's life on the real cluster, beyond the happy path (test_training.py): what
tests/operator/test_kopf_integration.py plays against a real API server with no
controllers (envtest), here with the real Training Operator, Job controller, garbage collector,
quota admission and the operator's two replicas (leader election on a real Lease).

Small on purpose (CI has 2 cores): 1 node x 1 process; runs that are to be interrupted
train "forever" and are never waited for; the failing trainer fails at its start.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid

import pytest

from tests.cluster import audit
from tests.cluster.conftest import OPERATOR_NS, Cluster
from tests.cluster.recjobs import (
    AMAZON,
    open_claim,
    put_dataset,
    recjob,
    serving_recjob,
    storage,
)

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.skipif(not AMAZON.exists(), reason="../shared/data not present"),
]

LABEL = "recjob.dev/recjob"
#: training that outlives every check made on it (interrupted, never awaited)
ENDLESS = {"maxSteps": 100000, "evalIntervalSteps": 10000, "checkpoint": {"intervalSteps": 10000}}


# --------------------------------------------------------------------------- helpers
def operator_creates(cluster: Cluster, namespace: str) -> dict[tuple[str, str], list[int]]:
    """The creates of children the operator's ServiceAccount sent to the API server in
    ``namespace``: (resource, name) -> response codes, from the API server's audit log."""
    if not audit.AUDIT_LOG.exists():
        pytest.fail(f"no audit log at {audit.AUDIT_LOG} (see hack/cluster/cluster.py)")
    marker = f"lifecycle-{uuid.uuid4().hex}"  # everything up to now is in the log once it is
    cluster.kubectl("get", "--raw", f"/api?{marker}=1")
    cluster.wait("the audit log written", lambda: audit.read_events(
        where=lambda e: marker in e.request_uri), timeout=30, interval=0.5)  # fmt: skip
    out: dict[tuple[str, str], list[int]] = {}
    for event in audit.read_events(
        user=f"system:serviceaccount:{OPERATOR_NS}:recjob-operator",
        where=lambda e: e.verb == "create" and e.namespace == namespace and e.name is not None,
    ):
        if event.resource != "events":
            out.setdefault((event.resource or "", event.name or ""), []).append(event.code or 0)
    return out


def diagnose(cluster: Cluster, namespace: str, name: str) -> str:
    """What to print when a wait times out."""
    return "\n".join([
        cluster.describe("recjob", name, namespace),
        cluster.kubectl("get", "pytorchjobs,jobs,pods,configmaps,resourcequotas", "-n", namespace,
                        "-o", "wide", check=False).stdout,
        cluster.pod_logs(namespace, f"{LABEL}={name}"),
        cluster.kubectl("-n", OPERATOR_NS, "logs", "-l", "app.kubernetes.io/name=recjob-operator",
                        "--tail=40", "--prefix", check=False).stdout,
    ])  # fmt: skip


def status(cluster: Cluster, namespace: str, name: str) -> dict:
    """The RecJob's status ({} before the operator wrote one, or once it is gone)."""
    return (cluster.get("recjob", name, namespace) or {}).get("status") or {}


def condition(status_: dict, kind: str) -> dict:
    """The status condition of type ``kind`` ({} if absent)."""
    return next((c for c in status_.get("conditions") or [] if c["type"] == kind), {})


def children(cluster: Cluster, kind: str, namespace: str, name: str) -> list[dict]:
    """The objects of ``kind`` labelled as the RecJob's children (pods included)."""
    out = cluster.kubectl("get", kind, "-n", namespace, "-l", f"{LABEL}={name}", "-o", "json")
    return json.loads(out.stdout)["items"]


def names(objects: list[dict]) -> list[str]:
    return sorted(o["metadata"]["name"] for o in objects)


def events(cluster: Cluster, namespace: str, name: str) -> list[dict]:
    """The Events on the RecJob, oldest first."""
    items = (cluster.get("events", namespace=namespace) or {"items": []})["items"]
    mine = [e for e in items if e["involvedObject"].get("kind") == "RecJob"
            and e["involvedObject"]["name"] == name]  # fmt: skip
    return sorted(mine, key=lambda e: int(e["metadata"]["resourceVersion"]))


def reasons(cluster: Cluster, namespace: str, name: str) -> list[str]:
    return [e["reason"] for e in events(cluster, namespace, name)]


def running_pod(cluster: Cluster, namespace: str, name: str, component: str) -> dict | None:
    """A Running pod of the RecJob's training or conversion (None while there is none)."""
    for pod in children(cluster, "pods", namespace, name):
        labels = pod["metadata"]["labels"]
        if labels.get("app.kubernetes.io/component") == component and (
            pod["status"].get("phase") == "Running"
        ):
            return pod
    return None


def prepare(cluster: Cluster, namespace: str) -> None:
    """The data and artifacts claims, the data in place."""
    cluster.apply(*storage(namespace))
    put_dataset(cluster.claim_path(namespace, "data"))
    open_claim(cluster.claim_path(namespace, "artifacts"))


def edit(cluster: Cluster, namespace: str, name: str, patch: dict) -> None:
    """kubectl patch --type=merge of the RecJob."""
    cluster.kubectl("-n", namespace, "patch", "recjob", name, "--type=merge",
                    "-p", json.dumps(patch))  # fmt: skip


def leader(cluster: Cluster) -> str:
    """The operator replica holding the Lease."""
    lease = cluster.get("lease", "recjob-operator", OPERATOR_NS)
    assert lease is not None, "no operator Lease: is the operator deployed?"
    return lease["spec"].get("holderIdentity") or ""


def kill_leader(cluster: Cluster) -> tuple[str, str]:
    """Force-delete the leader's pod (``--grace-period=0 --force``: its process is stopped
    at once, and the Deployment starts a new pod) and wait until another replica holds the
    Lease: at once if the dying process still released it, else once the lease duration
    (15 s) has passed without renewal. (killed, new leader)"""
    killed = cluster.wait("an operator leader", lambda: leader(cluster), timeout=60)
    pod = cluster.get("pod", killed, OPERATOR_NS)
    assert pod is not None and pod["status"].get("phase") == "Running", f"leader {killed}: {pod}"
    cluster.kubectl("-n", OPERATOR_NS, "delete", "pod", killed, "--grace-period=0", "--force")
    started = time.monotonic()
    successor = cluster.wait(
        f"a replica other than {killed} to take the Lease",
        lambda: (holder := leader(cluster)) not in ("", killed) and holder,
        timeout=90,
        on_timeout=lambda: cluster.kubectl(
            "-n", OPERATOR_NS, "get", "pods,leases", "-o", "wide", check=False
        ).stdout,
    )  # fmt: skip
    taken = time.monotonic() - started
    print(f"killed leader {killed}; {successor} took the Lease after {taken:.1f} s")
    assert taken < 40, f"the Lease was taken over after {taken:.0f} s (lease duration 15 s)"
    # one leader: the replicas' /healthz agree with the Lease
    answers = cluster.wait(
        f"{successor} to say it leads",
        lambda: (h := healthz(cluster)).get(successor, {}).get("leader") and h, timeout=30,
    )  # fmt: skip
    assert [i for i, answer in answers.items() if answer["leader"]] == [successor], answers
    return killed, successor


def healthz(cluster: Cluster) -> dict[str, dict]:
    """The /healthz answers of the running operator replicas, by pod name."""
    pods = (cluster.get("pods", namespace=OPERATOR_NS) or {"items": []})["items"]
    out = {}
    for pod in pods:
        ip = pod["status"].get("podIP")
        if (
            pod["status"].get("phase") != "Running"
            or not ip
            or pod["metadata"].get("deletionTimestamp")
        ):
            continue
        try:
            with urllib.request.urlopen(f"http://{ip}:8080/healthz", timeout=2) as response:
                out[pod["metadata"]["name"]] = json.loads(response.read())
        except (OSError, ValueError):
            continue  # not serving yet
    return out


# --------------------------------------------------------------------------- scenarios
def test_failed_training_fails_the_recjob_with_its_reason(operator: Cluster, namespace):
    """The trainer exits non-zero at once (its training data is missing from the claim);
    with backoffLimit 0 (maxRestarts) the Training Operator fails the PyTorchJob, and the
    RecJob fails with that message and the trainer's error; nothing is converted."""
    cluster, name = operator, "missing-data"
    cluster.apply(*storage(namespace))
    open_claim(cluster.claim_path(namespace, "data"))  # the claim is there, the file is not
    open_claim(cluster.claim_path(namespace, "artifacts"))
    document = recjob(name, namespace, maxRestarts=0)
    document["spec"]["data"]["train"] = "pvc://data/missing/Scientific.train.inter"
    cluster.apply(document)

    failed = cluster.wait(
        "the RecJob Failed",
        lambda: (s := status(cluster, namespace, name)).get("phase") == "Failed" and s,
        timeout=240, interval=2, on_timeout=lambda: diagnose(cluster, namespace, name),
    )  # fmt: skip
    job_name = f"{name}-g1-train"
    job = cluster.get("pytorchjob", job_name, namespace)
    assert job is not None and job["spec"]["runPolicy"]["backoffLimit"] == 0
    job_failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert job_failed["status"] == "True"
    # the RecJob says which replica failed, in the Training Operator's words, and why, in
    # the trainer's (its master's termination message)
    assert job_failed["message"] and job_failed["message"] in failed["message"], failed["message"]
    assert failed["message"].startswith(f"training {job_name} failed: ")
    assert "; trainer: " in failed["message"], failed["message"]
    assert "data preparation failed" in failed["message"], failed["message"]
    assert "pvc://data/" in failed["message"] and "no such file" in failed["message"]
    assert failed["training"]["state"] == "Failed"
    assert failed["training"]["message"].startswith(job_failed["message"] + "; trainer: ")
    trained = condition(failed, "Trained")
    assert (trained["status"], trained["reason"]) == ("False", "TrainingFailed")
    warnings = [e for e in events(cluster, namespace, name) if e["reason"] == "TrainingFailed"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning"
    assert job_failed["message"] in warnings[0]["message"]
    # nothing converted, not even attempted
    assert "conversion" not in failed
    assert "ConversionCreated" not in reasons(cluster, namespace, name)
    assert children(cluster, "jobs", namespace, name) == []
    artifacts = cluster.claim_path(namespace, "artifacts")
    assert not list(artifacts.rglob("convert*")), sorted(artifacts.rglob("*"))
    # a failed RecJob stays failed (it is not retried behind the user's back)
    time.sleep(3)
    assert names(children(cluster, "pytorchjobs", namespace, name)) == [job_name]


def test_failover_and_spec_edits_mid_flight_without_duplicates(operator: Cluster, namespace):
    """One real run for: the leader killed mid-training (the standby takes the Lease and
    carries on), a rollout-only edit (applied in place: no new training), a training edit
    (a new model generation g2 supersedes g1, which is cleaned up), the leader killed again
    mid-conversion; at the end exactly one PyTorchJob and one conversion Job, each
    created once, and the conversion finished."""
    cluster, name = operator, "phoenix"
    prepare(cluster, namespace)
    cluster.apply(recjob(name, namespace, **ENDLESS))
    g1, g2 = f"{name}-g1-train", f"{name}-g2-train"
    cluster.wait(
        "g1 training running, as the operator sees it",
        lambda: running_pod(cluster, namespace, name, "training")
        and status(cluster, namespace, name).get("training", {}).get("state") == "Running",
        timeout=180, on_timeout=lambda: diagnose(cluster, namespace, name),
    )  # fmt: skip
    g1_uid = cluster.get("pytorchjob", g1, namespace)["metadata"]["uid"]

    # 1. the leader dies mid-training: the other replica takes over; nothing is recreated
    print("training at the first kill:", status(cluster, namespace, name).get("training"))
    killed, successor = kill_leader(cluster)
    assert successor != killed

    # 2. an edit of spec.rollout only: applied in place, the training runs on
    patch = {"spec": {"rollout": {"steps": [50, 100]}}}
    edit(cluster, namespace, name, patch)
    edited = cluster.wait(
        "generation 2 observed", lambda: (s := status(cluster, namespace, name))
        .get("observedGeneration") == 2 and s, timeout=60,
        on_timeout=lambda: diagnose(cluster, namespace, name),
    )  # fmt: skip
    assert edited["modelGeneration"] == 1 and edited["phase"] == "Training", edited
    assert edited["training"]["jobName"] == g1
    (job,) = children(cluster, "pytorchjobs", namespace, name)
    assert job["metadata"]["uid"] == g1_uid, "the rollout edit must not replace the training"
    assert "SpecApplied" in reasons(cluster, namespace, name)

    # 3. an edit of spec.training: a new model generation supersedes the running one
    patch = {"spec": {"training": {"maxSteps": 3, "evalIntervalSteps": 3,
                                   "checkpoint": {"intervalSteps": 3}}}}  # fmt: skip
    edit(cluster, namespace, name, patch)
    cluster.wait("the g2 PyTorchJob", lambda: cluster.get("pytorchjob", g2, namespace),
                 timeout=60, on_timeout=lambda: diagnose(cluster, namespace, name))  # fmt: skip
    cluster.wait(
        "g1 training and its pods gone",
        lambda: cluster.get("pytorchjob", g1, namespace) is None
        and not [p for p in children(cluster, "pods", namespace, name)
                 if p["metadata"]["labels"].get("training.kubeflow.org/job-name") == g1],
        timeout=90, on_timeout=lambda: diagnose(cluster, namespace, name),
    )  # fmt: skip
    superseded = status(cluster, namespace, name)
    assert superseded["observedGeneration"] == 3 and superseded["modelGeneration"] == 2
    assert superseded["training"]["jobName"] == g2

    # 4. the leader dies mid-conversion
    cluster.wait(
        "the conversion running", lambda: running_pod(cluster, namespace, name, "conversion"),
        timeout=600, interval=2, on_timeout=lambda: diagnose(cluster, namespace, name),
    )  # fmt: skip
    print("conversion at the second kill:", status(cluster, namespace, name).get("conversion"))
    killed_again, _ = kill_leader(cluster)
    print("conversion after the takeover:", status(cluster, namespace, name).get("conversion"))
    assert killed_again != killed

    final = cluster.wait(
        "the conversion to end",
        lambda: (s := status(cluster, namespace, name)).get("conversion", {}).get("state")
        in ("Succeeded", "Failed") and s,
        timeout=600, interval=2, on_timeout=lambda: diagnose(cluster, namespace, name),
    )  # fmt: skip
    assert final["training"]["state"] == "Succeeded", diagnose(cluster, namespace, name)
    assert final["conversion"]["state"] == "Succeeded", diagnose(cluster, namespace, name)
    assert final["conversion"]["jobName"] == f"{name}-g2-convert"
    assert final["conversion"]["qualityGate"]["passed"] is True

    # exactly one training and one conversion exist, each created once
    assert names(children(cluster, "pytorchjobs", namespace, name)) == [g2]
    (convert,) = children(cluster, "jobs", namespace, name)
    assert convert["metadata"]["name"] == f"{name}-g2-convert"
    assert convert["status"].get("succeeded") == 1 and not convert["status"].get("failed")
    seen = reasons(cluster, namespace, name)
    created = [e["message"] for e in events(cluster, namespace, name)
               if e["reason"] == "TrainingCreated"]  # fmt: skip
    assert created == [f"created training {g1}", f"created training {g2}"], seen
    assert seen.count("Superseded") == 1 and seen.count("ConversionCreated") == 1, seen
    assert seen.count("TrainingSucceeded") == 1 and seen.count("Converted") == 1, seen
    if not cluster.kubectl("api-resources", "--api-group=serving.kserve.io", "-o=name").stdout:
        # no KServe: the operator carries on and reports the refused InferenceService
        refused = cluster.wait(
            "the refused InferenceService reported", lambda: condition(
                s := status(cluster, namespace, name), "ChildrenCreated").get("status") == "False"
            and s, timeout=60, on_timeout=lambda: diagnose(cluster, namespace, name),
        )  # fmt: skip
        assert refused["phase"] == "RollingOut", refused
        message = condition(refused, "ChildrenCreated")["message"]
        assert message.startswith("create InferenceService tiny: 404"), message
    # and in the API server's own record: each child created once (a repeated create by a
    # new leader could only have met 409 AlreadyExists)
    creates = operator_creates(cluster, namespace)
    expected = {("pytorchjobs", g1), ("pytorchjobs", g2), ("jobs", f"{name}-g2-convert"),
                ("configmaps", f"{g1}-config"), ("configmaps", f"{g2}-config"),
                ("configmaps", f"{name}-g2-convert-config")}  # fmt: skip
    assert {c for c in creates if c[0] in ("pytorchjobs", "jobs")} == {
        c for c in expected if c[0] != "configmaps"}, creates  # fmt: skip
    assert expected <= set(creates), creates
    for child in expected:
        codes = creates[child]
        assert codes.count(201) == 1 and set(codes) <= {201, 409}, (child, codes)


def test_refused_create_then_deletion_mid_training(operator: Cluster, namespace):
    """A ResourceQuota allowing no PyTorchJob: the refused create is in the RecJob's
    ChildrenCreated condition and a Warning event, with the API server's message; once
    the quota is gone the training is created (backoff). Then the RecJob is deleted while
    it trains: the finalizer is released and the real garbage collector removes the
    PyTorchJob, its pods and services and the ConfigMap (ownerReferences)."""
    cluster, name = operator, "quota"
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-training", "namespace": namespace},
        "spec": {"hard": {"count/pytorchjobs.kubeflow.org": "0"}},
    }
    cluster.apply(quota)
    cluster.wait(
        "the quota counted",
        lambda: ((cluster.get("resourcequota", "no-training", namespace) or {}).get("status")
                 or {}).get("hard"),
        timeout=60,
    )  # fmt: skip
    prepare(cluster, namespace)
    cluster.apply(recjob(name, namespace, **ENDLESS))

    refused = cluster.wait(
        "ChildrenCreated=False", lambda: (s := status(cluster, namespace, name))
        and condition(s, "ChildrenCreated").get("status") == "False" and s,
        timeout=60, on_timeout=lambda: diagnose(cluster, namespace, name),
    )  # fmt: skip
    children_created = condition(refused, "ChildrenCreated")
    message = children_created["message"]
    assert children_created["reason"] == "CreateFailed"
    assert message.startswith(f"create PyTorchJob {name}-g1-train: 403 Forbidden: "), message
    assert "exceeded quota: no-training" in message and "count/pytorchjobs.kubeflow.org" in message
    warning = cluster.wait(
        "the CreateFailed event",
        lambda: [e for e in events(cluster, namespace, name) if e["reason"] == "CreateFailed"],
        timeout=30,
    )  # fmt: skip
    assert warning[0]["type"] == "Warning" and warning[0]["message"] == message
    assert children(cluster, "pytorchjobs", namespace, name) == []

    cluster.kubectl("-n", namespace, "delete", "resourcequota", "no-training")
    started = time.monotonic()
    created = cluster.wait(
        "ChildrenCreated=True after the quota went", lambda: (s := status(cluster, namespace, name))
        and condition(s, "ChildrenCreated").get("status") == "True" and s,
        timeout=90, on_timeout=lambda: diagnose(cluster, namespace, name),
    )  # fmt: skip
    assert time.monotonic() - started < 60
    assert created["phase"] == "Training"
    # the event the refused create held back comes with the create that succeeded
    seen = cluster.wait(
        "the TrainingCreated event",
        lambda: "TrainingCreated" in (r := reasons(cluster, namespace, name)) and r, timeout=30,
    )  # fmt: skip
    assert seen.count("CreateFailed") == 1 and seen.count("TrainingCreated") == 1, seen
    assert seen.index("CreateFailed") < seen.index("TrainingCreated"), seen
    job = cluster.get("pytorchjob", f"{name}-g1-train", namespace)
    assert job is not None
    codes = operator_creates(cluster, namespace)[("pytorchjobs", f"{name}-g1-train")]
    assert codes[0] == 403 and codes[-1] == 201 and set(codes) == {403, 201}, codes

    # the children are owned, blocking their owner's deletion (which needs the
    # recjobs/finalizers rule under OwnerReferencesPermissionEnforcement)
    recjob_uid = cluster.get("recjob", name, namespace)["metadata"]["uid"]
    config_maps = children(cluster, "configmaps", namespace, name)
    assert names(config_maps) == [f"{name}-g1-train-config"]
    for child in (job, *config_maps):
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"]) == ("RecJob", recjob_uid)
        assert owner["controller"] is True and owner["blockOwnerDeletion"] is True

    cluster.wait("training running", lambda: running_pod(cluster, namespace, name, "training"),
                 timeout=180, on_timeout=lambda: diagnose(cluster, namespace, name))  # fmt: skip
    finalizers = cluster.get("recjob", name, namespace)["metadata"].get("finalizers")
    assert finalizers == ["recjob.dev/finalizer"], finalizers
    cluster.kubectl("-n", namespace, "delete", "recjob", name, "--wait=false")
    cluster.wait("the RecJob gone (finalizer released)",
                 lambda: cluster.get("recjob", name, namespace) is None, timeout=60,
                 on_timeout=lambda: diagnose(cluster, namespace, name))  # fmt: skip

    def collected() -> bool:
        kinds = ("pytorchjobs", "pods", "configmaps")
        if any(children(cluster, kind, namespace, name) for kind in kinds):
            return False
        services = (cluster.get("services", namespace=namespace) or {"items": []})["items"]
        return not [s for s in services if s["metadata"]["name"].startswith(f"{name}-g1-train")]

    cluster.wait("the children garbage-collected", collected, timeout=120, interval=2,
                 on_timeout=lambda: cluster.kubectl("get", "all,configmaps", "-n", namespace,
                                                    check=False).stdout)  # fmt: skip


def test_export_edit_mid_conversion_replaces_the_conversion_job(operator: Cluster, namespace):
    """An export-only edit while the conversion Job runs: the same trained model is
    converted again by a new Job (``-convert-2``), the running one is deleted (the
    operator's ``delete jobs`` permission), and nothing is retrained."""
    cluster, name = operator, "reexport"
    prepare(cluster, namespace)
    cluster.apply(recjob(name, namespace, maxSteps=2, evalIntervalSteps=2,
                         checkpoint={"intervalSteps": 2}))  # fmt: skip
    first = cluster.wait(
        "the first conversion Job",
        lambda: status(cluster, namespace, name).get("conversion", {}).get("jobName"),
        timeout=600, interval=0.5, on_timeout=lambda: diagnose(cluster, namespace, name),
    )  # fmt: skip
    assert first == f"{name}-g1-convert"
    edit(
        cluster, namespace, name, {"spec": {"export": {"qualityBudget": {"maxRelativeDrop": 0.4}}}}
    )
    final = cluster.wait(
        "the second conversion to end",
        lambda: (s := status(cluster, namespace, name)).get("conversion", {}).get("jobName")
        == f"{name}-g1-convert-2"
        and s["conversion"].get("state") in ("Succeeded", "Failed") and s,
        timeout=600, interval=2, on_timeout=lambda: diagnose(cluster, namespace, name),
    )  # fmt: skip
    assert final["conversion"]["state"] == "Succeeded", diagnose(cluster, namespace, name)
    assert final["modelGeneration"] == 1 and final["conversionRevision"] == 2
    assert names(children(cluster, "pytorchjobs", namespace, name)) == [f"{name}-g1-train"]
    jobs = cluster.wait(
        "the first conversion Job deleted",
        lambda: (j := names(children(cluster, "jobs", namespace, name)))
        == [f"{name}-g1-convert-2"] and j,
        timeout=60, on_timeout=lambda: diagnose(cluster, namespace, name),
    )  # fmt: skip
    assert jobs == [f"{name}-g1-convert-2"]


def operator_replicas(cluster: Cluster) -> int:
    """The operator Deployment's replica count."""
    deployment = cluster.get("deployment", "recjob-operator", OPERATOR_NS)
    assert deployment is not None, "no operator Deployment"
    return int(deployment["spec"].get("replicas") or 1)


def scale_operator(cluster: Cluster, replicas: int) -> None:
    """Scale the operator Deployment; at 0, wait until no operator process runs."""
    cluster.kubectl("-n", OPERATOR_NS, "scale", "deployment/recjob-operator",
                    f"--replicas={replicas}")  # fmt: skip
    selector = "app.kubernetes.io/name=recjob-operator"
    if replicas == 0:
        cluster.kubectl("-n", OPERATOR_NS, "wait", "--for=delete", "pod", "-l", selector,
                        "--timeout=120s", timeout=150)  # fmt: skip
    else:
        cluster.kubectl("-n", OPERATOR_NS, "rollout", "status", "deployment/recjob-operator",
                        "--timeout=240s", timeout=300)  # fmt: skip


def test_deleting_a_namespace_with_a_canary_in_flight_is_not_blocked(operator: Cluster):
    """A namespace deleted while a RecJob in it rolls out: the RecJob's finalizer wants to
    roll the canary back, but the namespace controller has already deleted the HTTPRoute,
    and the API server refuses to create anything in a Terminating namespace (403, cause
    NamespaceTerminating). That refusal must release the finalizer, not be retried: before,
    kopf retried the rollback forever and the namespace stayed Terminating.

    Made deterministic by deleting the namespace while the operator is scaled to zero (as
    when it restarts or lags behind under load): the RecJob, holding the operator's
    finalizer and a RollingOut status, is then the namespace's only content left when the
    operator comes back and finalizes it."""
    cluster, name = operator, "goner"
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    replicas = operator_replicas(cluster)
    scale_operator(cluster, 0)
    try:
        cluster.kubectl("create", "namespace", namespace)
        document = serving_recjob(name, namespace)
        document["metadata"]["finalizers"] = ["recjob.dev/finalizer"]
        cluster.apply(document)
        rollout = {"state": "Progressing", "step": 0, "canaryWeight": 50,
                   "stableModelVersion": 1, "canaryModelVersion": 2}  # fmt: skip
        cluster.kubectl("-n", namespace, "patch", "recjob", name, "--subresource=status",
                        "--type=merge", "-p", json.dumps({"status": {
                            "phase": "RollingOut", "rollout": rollout}}))  # fmt: skip
        assert status(cluster, namespace, name)["phase"] == "RollingOut"
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")
        held = cluster.wait(
            "the namespace Terminating, its RecJob deleted but held by the finalizer",
            lambda: (ns := cluster.get("namespace", namespace)) is not None
            and ns["status"].get("phase") == "Terminating"
            and (job := cluster.get("recjob", name, namespace))
            and job["metadata"].get("deletionTimestamp") and job,
            timeout=60,
        )  # fmt: skip
        assert held["status"]["phase"] == "RollingOut"
    finally:
        scale_operator(cluster, replicas)
    started = time.monotonic()
    cluster.wait(
        "the namespace gone",
        lambda: cluster.get("namespace", namespace) is None,
        timeout=120, interval=2,
        on_timeout=lambda: cluster.kubectl("get", "namespace", namespace, "-o", "yaml",
                                           check=False).stdout
        + cluster.pod_logs(OPERATOR_NS, "app.kubernetes.io/name=recjob-operator")[-4000:],
    )  # fmt: skip
    print(f"namespace gone {time.monotonic() - started:.1f} s after the operator returned")
    creates = audit.read_events(where=lambda e: e.namespace == namespace and e.verb == "create")
    operator_sa = f"system:serviceaccount:{OPERATOR_NS}:"
    refused = [e for e in creates if e.user.startswith(operator_sa) and e.code == 403]
    assert len(refused) <= 1, [(e.resource, e.name) for e in refused]  # tried once, not retried


def test_the_operators_lease_renewals_are_prioritised_like_kube_controller_managers(
    operator: Cluster,
):
    """API Priority and Fairness on the real API server puts the operator's Lease requests
    in the leader-election priority level (manifests/manager/flowschema.yaml), not in
    workload-low with its other requests: there, deleting 2,000 RecJobs at once starved the
    renewals and every replica in turn exited."""

    def dispatched() -> float:
        text = cluster.kubectl("get", "--raw", "/metrics").stdout
        found = re.findall(
            r'^apiserver_flowcontrol_dispatched_requests_total\{flow_schema="recjob-operator-'
            r'leader-election",priority_level="leader-election"\} (\S+)$', text, re.MULTILINE,
        )  # fmt: skip
        return float(found[0]) if found else 0.0

    cluster = operator
    before = dispatched()
    cluster.wait("Lease requests of the operator dispatched by its FlowSchema",
                 lambda: dispatched() > before, timeout=30)  # fmt: skip
