"""Local mode's parts on their own: router weights and metrics, replay maths, report
statistics, Prometheus readings, generations from spec changes, managed processes."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from recjob_operator.api.v1alpha1.spec_delivery import MetricCheck
from recjob_operator.api.validation import parse_recjob
from recjob_operator.local.processes import ManagedProcess, group_members
from recjob_operator.local.replay import ndcg_at_k, served_order
from recjob_operator.local.report import live_business_metrics, wilson
from recjob_operator.local.router import Routes, make_app
from recjob_operator.local.run import restore, save
from recjob_operator.prometheus import PrometheusSource
from tests.conftest import MINIMAL


def test_ndcg_at_k_and_served_order() -> None:
    assert ndcg_at_k([1.0, 0.0, 0.0], 5) == 1.0
    assert ndcg_at_k([0.0, 0.0, 1.0], 5) == pytest.approx(0.5)
    assert ndcg_at_k([0.0] * 6 + [1.0], 5) == 0.0
    response = {"outputs": [{"name": "score", "shape": [3, 1], "data": [0.1, 0.9, 0.5]}]}
    assert served_order({"items": ["a", "b", "c"]}, response) == [1, 2, 0]
    embeddings = {"outputs": [{"name": "embedding", "shape": [3, 2],
                               "data": [1, 0, 0, 1, 1, 0]}]}  # fmt: skip
    assert served_order({"user": "u", "items": ["x", "y"]}, embeddings) == [1, 0]


def test_wilson_interval_and_live_metrics_parse() -> None:
    low, high = wilson(50, 100)
    assert low < 0.5 < high and high - low == pytest.approx(0.19, abs=0.01)
    text = (
        'recjob_feedback_impressions_total{revision="svc-v1"} 100.0\n'
        'recjob_feedback_clicks_total{revision="svc-v1"} 40.0\n'
        'recjob_feedback_gain_total{revision="svc-v1"} 30.0\n'
        'recjob_inference_requests_total{revision="svc-v1"} 101.0\n'
        'recjob_feedback_impressions_total{revision="svc-v2"} 0.0\n'
    )
    live = live_business_metrics(text)
    assert live["svc-v1"]["ctr"] == 0.4 and live["svc-v1"]["mean_gain"] == 0.3
    assert live["svc-v1"]["requests"] == 101.0 and live["svc-v2"]["ctr"] is None


def test_router_splits_by_weight_and_counts_per_revision(tmp_path: Path) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def scenario() -> None:
        async def upstream_app(name: str, status: int) -> TestServer:
            app = web.Application()

            async def infer(request: web.Request) -> web.Response:
                return web.json_response({"model": name}, status=status)

            app.router.add_post("/v2/models/m/infer", infer)
            server = TestServer(app, host="127.0.0.1")
            await server.start_server()
            return server

        stable, canary = await upstream_app("stable", 200), await upstream_app("canary", 500)
        routes = tmp_path / "routes.json"
        routes.write_text(json.dumps({
            "stable": {"url": str(stable.make_url("")).rstrip("/"), "revision": "s-v1"},
            "canary": {"url": str(canary.make_url("")).rstrip("/"), "revision": "s-v2"},
            "weight": 25,
        }))  # fmt: skip
        client = TestClient(TestServer(make_app(Routes(routes, seed=1))))
        await client.start_server()
        seen = {"s-v1": 0, "s-v2": 0}
        for _ in range(400):
            response = await client.post("/v2/models/m/infer", json={"inputs": []})
            seen[response.headers["x-recjob-revision"]] += 1
            expected = 200 if response.headers["x-recjob-revision"] == "s-v1" else 500
            assert response.status == expected
        assert 60 < seen["s-v2"] < 140  # ~25%
        bad = await client.post("/feedback", json={"clicked": True})
        assert bad.status == 400
        ok = await client.post("/feedback", json={"revision": "s-v1", "clicked": True, "gain": 1})
        assert ok.status == 200
        metrics = await (await client.get("/metrics")).text()
        live = live_business_metrics(metrics)
        assert live["s-v2"]["errors"] == live["s-v2"]["requests"] == seen["s-v2"]
        assert live["s-v1"]["errors"] == 0 and live["s-v1"]["clicks"] == 1
        routes.write_text(json.dumps({"stable": None, "canary": None, "weight": 0}))
        time.sleep(0.01)
        empty = await client.post("/v2/models/m/infer", json={"inputs": []})
        assert empty.status == 503
        await client.close()
        await stable.close()
        await canary.close()

    asyncio.run(scenario())


def test_router_feedback_is_checked_and_counted_for_served_revisions_only(
    tmp_path: Path,
) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    async def scenario() -> None:
        routes = tmp_path / "routes.json"
        routes.write_text(json.dumps({
            "stable": {"url": "http://127.0.0.1:9", "revision": "fb-v1"},
            "canary": {"url": "http://127.0.0.1:9", "revision": "fb-v2"}, "weight": 10,
        }))  # fmt: skip
        client = TestClient(TestServer(make_app(Routes(routes))))
        await client.start_server()

        async def post(body: bytes) -> tuple[int, dict]:
            response = await client.post(
                "/feedback", data=body, headers={"Content-Type": "application/json"}
            )
            return response.status, await response.json()

        for body, message in (
            (b'{"revision": "fb-v1", "clicked": true, "gain": NaN}', "finite number >= 0"),
            (b'{"revision": "fb-v1", "clicked": true, "gain": Infinity}', "finite number >= 0"),
            (b'{"revision": "fb-v1", "clicked": true, "gain": -0.5}', "finite number >= 0"),
            (b'{"revision": "fb-v1", "clicked": true, "gain": 1e400}', "finite number >= 0"),
            (b'{"revision": "fb-v1", "clicked": true, "gain": "1"}', "gain must be a number"),
            (b'{"revision": "fb-v1", "gain": 0.5}', "lacks clicked"),
            (b'{"revision": "fb-v1", "clicked": 1, "gain": 0.5}', "clicked must be"),
            (b'{"revision": ["fb-v1"], "clicked": true, "gain": 0.5}', "revision must be"),
            (b"[]", "JSON object"),
            (b"{not json", "not JSON"),
        ):
            status, answer = await post(body)
            assert status == 400 and message in answer["error"], (body, status, answer)
        status, answer = await post(b'{"revision": "fb-v9", "clicked": true, "gain": 0.5}')
        assert status == 409, answer
        assert all(name in answer["error"] for name in ("'fb-v9'", "fb-v1", "fb-v2")), answer
        for revision, clicked, gain in (("fb-v1", True, 0.5), ("fb-v2", False, 0.25)):
            event = {"revision": revision, "clicked": clicked, "gain": gain}
            status, answer = await post(json.dumps(event).encode())
            assert status == 200, answer
        metrics = await (await client.get("/metrics")).text()
        live = live_business_metrics(metrics)
        assert live["fb-v1"]["impressions"] == 1 and live["fb-v1"]["clicks"] == 1
        assert live["fb-v1"]["gain"] == 0.5 and live["fb-v2"]["gain"] == 0.25
        feedback_lines = [x for x in metrics.splitlines() if x.startswith("recjob_feedback_")]
        assert not any("fb-v9" in x or "NaN" in x or "Inf" in x for x in feedback_lines)
        routes.write_text(json.dumps({"stable": None, "canary": None, "weight": 0}))
        time.sleep(0.01)  # a new mtime: the table is re-read
        status, answer = await post(b'{"revision": "fb-v1", "clicked": true, "gain": 0.5}')
        assert status == 409 and "none" in answer["error"], answer
        await client.close()

    asyncio.run(scenario())


class _FakePrometheus(BaseHTTPRequestHandler):
    answers: dict = {}

    def do_GET(self) -> None:
        from urllib.parse import parse_qs, urlparse

        query = parse_qs(urlparse(self.path).query)["query"][0]
        status, body = self.answers[query]
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


def test_prometheus_readings_value_no_data_and_errors() -> None:
    def vector(*values):
        return {"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {}, "value": [0, str(v)]} for v in values]}}  # fmt: skip

    _FakePrometheus.answers = {
        'ok{revision="c",namespace="n"}': (200, vector(0.25)),
        'empty{revision="c",namespace="n"}': (200, vector()),
        'isnan{revision="c",namespace="n"}': (200, vector("NaN")),
        'many{revision="c",namespace="n"}': (200, vector(1, 2)),
        'bad{revision="c",namespace="n"}': (
            400,
            {"status": "error", "errorType": "bad_data", "error": "parse error"},
        ),
    }
    server = HTTPServer(("127.0.0.1", 0), _FakePrometheus)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        source = PrometheusSource(f"http://127.0.0.1:{server.server_port}")
        checks = [
            MetricCheck(
                name=name,
                query=name + '{revision="{{revision}}",namespace="{{namespace}}"}',
                max=1.0,
            )
            for name in ("ok", "empty", "isnan", "many", "bad")
        ]
        values = {"revision": "c", "namespace": "n"}
        readings = {r.metric: r for r in source.read(checks, values)}
        assert readings["ok"].value == 0.25 and readings["ok"].error is None
        assert readings["empty"].value is None and readings["empty"].error is None
        assert readings["isnan"].value is None and readings["isnan"].error is None
        assert "aggregate it to one number" in readings["many"].error
        assert "bad_data: parse error" in readings["bad"].error
    finally:
        server.shutdown()
    down = PrometheusSource("http://127.0.0.1:9", budget=0.5)
    (reading,) = down.read(checks[:1], values)
    assert reading.error and "unreachable" in reading.error


def test_a_changed_spec_is_a_new_generation(tmp_path: Path) -> None:
    job = restore(parse_recjob(copy.deepcopy(MINIMAL)), tmp_path)
    assert job.generation == 1
    (tmp_path / "minimal").mkdir()
    save(job, tmp_path)
    assert restore(parse_recjob(copy.deepcopy(MINIMAL)), tmp_path).generation == 1
    changed = copy.deepcopy(MINIMAL)
    changed["spec"]["training"] = {"learningRate": 1e-4}
    assert restore(parse_recjob(changed), tmp_path).generation == 2


def test_a_rollout_edit_keeps_the_model_generation_and_its_folder(tmp_path: Path) -> None:
    """Local mode runs the core's decision: a rollout edit is a new generation that keeps
    the training folder and child names; a training edit moves to model generation 2."""
    from datetime import UTC, datetime

    from recjob_operator.controller.reconcile import CreateTraining, Observed, reconcile
    from recjob_operator.local.backend import LocalBackend

    source = tmp_path / "recjob.yaml"
    backend = LocalBackend(tmp_path, source)
    job = restore(parse_recjob(copy.deepcopy(MINIMAL)), tmp_path)
    (tmp_path / "minimal").mkdir()
    decision = reconcile(job, Observed(), None, datetime.now(UTC))
    assert CreateTraining("minimal-g1-train") in decision.actions
    job.status = decision.status
    save(job, tmp_path)
    edited = copy.deepcopy(MINIMAL)
    edited["spec"]["rollout"] = {"steps": [5, 100], "interval": "10s"}
    job = restore(parse_recjob(edited), tmp_path)
    assert job.generation == 2 and backend.generation_dir(job) == tmp_path / "minimal" / "g1"
    decision = reconcile(job, Observed(), None, datetime.now(UTC))
    assert decision.status.model_generation == 1 and decision.status.observed_generation == 2
    assert CreateTraining("minimal-g1-train") in decision.actions  # the same child, by name
    job.status = decision.status
    save(job, tmp_path)
    edited["spec"]["training"] = {"learningRate": 1e-4}
    job = restore(parse_recjob(edited), tmp_path)
    assert job.generation == 3 and backend.generation_dir(job) == tmp_path / "minimal" / "g2"
    assert backend.conversion_part(job) == "convert"


def test_managed_process_survives_its_parent_record_and_stops_its_group(tmp_path: Path) -> None:
    process = ManagedProcess(tmp_path, "sleeper")
    process.start(["bash", "-c", "sleep 60 & sleep 60"])
    assert process.alive() and process.exit_code() is None
    again = ManagedProcess(tmp_path, "sleeper")  # what a restarted run finds
    assert again.alive() and again.info()["pid"] == process.info()["pid"]
    pid = process.info()["pid"]
    deadline = time.time() + 10
    while len(group_members(pid)) < 3 and time.time() < deadline:  # wrapper, bash, 2 sleeps
        time.sleep(0.05)
    assert len(group_members(pid)) >= 3
    again.stop(timeout=5)
    assert group_members(pid) == [] and not again.alive()
    done = ManagedProcess(tmp_path, "quick")
    done.start(["bash", "-c", "exit 7"])
    deadline = time.time() + 10
    while done.exit_code() is None and time.time() < deadline:
        time.sleep(0.05)
    assert done.exit_code() == 7


def test_training_progress_follows_compression_stages(tmp_path: Path) -> None:
    from recjob_operator.local.backend import _training_progress

    assert _training_progress(tmp_path) is None
    events = [
        {"event": "start", "total_steps": 4},
        {"event": "progress", "step": 4, "total_steps": 4, "loss": 0.5},
        {"event": "checkpoint", "step": 4},
        {"event": "resumed", "step": 2, "stage": "distill"},
        {"event": "start", "total_steps": 8, "stage": "distill"},
    ]
    path = tmp_path / "progress.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + "not json\n")
    assert _training_progress(tmp_path) == {
        "stage": "distill", "step": 2, "total_steps": 8, "resumed_from_step": 2
    }  # fmt: skip
    with path.open("a") as handle:
        handle.write(json.dumps({"event": "progress", "step": 4, "total_steps": 8,
                                 "loss": 0.1, "stage": "distill"}) + "\n")  # fmt: skip
    progress = _training_progress(tmp_path)
    assert (progress["stage"], progress["step"], progress["loss"]) == ("distill", 4, 0.1)
    assert progress["resumed_from_step"] == 2
