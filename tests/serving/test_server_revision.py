"""`recjob-serve serve --revision` on loopback: revision-labelled metrics, the
`x-recjob-revision` header (HTTP and gRPC), `POST /v2/feedback` for the server's own
revision only, and the rollout queries of the examples, samples and API defaults naming
only metrics the server exports."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from recjob_operator.api.v1alpha1.spec_delivery import _default_metrics
from recjob_operator.local import router
from recjob_serving import feedback
from tests.conftest import REPO
from tests.serving.test_server import (
    BIN,
    Server,
    _infer_body,
    _tokens,
    repository,  # noqa: F401  (module fixture)
)

REVISION = "search-v3"
HEADER = "x-recjob-revision"
MAX_BODY = 4096
WAIT_S = 60


@contextmanager
def _revision_env(value: str | None) -> Iterator[None]:
    """RECJOB_REVISION set to ``value`` (None: unset) while servers start."""
    old = os.environ.pop("RECJOB_REVISION", None)
    if value is not None:
        os.environ["RECJOB_REVISION"] = value
    try:
        yield
    finally:
        os.environ.pop("RECJOB_REVISION", None)
        if old is not None:
            os.environ["RECJOB_REVISION"] = old


@pytest.fixture(scope="module")
def revisioned(repository, tmp_path_factory):  # noqa: F811
    """A server started as revision search-v3 (from RECJOB_REVISION, as the downward API
    gives it), with a 4 KiB body limit and 2 s header/read timeouts."""
    repo, _ = repository
    with _revision_env(REVISION):
        running = Server(
            repo,
            tmp_path_factory.mktemp("log") / "server.log",
            "--max-body-bytes", str(MAX_BODY), "--header-timeout", "2", "--read-timeout", "2",
        )  # fmt: skip
    yield running
    if running.process.poll() is None:
        running.stop()


def _samples(metrics_text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a /metrics text."""
    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _feedback_values(metrics_text: str, revision: str) -> dict[str, float | None]:
    samples = _samples(metrics_text)
    return {
        kind: samples.get((f"recjob_feedback_{kind}_total", (("revision", revision),)))
        for kind in ("impressions", "clicks", "gain")
    }


