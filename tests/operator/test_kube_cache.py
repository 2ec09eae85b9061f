"""The children caches: index functions, the view over kopf's indexes (no API calls for
cached kinds, one LIST for a finished child's report the pod cache lacks), and the same
reads through the API (a real API server: see kube_target.py)."""

from __future__ import annotations

import json

import pytest

from recjob_operator.api.v1alpha1.status import ConversionStatus, RecJobStatus
from recjob_operator.api.validation import parse_recjob
from recjob_operator.kube import cache
from recjob_operator.kube.backend import KubeBackend
from recjob_operator.kube.serving import KubeServing
from tests.conftest import MINIMAL
from tests.operator.kube_target import kube_target, unique

MANAGED = {"app.kubernetes.io/managed-by": "recjob-operator"}


def pod(name: str, labels: dict, message: str | None) -> dict:
    state = {"terminated": {"exitCode": 0, "message": message}} if message else {"running": {}}
    return {
        "metadata": {"name": name, "namespace": "shop", "labels": {**MANAGED, **labels}},
        "status": {"containerStatuses": [{"name": "c", "state": state}]},
    }


class FakeIndex(dict):
    """kopf's Index as the view reads it: key -> iterable store of values."""

    def add(self, entries: dict) -> None:
        for key, value in entries.items():
            self.setdefault(key, []).append(value)


class CountingView:
    """A fallback view that counts its calls."""

    def __init__(self, reports: dict | None = None):
        self.calls: list[tuple] = []
        self.reports = reports or {}

    def pytorchjob(self, namespace, name):
        self.calls.append(("pytorchjob", name))
        return {"status": {"conditions": [{"type": "Running", "status": "True"}]}}

    def job(self, namespace, name):
        self.calls.append(("job", name))
        return None

    def inferenceservice(self, namespace, name):
        self.calls.append(("inferenceservice", name))
        return None

    def report(self, namespace, kind, name):
        self.calls.append(("report", kind, name))
        return self.reports.get((kind, name))


def indexes() -> dict[str, FakeIndex]:
    return {name: FakeIndex() for name in cache.INDEXES}


def test_index_functions_keep_what_observation_reads() -> None:
    job = {
        "metadata": {"name": "a-g1-train", "namespace": "shop", "labels": MANAGED},
        "spec": {"big": "x" * 1000},
        "status": {"conditions": [{"type": "Running"}]},
    }
    assert cache.index_pytorchjob(job) == {
        ("shop", "a-g1-train"): {"status": {"conditions": [{"type": "Running"}]}}
    }
    isvc = {"metadata": {"name": "svc", "namespace": "shop", "annotations": {"a": "1"},
                         "generation": 4},
            "spec": {"predictor": {"canaryTrafficPercent": 10, "model": {"x": 1}}},
            "status": {"url": "u"}}  # fmt: skip
    assert cache.index_inferenceservice(isvc) == {
        ("shop", "svc"): {
            "metadata": {"annotations": {"a": "1"}, "generation": 4},
            "spec": {"predictor": {"canaryTrafficPercent": 10}},
            "status": {"url": "u"},
        }
    }
    master = {"training.kubeflow.org/job-name": "a-g1-train",
              "training.kubeflow.org/replica-type": "master"}  # fmt: skip
    worker = dict(master, **{"training.kubeflow.org/replica-type": "worker"})
    assert cache.index_pod(pod("m", master, '{"x": 1}')) == {
        ("shop", "pytorchjobs", "a-g1-train"): '{"x": 1}'
    }
    assert cache.index_pod(pod("w", worker, '{"x": 1}')) == {}
    assert cache.index_pod(pod("m", master, None)) == {}  # running: nothing (clears earlier)
    converted = pod("c", {"batch.kubernetes.io/job-name": "a-g1-convert"}, '{"passed": true}')
    assert cache.index_pod(converted) == {("shop", "jobs", "a-g1-convert"): '{"passed": true}'}


def test_index_view_answers_from_the_caches_without_api_calls() -> None:
    idx, fallback = indexes(), CountingView()
    idx["recjob_pytorchjobs"].add({("shop", "a-g1-train"): {"status": {"x": 1}}})
    idx["recjob_pods"].add({("shop", "jobs", "a-g1-convert"): json.dumps({"passed": True})})
    view = cache.IndexView(idx, fallback)
    assert view.pytorchjob("shop", "a-g1-train") == {"status": {"x": 1}}
    assert view.job("shop", "a-g1-convert") is None
    assert view.inferenceservice("shop", "svc") is None
    assert view.report("shop", "jobs", "a-g1-convert") == {"passed": True}
    assert fallback.calls == []
    entry = view.pytorchjob("shop", "a-g1-train")
    entry["status"]["x"] = 2  # callers get copies: the cache is never changed through them
    assert view.pytorchjob("shop", "a-g1-train") == {"status": {"x": 1}}


