"""The fake API server behaves as kube-apiserver where the operator depends on it."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from recjob_operator.testing.fakeapi import FakeApiServer

RECJOBS = "/apis/recjob.dev/v1alpha1/namespaces/shop/recjobs"
MERGE = {"Content-Type": "application/merge-patch+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}


@pytest.fixture
def api():
    server = FakeApiServer().start()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield server, client
    server.stop()


def create(client: httpx.Client, name: str = "a", **extra) -> dict:
    body = {"apiVersion": "recjob.dev/v1alpha1", "kind": "RecJob",
            "metadata": {"name": name, "labels": {"team": "search"}},
            "spec": {"x": 1}, "status": {"phase": "ignored"}, **extra}  # fmt: skip
    response = client.post(RECJOBS, json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_discovery_lists_groups_and_the_status_subresource(api) -> None:
    _, client = api
    groups = {g["name"] for g in client.get("/apis").json()["groups"]}
    assert {"recjob.dev", "kubeflow.org", "serving.kserve.io", "batch"} <= groups
    resources = {r["name"] for r in client.get("/apis/recjob.dev/v1alpha1").json()["resources"]}
    assert resources == {"recjobs", "recjobs/status"}
    assert client.get("/api").json()["versions"] == ["v1"]


def test_create_get_conflict_and_versions(api) -> None:
    _, client = api
    first = create(client)
    meta = first["metadata"]
    assert meta["uid"] and meta["generation"] == 1 and "status" not in first
    assert client.post(RECJOBS, json=first).status_code == 409
    assert client.get(f"{RECJOBS}/missing").status_code == 404
    again = client.get(f"{RECJOBS}/a").json()
    assert again == first
    stale = dict(first, spec={"x": 2})
    ok = client.put(f"{RECJOBS}/a", json=stale)
    assert ok.status_code == 200 and ok.json()["metadata"]["generation"] == 2
    assert int(ok.json()["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    assert client.put(f"{RECJOBS}/a", json=stale).status_code == 409  # stale resourceVersion


def test_status_subresource_and_generation(api) -> None:
    _, client = api
    create(client)
    # the main endpoint ignores status; labels don't bump the generation
    patched = client.patch(f"{RECJOBS}/a", json={"status": {"phase": "X"},
                           "metadata": {"labels": {"l": "1"}}}, headers=MERGE).json()  # fmt: skip
    assert "status" not in patched and patched["metadata"]["generation"] == 1
    status = client.patch(f"{RECJOBS}/a/status", json={"status": {"phase": "Training"},
                          "spec": {"x": 99}}, headers=MERGE).json()  # fmt: skip
    assert status["status"] == {"phase": "Training"} and status["spec"] == {"x": 1}
    assert status["metadata"]["generation"] == 1
    spec = client.patch(f"{RECJOBS}/a", json={"spec": {"x": 5}}, headers=MERGE).json()
    assert spec["metadata"]["generation"] == 2 and spec["status"] == {"phase": "Training"}


def test_json_patch_test_operation_fails_with_422(api) -> None:
    _, client = api
    created = create(client)
    version = created["metadata"]["resourceVersion"]
    ok = client.patch(f"{RECJOBS}/a", headers=JSON_PATCH, json=[
        {"op": "test", "path": "/metadata/resourceVersion", "value": version},
        {"op": "replace", "path": "/spec/x", "value": 3},
    ])  # fmt: skip
    assert ok.status_code == 200 and ok.json()["spec"]["x"] == 3
    failed = client.patch(f"{RECJOBS}/a", headers=JSON_PATCH, json=[
        {"op": "test", "path": "/metadata/resourceVersion", "value": version},
        {"op": "replace", "path": "/spec/x", "value": 4},
    ])  # fmt: skip
    assert failed.status_code == 422 and failed.json()["reason"] == "Invalid"
    assert client.get(f"{RECJOBS}/a").json()["spec"]["x"] == 3


def test_finalizers_hold_deletion(api) -> None:
    _, client = api
    create(client, metadata={"name": "a", "finalizers": ["recjob.dev/finalizer"]})
    deleting = client.delete(f"{RECJOBS}/a").json()
    assert deleting["metadata"]["deletionTimestamp"]
    assert client.get(f"{RECJOBS}/a").status_code == 200  # still there
    client.patch(f"{RECJOBS}/a", json={"metadata": {"finalizers": None}}, headers=MERGE)
    assert client.get(f"{RECJOBS}/a").status_code == 404


def test_list_with_selector_and_watch_from_a_version(api) -> None:
    _, client = api
    create(client, "a")
    create(client, "b", metadata={"name": "b", "labels": {"team": "recs"}})
    listed = client.get(RECJOBS, params={"labelSelector": "team=search"}).json()
    assert [o["metadata"]["name"] for o in listed["items"]] == ["a"]
    since = listed["metadata"]["resourceVersion"]
    events: list[dict] = []

    def watch() -> None:
        with httpx.stream("GET", f"{client.base_url}{RECJOBS}",
                          params={"watch": "true", "resourceVersion": since,
                                  "timeoutSeconds": "3"}, timeout=10) as stream:  # fmt: skip
            for line in stream.iter_lines():
                if line:
                    events.append(json.loads(line))

    thread = threading.Thread(target=watch)
    thread.start()
    import time

    time.sleep(0.5)
    client.patch(f"{RECJOBS}/a", json={"spec": {"x": 7}}, headers=MERGE)
    client.delete(f"{RECJOBS}/b")
    thread.join()
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]


def test_injected_conflicts_and_the_request_log(api) -> None:
    server, client = api
    create(client)
    server.store.conflicts[("recjobs", "status")] = 1
    first = client.patch(f"{RECJOBS}/a/status", json={"status": {"phase": "A"}}, headers=MERGE)
    second = client.patch(f"{RECJOBS}/a/status", json={"status": {"phase": "A"}}, headers=MERGE)
    assert (first.status_code, second.status_code) == (409, 200)
    verbs = [(r.verb, r.resource, r.subresource, r.status) for r in server.store.log]
    assert verbs == [
        ("create", "recjobs", None, 201),
        ("patch", "recjobs", "status", 409),
        ("patch", "recjobs", "status", 200),
    ]