def _post_feedback(client: httpx.Client, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(
        "/v2/feedback", content=content, headers={"content-type": "application/json"}
    )


# --- series and labels -----------------------------------------------------------------


def test_feedback_and_inference_series_exist_from_startup(revisioned) -> None:
    metrics = httpx.get(f"{revisioned.url}/metrics", timeout=WAIT_S).text
    assert _feedback_values(metrics, REVISION) == {"impressions": 0, "clicks": 0, "gain": 0}
    samples = _samples(metrics)
    labels = (("model", "search"), ("revision", REVISION), ("version", "1"))
    assert samples[("recjob_inference_requests_total", labels)] == 0
    for kind in ("internal", "invalid_input"):
        assert samples[("recjob_inference_errors_total", (("kind", kind), *labels))] == 0


def test_every_inference_series_carries_the_revision(revisioned) -> None:
    with httpx.Client(base_url=revisioned.url, timeout=WAIT_S) as client:
        assert client.post("/v2/models/search/infer", json=_infer_body(_tokens())).is_success
        text = {"name": "query", "datatype": "BYTES", "shape": [1, 1], "data": ["drill"]}
        item = {**text, "name": "item", "data": ["cordless drill"]}
        ok = client.post("/v2/models/search-text/infer", json={"inputs": [text, item]})
        assert ok.is_success, ok.text
        bad = client.post("/v2/models/search/infer", json=_infer_body(_tokens(length=64)))
        assert bad.status_code == 400
        metrics = client.get("/metrics").text
    inference = {
        (name, labels): value
        for (name, labels), value in _samples(metrics).items()
        if name.startswith("recjob_inference_")
    }
    assert inference and all(dict(labels)["revision"] == REVISION for _, labels in inference)
    names = {name for name, _ in inference}
    assert {"recjob_inference_latency_seconds_bucket", "recjob_inference_rows_total"} <= names
    by_model = {
        dict(labels)["model"]: value
        for (name, labels), value in inference.items()
        if name == "recjob_inference_requests_total"
    }
    assert by_model["search"] >= 2 and by_model["search-text"] >= 1
    errors = {
        dict(labels)["kind"]: value
        for (name, labels), value in inference.items()
        if name == "recjob_inference_errors_total" and dict(labels)["model"] == "search"
    }
    assert errors["invalid_input"] >= 1


# --- the header ------------------------------------------------------------------------


def test_every_http_response_carries_the_revision_header(revisioned) -> None:
    with httpx.Client(base_url=revisioned.url, timeout=WAIT_S) as client:
        responses = {
            "infer": client.post("/v2/models/search/infer", json=_infer_body(_tokens())),
            "bad infer": client.post("/v2/models/search/infer", json={"inputs": "x"}),
            "unknown model": client.post("/v2/models/nope/infer", json=_infer_body(_tokens())),
            "unknown path": client.get("/nowhere"),
            "ready": client.get("/v2/health/ready"),
            "metadata": client.get("/v2/models/search"),
            "metrics": client.get("/metrics"),
            "model control": client.post("/v2/repository/models/search/unload"),
            "feedback": _post_feedback(
                client, {"revision": REVISION, "clicked": False, "gain": 0.0}
            ),
            "feedback GET": client.get("/v2/feedback"),
            "too large": client.post(
                "/v2/models/search/infer",
                content=b" " * (MAX_BODY + 1),
                headers={"content-type": "application/json"},
            ),
        }
    statuses = {name: r.status_code for name, r in responses.items()}
    assert statuses["infer"] == statuses["ready"] == statuses["feedback"] == 200, statuses
    assert 400 <= statuses["bad infer"] < 500 and statuses["too large"] == 413, statuses
    assert statuses["unknown model"] == statuses["unknown path"] == 404, statuses
    assert statuses["model control"] == 403 and statuses["feedback GET"] == 405, statuses
    missing = {name for name, r in responses.items() if r.headers.get(HEADER) != REVISION}
    assert not missing, missing
    assert all(len(r.headers.get_list(HEADER)) == 1 for r in responses.values())


def test_a_timed_out_request_carries_the_revision_header(revisioned) -> None:
    with socket.create_connection(("127.0.0.1", revisioned.http), timeout=WAIT_S) as connection:
        connection.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")  # never finished
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 408 "), data[:300]
    assert f"{HEADER}: {REVISION}" in head.splitlines(), head


GRPC_METADATA = """
import json, sys, grpc
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
stub = GRPCInferenceServiceStub(grpc.insecure_channel(sys.argv[1]))
_, call = stub.ServerLive.with_call(pb.ServerLiveRequest())
out = {"live": dict(call.initial_metadata())}
try:
    stub.ModelInfer(pb.ModelInferRequest(model_name="nope"))
except grpc.RpcError as error:
    out["error"] = [str(error.code()), dict(error.initial_metadata())]
print(json.dumps(out))
"""


def test_grpc_calls_send_the_revision_as_initial_metadata(revisioned) -> None:
    result = subprocess.run(
        [sys.executable, "-c", GRPC_METADATA, f"127.0.0.1:{revisioned.grpc}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["live"].get(HEADER) == REVISION, out
    assert out["error"][0] == "StatusCode.NOT_FOUND" and out["error"][1].get(HEADER) == REVISION


# --- feedback --------------------------------------------------------------------------


def test_feedback_is_counted_for_the_servers_own_revision_only(revisioned) -> None:
    with httpx.Client(base_url=revisioned.url, timeout=WAIT_S) as client:
        before = _feedback_values(client.get("/metrics").text, REVISION)
        for event in (
            {"revision": REVISION, "clicked": True, "gain": 0.5},
            {"revision": REVISION, "clicked": False, "gain": 0.25},
            {"revision": REVISION, "clicked": False, "gain": 0},
        ):
            response = _post_feedback(client, event)
            assert response.status_code == 200, response.text
        other = _post_feedback(client, {"revision": "search-v2", "clicked": True, "gain": 1.0})
        metrics = client.get("/metrics").text
    assert other.status_code == 409, other.text
    assert "'search-v2'" in other.json()["error"] and f"'{REVISION}'" in other.json()["error"]
    after = _feedback_values(metrics, REVISION)
    assert after["impressions"] - before["impressions"] == 3
    assert after["clicks"] - before["clicks"] == 1
    assert after["gain"] - before["gain"] == pytest.approx(0.75)
    assert 'revision="search-v2"' not in metrics  # no series for another revision


#: (body, what the 400's message says): every way a feedback body can be wrong.
BAD_FEEDBACK = [
    (b'{"revision": "search-v3", "clicked": true, "gain": NaN}', "finite number >= 0"),
    (b'{"revision": "search-v3", "clicked": true, "gain": Infinity}', "finite number >= 0"),
    (b'{"revision": "search-v3", "clicked": true, "gain": 1e400}', "finite number >= 0"),
    (b'{"revision": "search-v3", "clicked": true, "gain": -0.5}', "finite number >= 0"),
    (b'{"revision": "search-v3", "clicked": true, "gain": -1}', "finite number >= 0"),
    (b'{"revision": "search-v3", "clicked": true, "gain": 1' + b"0" * 400 + b"}",
     "finite number >= 0"),
    (b'{"revision": "search-v3", "clicked": true, "gain": 2e6}', "at most"),
    (b'{"revision": "search-v3", "clicked": true, "gain": "0.5"}', "gain must be a number"),
    (b'{"revision": "search-v3", "clicked": true, "gain": true}', "gain must be a number"),
    (b'{"revision": "search-v3", "clicked": true, "gain": null}', "gain must be a number"),
    (b'{"revision": "search-v3", "clicked": true}', "lacks gain"),
    (b'{"revision": "search-v3", "gain": 0.5}', "lacks clicked"),
    (b'{"clicked": true, "gain": 0.5}', "lacks revision"),
    (b"{}", "lacks revision, clicked, gain"),
    (b'{"revision": "search-v3", "clicked": "yes", "gain": 0.5}', "clicked must be"),
    (b'{"revision": "search-v3", "clicked": 1, "gain": 0.5}', "clicked must be"),
    (b'{"revision": 3, "clicked": true, "gain": 0.5}', "revision must be"),
    (b'{"revision": "", "clicked": true, "gain": 0.5}', "revision must be"),
    (b'{"revision": "search-v3", "clicked": true, "gain": 0.5, "k": 10}', "unknown feedback"),
    (b'[{"revision": "search-v3", "clicked": true, "gain": 0.5}]', "JSON object"),
    (b'"search-v3"', "JSON object"),
    (b'{"revision": "search-v3", "clicked": true,', "not JSON"),
    (b"", "not JSON"),
    (b"\xff\xfe{}", "not JSON"),
]  # fmt: skip


def test_bad_feedback_gets_400_and_counts_nothing(revisioned) -> None:
    with httpx.Client(base_url=revisioned.url, timeout=WAIT_S) as client:
        before = _feedback_values(client.get("/metrics").text, REVISION)
        for body, message in BAD_FEEDBACK:
            response = _post_feedback(client, body)
            assert response.status_code == 400, (body, response.status_code, response.text)
            assert message in response.json()["error"], (body, response.text)
        huge = b'{"revision": "search-v3", "clicked": true, "gain": 0.5' + b" " * MAX_BODY + b"}"
        too_large = _post_feedback(client, huge)
        assert too_large.status_code == 413 and "--max-body-bytes" in too_large.text
        after = _feedback_values(client.get("/metrics").text, REVISION)
    assert after == before and all(math.isfinite(v) for v in after.values())


def test_the_router_and_the_server_judge_feedback_alike() -> None:
    good = [
        b'{"revision": "r", "clicked": false, "gain": 0}',
        b'{"revision": "r", "clicked": true, "gain": 0.93}',
        b'{"gain": 1e6, "clicked": true, "revision": "search-v3"}',
    ]
    for body in good:
        event = feedback.parse_feedback(body)
        assert router.parse_feedback(body) == (event.revision, event.clicked, event.gain)
    for body, _ in BAD_FEEDBACK:
        with pytest.raises(feedback.FeedbackError) as server_error:
            feedback.parse_feedback(body)
        with pytest.raises(ValueError) as router_error:
            router.parse_feedback(body)
        assert str(server_error.value) == str(router_error.value), body


# --- without a revision ----------------------------------------------------------------


def test_a_server_without_revision_has_empty_labels_no_header_and_refuses_feedback(
    repository,  # noqa: F811
    tmp_path: Path,
) -> None:
    repo, _ = repository
    with _revision_env(None):
        running = Server(repo, tmp_path / "server.log")
    try:
        with httpx.Client(base_url=running.url, timeout=WAIT_S) as client:
            infer = client.post("/v2/models/search/infer", json=_infer_body(_tokens()))
            event = {"revision": REVISION, "clicked": True, "gain": 1.0}
            refused = _post_feedback(client, event)
            metrics = client.get("/metrics").text
    finally:
        assert running.stop() == 0
    assert infer.status_code == 200 and HEADER not in infer.headers
    assert refused.status_code == 409 and "no revision configured" in refused.json()["error"]
    samples = _samples(metrics)
    requests = [dict(k) for (n, k) in samples if n == "recjob_inference_requests_total"]
    assert requests and all(labels["revision"] == "" for labels in requests)
    assert not any(n.startswith("recjob_feedback_") for n, _ in samples)  # no series


@pytest.mark.parametrize("name", ["search v3", "-v3", "a" * 254, "v3\r\nx-evil: 1", "ü"])
def test_a_revision_that_is_not_a_name_is_refused(repository, name: str) -> None:  # noqa: F811
    repo, _ = repository
    with _revision_env(name):  # from the environment as from the flag
        result = subprocess.run(
            [str(BIN / "recjob-serve"), "serve", str(repo), "--http-port", "0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 2 and "is not a name" in result.stderr, result.stderr[-2000:]


# --- rollout queries name metrics the server exports ------------------------------------


#: Labels a scrape adds to every series (Prometheus targets, ServiceMonitor relabelling).
TARGET_LABELS = {"namespace", "service", "pod", "container", "endpoint", "job", "instance"}
SELECTOR = re.compile(r"\b(recjob_[a-z0-9_]+)\s*(\{[^}]*\})?")


def rollout_queries() -> list[tuple[str, str]]:
    """(where, query) of every rollout metric in examples/, manifests/samples/ and the
    API's defaults."""
    queries = [("defaults", check.query) for check in _default_metrics()]
    files = sorted(REPO.glob("examples/**/*.yaml")) + sorted(REPO.glob("manifests/samples/*.yaml"))
    for path in files:
        for document in yaml.safe_load_all(path.read_text()):
            rollout = ((document or {}).get("spec") or {}).get("rollout") or {}
            for check in rollout.get("metrics") or []:
                queries.append((f"{path.relative_to(REPO)}:{check['name']}", check["query"]))
    return queries


def test_rollout_queries_name_only_metrics_and_labels_the_server_exports(revisioned) -> None:
    with httpx.Client(base_url=revisioned.url, timeout=WAIT_S) as client:
        assert client.post("/v2/models/search/infer", json=_infer_body(_tokens())).is_success
        metrics = client.get("/metrics").text
    exported: dict[str, set[str]] = {}  # sample name -> its label names
    for family in text_string_to_metric_families(metrics):
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created", ""),
        }.get(family.type, ("",))
        labels = {name for s in family.samples for name in s.labels}
        for suffix in suffixes:
            exported[family.name + suffix] = labels - ({"le"} if suffix != "_bucket" else set())
    queries = rollout_queries()
    assert len(queries) >= 10 and any(w.startswith("examples/recjob-search") for w, _ in queries)
    used = set()
    for where, query in queries:
        for name, selector in SELECTOR.findall(query):
            used.add(name)
            assert name in exported, f"{where}: {name} is exported by no component"
            label_names = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector or ""))
            unknown = label_names - exported[name] - TARGET_LABELS
            assert not unknown, f"{where}: {name} has no label(s) {unknown}"
    assert {"recjob_feedback_gain_total", "recjob_feedback_impressions_total"} <= used