def test_a_report_missing_from_the_pod_cache_is_listed_once() -> None:
    fallback = CountingView({("jobs", "late"): {"passed": True}})
    view = cache.IndexView(indexes(), fallback)
    assert view.report("shop", "jobs", "late") == {"passed": True}
    assert view.report("shop", "jobs", "late") == {"passed": True}
    assert view.report("shop", "jobs", "none") is None
    assert view.report("shop", "jobs", "none") is None
    assert fallback.calls == [("report", "jobs", "late"), ("report", "jobs", "none")]


def test_uncached_kinds_are_read_through_the_api() -> None:
    fallback = CountingView()
    view = cache.IndexView(indexes(), fallback, frozenset({"pytorchjobs", "pods"}))
    assert view.pytorchjob("shop", "a")["status"]["conditions"][0]["type"] == "Running"
    assert view.report("shop", "pytorchjobs", "a") is None
    assert view.report("shop", "pytorchjobs", "a") is None  # no pod cache: listed again
    assert view.job("shop", "b") is None
    assert fallback.calls == [("pytorchjob", "a"), ("report", "pytorchjobs", "a"),
                              ("report", "pytorchjobs", "a")]  # fmt: skip


def test_backend_observes_through_a_view() -> None:
    recjob = parse_recjob({**MINIMAL, "metadata": {"name": "obs", "namespace": "shop",
                                                   "generation": 2, "uid": "u"}})  # fmt: skip
    idx = indexes()
    idx["recjob_pytorchjobs"].add({("shop", "obs-g2-train"): {"status": {"conditions": [
        {"type": "Succeeded", "status": "True"}]}}})  # fmt: skip
    idx["recjob_pods"].add({("shop", "pytorchjobs", "obs-g2-train"): '{"main_metric": "m"}'})
    idx["recjob_jobs"].add({("shop", "obs-g2-convert"): {"status": {"conditions": [
        {"type": "Failed", "status": "True", "message": "exit 2"}]}}})  # fmt: skip
    # a Serverless canary of version 2 against stable 1: the service record says which is
    # which, the InferenceService's status (as KServe writes it) how far the canary is
    recjob.status = RecJobStatus(phase="RollingOut",
                                 conversion=ConversionStatus(model_version=2))  # fmt: skip
    idx["recjob_records"].add({("shop", "obs-recjob"): {"data": {
        "stableModelVersion": "1", "canaryModelVersion": "2",
        "holder": "obs", "holderUid": "u"}}})  # fmt: skip
    me = {"name": "obs", "uid": "u", "phase": "RollingOut", "created": ""}
    idx["recjob_services"].add({("shop", "obs"): me})
    traffic = {"latestCreatedRevision": "obs-predictor-2", "latestReadyRevision": "obs-predictor-2",
               "latestRolledoutRevision": "obs-predictor-1"}  # fmt: skip
    isvc = {
        "metadata": {"annotations": {}, "generation": 2},
        "spec": {"predictor": {"canaryTrafficPercent": 20}},
        "status": {
            "observedGeneration": 2,
            "conditions": [{"type": "Ready", "status": "True"}],
            "components": {"predictor": traffic},
        },
    }
    idx["recjob_inferenceservices"].add({("shop", "obs"): isvc})
    fallback = CountingView()
    backend = KubeBackend.__new__(KubeBackend)
    backend.serving = KubeServing.__new__(KubeServing)  # observation reads the view only
    view = cache.IndexView(idx, fallback)
    observed = backend.observe(recjob, view)
    assert observed.serving.canary_version == 2 and observed.serving.canary_weight == 20
    assert observed.serving.stable_version == 1 and observed.serving.waiting_for is None
    assert observed.serving.stable_revision == "obs-predictor-1" and observed.serving.ready
    assert observed.serving.canary_ready and observed.serving.failure is None
    recjob.status = None
    observed = backend.observe(recjob, view)
    assert observed.training.state == "Succeeded"
    assert observed.training.result == {"main_metric": "m"}
    assert observed.conversion.state == "Failed" and observed.conversion.message == "exit 2"
    assert observed.serving is None  # not rolling out: the service is not looked at
    assert fallback.calls == [("report", "jobs", "obs-g2-convert")]  # not in the pod cache


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    with kube_target(tmp_path_factory.mktemp("cache")) as target:
        yield target


