"""How the operator reads KServe's InferenceService status, on statuses shaped as KServe's
own controller and status tests produce them (pkg/apis/serving/v1beta1/
inference_service_status_test.go at v0.20.0): fail fast on a canary that cannot load, wait
for one whose revision is not ready yet, and read the rolled-out revision KServe keeps."""

from __future__ import annotations

from recjob_operator.kube.serving import failure, is_ready, observed, serverless_readiness


def _isvc(**status) -> dict:
    return {"status": status}


READY = [{"type": "Ready", "status": "True"}, {"type": "PredictorReady", "status": "True"}]
NOT_READY = [{"type": "Ready", "status": "False"}, {"type": "PredictorReady", "status": "False"}]


def test_a_model_that_failed_to_load_is_a_failure_with_kserves_reason() -> None:
    """'kserve container failed due to an error': TargetModelState FailedToLoad,
    transitionStatus BlockedByFailedLoad, lastFailureInfo ModelLoadFailed + the message."""
    crashed = _isvc(conditions=NOT_READY, modelStatus={
        "states": {"activeModelState": "", "targetModelState": "FailedToLoad"},
        "transitionStatus": "BlockedByFailedLoad",
        "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "For testing", "exitCode": 1},
    })  # fmt: skip
    assert failure(crashed) == "ModelLoadFailed: For testing"
    invalid = _isvc(conditions=NOT_READY, modelStatus={
        "transitionStatus": "InvalidSpec",
        "lastFailureInfo": {"reason": "NoSupportingRuntime",
                            "message": "No runtime found to support specified framework/version"},
    })  # fmt: skip
    assert failure(invalid).startswith("NoSupportingRuntime: No runtime found")


def test_a_model_still_loading_is_not_a_failure() -> None:
    loading = _isvc(conditions=NOT_READY, modelStatus={
        "states": {"activeModelState": "", "targetModelState": "Pending"},
        "transitionStatus": "InProgress",
    })  # fmt: skip
    assert failure(loading) is None and not is_ready(loading)
    up = _isvc(conditions=READY, modelStatus={"transitionStatus": "UpToDate"})
    assert failure(up) is None and is_ready(up)
    assert failure(None) is None and not is_ready(None)


def test_serverless_canary_is_ready_when_its_revision_is_the_latest_ready_one() -> None:
    """During a Serverless canary KServe keeps the 100% revision in latestRolledoutRevision
    (previousRolledoutRevision is the one before it); the new revision is ready when
    latestReadyRevision has caught up with latestCreatedRevision."""
    rolling = _isvc(conditions=READY, components={"predictor": {
        "latestCreatedRevision": "svc-predictor-00002",
        "latestReadyRevision": "svc-predictor-00001",
        "latestRolledoutRevision": "svc-predictor-00001",
        "traffic": [{"revisionName": "svc-predictor-00001", "percent": 100,
                     "latestRevision": False}],
    }})  # fmt: skip
    assert is_ready(rolling) and not serverless_readiness(rolling)
    ready = _isvc(conditions=READY, components={"predictor": {
        "latestCreatedRevision": "svc-predictor-00002",
        "latestReadyRevision": "svc-predictor-00002",
        "latestRolledoutRevision": "svc-predictor-00001",
        "previousRolledoutRevision": "svc-predictor-00000",
        "traffic": [
            {"revisionName": "svc-predictor-00001", "percent": 90, "latestRevision": False},
            {"revisionName": "svc-predictor-00002", "percent": 10, "latestRevision": True},
        ],
    }})  # fmt: skip
    assert serverless_readiness(ready)
    assert not serverless_readiness(_isvc(conditions=READY))


def test_a_status_from_before_the_last_spec_change_says_nothing_about_the_new_model() -> None:
    """After a rollback to 0% the old revision's failure stays in modelStatus until KServe
    reconciles the next change: the next canary must not be failed by it."""
    failed = {"transitionStatus": "BlockedByFailedLoad",
              "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "old"}}  # fmt: skip
    stale = {"metadata": {"generation": 5}, "status": {
        "observedGeneration": 4, "conditions": NOT_READY, "modelStatus": failed}}  # fmt: skip
    assert not observed(stale) and failure(stale) is None
    stale["status"]["observedGeneration"] = 5
    assert observed(stale) and failure(stale) == "ModelLoadFailed: old"
