"""The serving objects: InferenceServices that KServe can run on a stock cluster and that
outlive the RecJob that created them, the HTTPRoute that splits a RawDeployment canary."""

from __future__ import annotations

import copy

import pytest

from recjob_operator.api.validation import parse_recjob
from recjob_operator.controller.children import snapshot_uri
from recjob_operator.controller.serving_objects import (
    REVISION_HEADER,
    REVISION_LABEL,
    http_route,
    route_weights,
    runtime_name,
    serverless_inference_service,
    version_inference_service,
)
from tests.conftest import MINIMAL
from tests.operator.test_children import assert_valid_against, job

ISVC_CRD = "serving.kserve.io_inferenceservices.yaml"


def raw(mode: str = "RawDeployment", **gateway):
    document = copy.deepcopy(MINIMAL)
    document["spec"].setdefault("serving", {}).update(
        {"deploymentMode": mode, "gateway": {"name": "shop-gw", **gateway}}
    )
    return job(document)


def test_serverless_canary_is_a_traffic_field_on_the_shared_service() -> None:
    recjob = job()
    stable = serverless_inference_service(recjob, 1, None)
    canary = serverless_inference_service(recjob, 2, 25)
    assert stable["metadata"]["name"] == canary["metadata"]["name"] == recjob.service_name
    assert "canaryTrafficPercent" not in stable["spec"]["predictor"]
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 25
    model = canary["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "triton", "version": "2"}
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"] == snapshot_uri(recjob, 2) != snapshot_uri(recjob, 1)
    assert canary["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    # no RecJob-specific annotation: KServe copies annotations into the revision template
    assert set(canary["metadata"]["annotations"]) == {"serving.kserve.io/deploymentMode"}
    for isvc in (stable, canary):
        assert_valid_against(isvc, ISVC_CRD, "v1beta1")


@pytest.mark.parametrize("mode", ["Serverless", "RawDeployment", "Standard"])
def test_the_service_outlives_any_recjob(mode: str) -> None:
    """Deleting the RecJob that first deployed a service (GitOps pruning an old run) must
    not garbage-collect the live service: no ownerReference on a stable InferenceService."""
    recjob = job() if mode == "Serverless" else raw(mode)
    if mode == "Serverless":
        stable = serverless_inference_service(recjob, 1, None)
    else:
        stable = version_inference_service(recjob, 1, canary=False)
    assert "ownerReferences" not in stable["metadata"]
    assert stable["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "recjob-operator"
    assert "recjob.dev/recjob" not in stable["metadata"]["labels"]


def test_a_raw_canary_is_its_own_inference_service_owned_until_promoted() -> None:
    recjob = raw()
    canary = version_inference_service(recjob, 2, canary=True)
    assert canary["metadata"]["name"] == f"{recjob.service_name}-v2"
    (owner,) = canary["metadata"]["ownerReferences"]
    assert owner["uid"] == recjob.metadata.uid and owner["controller"] is False
    assert "canaryTrafficPercent" not in canary["spec"]["predictor"]  # KServe: Serverless only
    assert canary["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert_valid_against(canary, ISVC_CRD, "v1beta1")
    standard = version_inference_service(raw("Standard"), 2, canary=False)
    assert standard["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"


def test_predictor_requests_equal_limits_and_runs_restricted() -> None:
    """KServe fills a missing limit from the runtime (1 CPU), and a request above it is
    refused: every container states both, equal; restricted Pod Security."""
    document = copy.deepcopy(MINIMAL)
    document["spec"].setdefault("serving", {})["resources"] = {"cpu": "2", "memory": "3Gi"}
    predictor = serverless_inference_service(job(document), 1, None)["spec"]["predictor"]
    resources = predictor["model"]["resources"]
    assert resources["requests"] == resources["limits"] == {"cpu": "2", "memory": "3Gi"}
    context = predictor["model"]["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["runAsNonRoot"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert predictor["securityContext"]["runAsNonRoot"] is True
    assert predictor["automountServiceAccountToken"] is False


def test_pods_carry_their_revision_and_scrape_annotations() -> None:
    predictor = version_inference_service(raw(), 3, canary=True)["spec"]["predictor"]
    assert predictor["labels"] == {REVISION_LABEL: "minimal-v3"}
    assert predictor["annotations"]["prometheus.io/scrape"] == "true"
    assert predictor["annotations"]["prometheus.io/port"] == "8080"


@pytest.mark.parametrize(
    ("target", "runtime"),
    [("onnxruntime-int8", "recjob-oip"), ("onnxruntime-fp32", "recjob-oip"),
     ("tensorrt-int8", "recjob-triton"), ("tensorrt-fp16", "recjob-triton")],
)  # fmt: skip
def test_the_runtime_follows_the_export_target(target: str, runtime: str) -> None:
    document = copy.deepcopy(MINIMAL)
    document["spec"].setdefault("export", {})["target"] = target
    if target.startswith("tensorrt"):  # validation asks GPUs of TensorRT targets
        document["spec"]["export"]["resources"] = {"gpu": 1}
        document["spec"].setdefault("serving", {})["resources"] = {"gpu": 1}
    recjob = parse_recjob(document)
    assert runtime_name(recjob) == runtime
    document["spec"].setdefault("serving", {})["runtimeName"] = "my-runtime"
    assert runtime_name(parse_recjob(document)) == "my-runtime"


def test_the_http_route_weights_versions_and_pins_revisions() -> None:
    recjob = raw(namespace="gateways")
    route = http_route(recjob, {1: 90, 2: 10})
    spec = route["spec"]
    assert spec["parentRefs"] == [{"name": "shop-gw", "namespace": "gateways"}]
    assert spec["hostnames"] == ["minimal-shop.example.com"]  # <service>-<namespace>
    *pinned, split = spec["rules"]
    assert split["backendRefs"] == [
        {"name": "minimal-v1-predictor", "port": 80, "weight": 90},
        {"name": "minimal-v2-predictor", "port": 80, "weight": 10},
    ]
    headers = [r["matches"][0]["headers"][0] for r in pinned]
    assert [(h["name"], h["value"]) for h in headers] == [
        (REVISION_HEADER, "minimal-v1"), (REVISION_HEADER, "minimal-v2")
    ]  # fmt: skip
    assert [r["backendRefs"][0]["name"] for r in pinned] == [
        "minimal-v1-predictor", "minimal-v2-predictor"
    ]  # fmt: skip
    assert route_weights(route) == {1: 90, 2: 10}
    # as read back: the API server defaults the weighted rule's matches to PathPrefix /
    split["matches"] = [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert route_weights(route) == {1: 90, 2: 10}
    assert "ownerReferences" not in route["metadata"]
    own = http_route(raw(hostname="search.shop.example.com"), {1: 100})
    assert own["spec"]["hostnames"] == ["search.shop.example.com"]
    assert own["spec"]["parentRefs"] == [{"name": "shop-gw"}]