def test_api_view_reads_jobs_and_termination_messages(target) -> None:
    from kubernetes import client

    ns, name = target.namespace, unique("conv")
    batch, core = client.BatchV1Api(target.api), client.CoreV1Api(target.api)
    view = cache.ApiView(target.api)
    assert view.job(ns, name) is None
    container = {"name": "c", "image": "busybox", "command": ["true"]}
    batch.create_namespaced_job(ns, {"metadata": {"name": name}, "spec": {"template": {
        "spec": {"restartPolicy": "Never", "containers": [container]}}}})  # fmt: skip
    try:
        assert view.job(ns, name)["metadata"]["name"] == name
        if target.env is not None:  # no Job controller or kubelet: the pod they would leave
            core.create_namespaced_pod(ns, {"metadata": {"name": f"{name}-x", "labels": {
                "job-name": name}}, "spec": {"containers": [container]}})  # fmt: skip
            terminated = {"exitCode": 0, "message": '{"passed": true}'}
            statuses = [{"name": "c", "image": "busybox", "imageID": "", "ready": False,
                         "restartCount": 0, "state": {"terminated": terminated}}]  # fmt: skip
            core.patch_namespaced_pod_status(
                f"{name}-x", ns, {"status": {"containerStatuses": statuses}}
            )
            assert view.report(ns, "jobs", name) == {"passed": True}
        assert view.report(ns, "jobs", unique("none")) is None
    finally:
        batch.delete_namespaced_job(name, ns, propagation_policy="Background")


def test_a_restarted_containers_last_termination_message_is_read() -> None:
    """OnFailure restarts the container in place (CrashLoopBackOff between runs): its last
    run's message is in lastState; the current state's wins when both have one."""
    last = {"terminated": {"exitCode": 1, "message": '{"error": "boom"}'}}
    waiting = {"waiting": {"reason": "CrashLoopBackOff"}}
    pod = {"status": {"containerStatuses": [{"name": "c", "state": waiting, "lastState": last}]}}
    assert cache.termination_message(pod) == '{"error": "boom"}'
    now = {"terminated": {"exitCode": 0, "message": '{"main_metric": "auc"}'}}
    pod["status"]["containerStatuses"][0]["state"] = now
    assert cache.termination_message(pod) == '{"main_metric": "auc"}'
    assert cache.termination_message({"status": {}}) is None


def test_a_failed_trainings_message_gains_the_trainers_error() -> None:
    from recjob_operator.kube.backend import with_trainer_error

    assert with_trainer_error("1 Master replica(s) failed.", {"error": "ValueError: x"}) == (
        "1 Master replica(s) failed.; trainer: ValueError: x"
    )
    assert with_trainer_error(None, {"error": "ValueError: x"}) == "trainer: ValueError: x"
    assert with_trainer_error("failed", None) == "failed"
    assert with_trainer_error("failed", {"main_metric": "auc"}) == "failed"


def test_a_deleted_master_pods_message_is_still_read() -> None:
    """The Training Operator deletes the pods of a PyTorchJob past its backoff limit: the
    index forgets the pod, the remembered message of its DELETED event still answers,
    without an API call."""
    deleted = cache.DeletedPodMessages()
    labels = {"training.kubeflow.org/job-name": "a-g1-train",
              "training.kubeflow.org/replica-type": "master"}  # fmt: skip
    last = {"terminated": {"exitCode": 1, "message": '{"error": "DataError: no such file"}'}}
    pod = {"metadata": {"name": "a-master-0", "namespace": "shop", "labels": labels},
           "status": {"containerStatuses": [{"name": "c", "lastState": last}]}}  # fmt: skip
    deleted.remember(pod)
    deleted.remember({"metadata": {"name": "other", "namespace": "shop", "labels": {}}})
    fallback = CountingView()
    view = cache.IndexView(indexes(), fallback, frozenset(), deleted)
    assert view.report("shop", "pytorchjobs", "a-g1-train") == {"error": "DataError: no such file"}
    assert fallback.calls == []
    assert deleted.get(("shop", "pytorchjobs", "b-g1-train")) is None


def test_a_retried_jobs_result_is_its_finished_pods_summary() -> None:
    """Found on the cluster: a federated run's Job whose first pod failed (its SuperLink
    restarted) and whose second finished has two termination messages under one child in
    kopf's pod index; the report is the finished run's summary, not the first pod's error,
    in whichever order the index holds them (and listed through the API alike)."""
    from kopf._core.engines.indexing import OperatorIndexer

    key = ("shop", "jobs", "fed-g1-train")
    error, summary = json.dumps({"error": "RuntimeError: restarted"}), json.dumps({"model": {}})
    for order in ((error, summary), (summary, error)):
        indexer = OperatorIndexer()
        for number, message in enumerate(order):
            indexer.replace(("shop", f"fed-g1-train-{number}", None), {key: message})
        view = cache.IndexView({**indexes(), "recjob_pods": indexer.index}, CountingView())
        assert view.report(*key) == {"model": {}}
    assert cache.best_report([(error, "a"), (None, "b")]) == {"error": "RuntimeError: restarted"}
    assert cache.best_report([(error, "a"), (summary, "b")]) == {"model": {}}
    assert cache.best_report([]) is None
