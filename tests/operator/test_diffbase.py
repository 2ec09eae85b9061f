"""kopf's diff-base kept in memory: the essence it builds from only the parts it keeps is
the one kopf builds from the whole object; the progress storage clears an essence as
kopf's does, without changing the one it is given."""

from __future__ import annotations

import copy

import kopf
import pytest

from recjob_operator.kube.diffbase import AnnotationsProgressStorage, MemoryDiffBaseStorage
from tests.conftest import MINIMAL


def stored_recjob() -> dict:
    """A RecJob as a watch delivers it: managedFields, finalizer, status, labels and
    annotations, among them kubectl's and another kopf operator's storage."""
    body = copy.deepcopy(MINIMAL)
    body["metadata"] |= {
        "uid": "u-1", "resourceVersion": "42", "generation": 2,
        "finalizers": ["recjob.dev/finalizer"],
        "labels": {"team": "search"},
        "annotations": {
            "note": "kept",
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
            "kopf.zalando.org/last-handled-configuration": "{}",
            "kopf.zalando.org/handler-1": '{"started": "2026-01-01T00:00:00Z"}',
        },
        "managedFields": [{"manager": "kubectl", "operation": "Update",
                           "fieldsV1": {"f:spec": {"f:training": {}}}}],
    }  # fmt: skip
    body["status"] = {"phase": "Training", "conditions": [{"type": "Valid", "status": "True"}]}
    return body


def test_the_essence_is_kopfs() -> None:
    body = kopf.Body(stored_recjob())
    storage = MemoryDiffBaseStorage()
    ours = storage.build(body=body)
    assert ours == kopf.DiffBaseStorage.build(storage, body=body)
    assert ours["spec"] == MINIMAL["spec"]
    assert ours["metadata"] == {"labels": {"team": "search"}, "annotations": {"note": "kept"}}
    assert "status" not in ours


def test_the_essence_is_a_copy() -> None:
    raw = stored_recjob()
    essence = MemoryDiffBaseStorage().build(body=kopf.Body(raw))
    raw["spec"]["data"]["train"] = "data/other.csv"
    raw["metadata"]["labels"]["team"] = "recs"
    assert essence["spec"] == MINIMAL["spec"]
    assert essence["metadata"]["labels"] == {"team": "search"}


def test_extra_fields_are_picked_from_the_whole_object() -> None:
    body = kopf.Body(stored_recjob())
    essence = MemoryDiffBaseStorage().build(body=body, extra_fields=["status.phase"])
    assert essence["status"] == {"phase": "Training"}


ESSENCES = {
    "ours and others": {
        "spec": {"a": 1},
        "metadata": {
            "labels": {"team": "search"},
            "annotations": {
                "note": "kept",
                "recjob.dev/handler-1": "{}",
                "recjob.dev": "x",
                "other.dev/recjob.dev/y": "kept",
            },
        },
    },
    "only ours": {"spec": {"a": 1}, "metadata": {"annotations": {"recjob.dev/h": "{}"}}},
    "empty stanzas": {"spec": {}, "metadata": {"labels": {}, "annotations": {}}, "status": {}},
    "empty metadata": {"spec": {"a": [1, {"b": 2}]}, "metadata": {}},
    "status kept": {"spec": {"a": 1}, "status": {"phase": "Training"}},
    "no metadata": {"spec": {"a": 1}},
}


@pytest.mark.parametrize("prefix", ["recjob.dev", "other.dev"])
@pytest.mark.parametrize("name", list(ESSENCES))
def test_clear_is_kopfs_without_changing_its_input(name: str, prefix: str) -> None:
    essence = copy.deepcopy(ESSENCES[name])
    ours = AnnotationsProgressStorage(prefix=prefix).clear(essence=essence)
    kopfs = kopf.AnnotationsProgressStorage(prefix=prefix).clear(essence=copy.deepcopy(essence))
    assert ours == kopfs
    assert essence == ESSENCES[name]  # the essence given (kopf's stored one) is unchanged
    if prefix == "recjob.dev" and name == "ours and others":
        assert ours["metadata"]["annotations"] == {"note": "kept", "recjob.dev": "x",
                                                   "other.dev/recjob.dev/y": "kept"}  # fmt: skip
