"""`recjob-serve serve` and `recjob-serve bench` against a real repository, in subprocesses,
with tritonclient (HTTP and gRPC) and raw HTTP for malformed requests."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from recjob_operator.local.processes import free_port
from recjob_serving.export import export_onnx, run_onnx
from recjob_serving.repository import (
    parse_config,
    publish,
    publish_text_models,
    text_model_names,
)
from recjob_trainer.models import load_model
from tests.serving.test_export_gate import saved_model

BIN = Path(sys.executable).parent
CLIENT = Path(__file__).with_name("oip_client.py")
PAIRS = [
    ("cordless drill", "dewalt 20v max cordless drill driver kit"),
    ("pvc elbow", "charlotte pipe 1/2 in. pvc sch. 40 90-degree elbow"),
    ("light bulb", "philips 60w equivalent soft white a19 led light bulb"),
    ("deck screws", "grip-rite #8 x 2-1/2 in. exterior deck screws"),
    ("garden hose", "flexzilla 5/8 in. x 50 ft. garden hose"),
]


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    """A repository with the search model (fp32 ONNX), its tokenizer and the ensemble."""
    tmp = tmp_path_factory.mktemp("repo")
    model_dir = saved_model(tmp, "cross-encoder")
    exported = export_onnx(model_dir, tmp / "model.onnx")
    repo = tmp / "repo"
    card = {"kind": "cross-encoder", "max_length": 32}
    version = publish(repo, "search", exported.path, card, max_batch_size=16)
    publish_text_models(repo, "search", model_dir / "tokenizer", "cross-encoder", 32, 16, version)
    yield repo, model_dir
    shutil.rmtree(tmp, ignore_errors=True)  # one per module that uses it: CI's disk


class Server:
    """A `recjob-serve serve` subprocess on free loopback ports."""

    def __init__(self, repo: Path, log: Path, *extra: str):
        self.http, self.grpc = free_port(), free_port()
        self.log = log
        self.process = subprocess.Popen(
            [
                str(BIN / "recjob-serve"),
                "serve",
                str(repo),
                "--http-port",
                str(self.http),
                "--grpc-port",
                str(self.grpc),
                "--grace-period",
                "2",
                *extra,
            ],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(log.read_text()[-3000:])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    repo, _ = repository
    running = Server(repo, tmp_path_factory.mktemp("log") / "server.log")
    yield running
    if running.process.poll() is None:
        running.stop()


def in_process_scores(model_dir: Path, onnx_path: Path) -> tuple[list[float], dict]:
    """What ONNX Runtime in this process gives for PAIRS, and the token batch used."""
    _, tokenizer = load_model(model_dir)
    queries, items = zip(*PAIRS, strict=True)
    tokens = tokenizer(
        list(queries), list(items), padding=True, truncation=True, max_length=32,
        return_tensors="np",
    )  # fmt: skip
    names = ("input_ids", "attention_mask", "token_type_ids")
    batch = {k: tokens[k].astype(np.int64) for k in names}
    return run_onnx(onnx_path, batch)[0].reshape(-1).tolist(), batch


def run_client(protocol: str, url: str, job: dict) -> dict:
    result = subprocess.run(
        [sys.executable, str(CLIENT), protocol, url],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_text_models_configs_parse_and_chain(repository) -> None:
    repo, _ = repository
    tokenizer_name, ensemble_name = text_model_names("search")
    tokenizer = parse_config((repo / tokenizer_name / "config.pbtxt").read_text())
    ensemble = parse_config((repo / ensemble_name / "config.pbtxt").read_text())
    model = parse_config((repo / "search" / "config.pbtxt").read_text())
    assert tokenizer.backend == "python" and ensemble.platform == "ensemble"
    assert tokenizer.parameters["kind"].string_value == "cross-encoder"
    assert [i.name for i in ensemble.input] == ["query", "item"]
    assert [o.name for o in ensemble.output] == [o.name for o in model.output]
    first, second = ensemble.ensemble_scheduling.step
    assert first.model_name == tokenizer_name and second.model_name == "search"
    assert set(first.output_map.values()) == set(second.input_map.values())
    assert set(second.input_map) == {i.name for i in model.input}
    assert (repo / tokenizer_name / "1" / "model.py").exists()
    assert (repo / tokenizer_name / "1" / "tokenizer" / "tokenizer.json").exists()
    assert (repo / ensemble_name / "1").is_dir()


def test_tokenizer_backend_runs_its_model_py(repository) -> None:
    from recjob_serving.python_backend import PythonBackendModel, TritonError

    repo, model_dir = repository
    name, _ = text_model_names("search")
    config = parse_config((repo / name / "config.pbtxt").read_text())
    backend = PythonBackendModel(repo / name, 1, config)
    queries = np.array([[b"drill"], [b"hose"]], dtype=np.object_)
    items = np.array([[b"cordless drill"], [b"garden hose " * 40]], dtype=np.object_)
    out = backend.execute({"query": queries, "item": items})
    _, tokenizer = load_model(model_dir)
    expected = tokenizer(
        ["drill", "hose"], ["cordless drill", "garden hose " * 40],
        padding=True, truncation=True, max_length=32, return_tensors="np",
    )  # fmt: skip
    assert out["input_ids"].shape == (2, 32)  # truncated to max_length
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(out[key], expected[key])
    with pytest.raises(TritonError, match="utf-8"):
        backend.execute({"query": np.array([[b"\xff"]], np.object_), "item": items[:1]})
    # several requests in one execute (Triton's dynamic batching of a Python model): each
    # answered on its own, padded to its own longest text, a bad one failing alone
    good, bad, short = backend.execute_many([
        {"query": queries, "item": items},
        {"query": np.array([[b"\xff"]], np.object_), "item": items[:1]},
        {"query": queries[:1], "item": items[:1]},
    ])  # fmt: skip
    np.testing.assert_array_equal(good["input_ids"], expected["input_ids"])
    assert isinstance(bad, TritonError) and "utf-8" in bad.message()
    assert short["input_ids"].shape[1] < 32


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tritonclient_gets_the_in_process_scores(server, repository, protocol) -> None:
    repo, model_dir = repository
    expected, batch = in_process_scores(model_dir, repo / "search" / "1" / "model.onnx")
    url = f"127.0.0.1:{server.http if protocol == 'http' else server.grpc}"
    job = {
        "texts": PAIRS,
        "tokens": {k: v.tolist() for k, v in batch.items()},
        "bad": True,
    }
    out = run_client(protocol, url, job)
    assert out["live"] and out["ready"]
    assert out["metadata_inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    np.testing.assert_allclose(out["text_scores"], expected, atol=1e-5)
    np.testing.assert_allclose(out["token_scores"], expected, atol=1e-5)
    assert out["text_version"] == "1"
    codes = [e.split(" ", 1)[0] for e in out["bad"]]
    if protocol == "http":
        assert codes == ["400", "400", "400", "400", "404", "400"], out["bad"]
    else:
        assert codes == ["StatusCode.INVALID_ARGUMENT"] * 4 + ["StatusCode.NOT_FOUND"] + [
            "StatusCode.INVALID_ARGUMENT"
        ], out["bad"]
    assert "datatype FP32; expected INT64" in out["bad"][0]
    assert "unknown input 'nope'" in out["bad"][1]
    assert "missing input 'attention_mask'" in out["bad"][2]
    assert "missing input 'item'" in out["bad"][3]
    assert "utf-8" in out["bad"][5].lower()
    np.testing.assert_allclose(out["after_bad"], expected, atol=1e-5)


def _infer_body(inputs: list[dict], **extra) -> dict:
    return {"inputs": inputs, **extra}


def _tokens(batch: int = 1, length: int = 4, **overrides) -> list[dict]:
    def tensor(name: str, value: int) -> dict:
        return {
            "name": name,
            "datatype": "INT64",
            "shape": [batch, length],
            "data": [value] * (batch * length),
        }

    inputs = [tensor("input_ids", 1000), tensor("attention_mask", 1), tensor("token_type_ids", 0)]
    for name, change in overrides.items():
        for t in inputs:
            if t["name"] == name:
                t.update(change)
    return inputs


def malformed_requests() -> list[tuple[str, str, bytes, dict]]:
    """(description, path, body, headers): many kinds of bad request."""
    json_headers = {"Content-Type": "application/json"}
    infer = "/v2/models/search/infer"
    text = "/v2/models/search-text/infer"

    def j(body) -> bytes:
        return json.dumps(body).encode()

    cases = [
        ("not json", infer, b"{not json", json_headers),
        ("json array", infer, j([1, 2, 3]), json_headers),
        ("no inputs", infer, j({}), json_headers),
        ("inputs not a list", infer, j({"inputs": "x"}), json_headers),
        ("empty inputs", infer, j({"inputs": []}), json_headers),
        ("unknown input", infer, j(_infer_body(_tokens(input_ids={"name": "ids"}))), json_headers),
        ("wrong datatype", infer, j(_infer_body(_tokens(input_ids={"datatype": "FP32"}))),
         json_headers),
        ("bogus datatype", infer, j(_infer_body(_tokens(input_ids={"datatype": "INT77"}))),
         json_headers),
        ("rank 1", infer, j(_infer_body(_tokens(input_ids={"shape": [4]}))), json_headers),
        ("rank 3", infer, j(_infer_body(_tokens(input_ids={"shape": [1, 4, 1]}))), json_headers),
        ("negative dim", infer, j(_infer_body(_tokens(input_ids={"shape": [-1, 4]}))),
         json_headers),
        ("data short", infer, j(_infer_body(_tokens(input_ids={"data": [1, 2]}))), json_headers),
        ("data strings", infer, j(_infer_body(_tokens(input_ids={"data": ["a"] * 4}))),
         json_headers),
        ("data nested junk", infer, j(_infer_body(_tokens(input_ids={"data": [{"a": 1}] * 4}))),
         json_headers),
        ("id out of vocabulary", infer,
         j(_infer_body(_tokens(input_ids={"data": [10**9] * 4}))), json_headers),
        ("negative id", infer, j(_infer_body(_tokens(input_ids={"data": [-5] * 4}))),
         json_headers),
        ("mask not 0/1", infer, j(_infer_body(_tokens(attention_mask={"data": [7] * 4}))),
         json_headers),
        ("too long", infer, j(_infer_body(_tokens(length=64))), json_headers),
        ("batch over max", infer, j(_infer_body(_tokens(batch=17))), json_headers),
        ("empty batch", infer, j(_infer_body(_tokens(batch=0))), json_headers),
        ("batch disagreement", infer,
         j(_infer_body(_tokens(input_ids={"shape": [2, 2]}))), json_headers),
        ("huge shape", infer,
         j(_infer_body(_tokens(input_ids={"shape": [16, 10**8]}))), json_headers),
        ("duplicate input", infer, j(_infer_body(_tokens() + _tokens()[:1])), json_headers),
        ("unknown output", infer, j(_infer_body(_tokens(), outputs=[{"name": "nope"}])),
         json_headers),
        ("unknown model", "/v2/models/nope/infer", j(_infer_body(_tokens())), json_headers),
        ("v1 protocol", "/v1/models/search:predict", j({"instances": [[1, 2]]}), json_headers),
        ("text missing item", text,
         j({"inputs": [{"name": "query", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]}]}),
         json_headers),
        ("text as INT64", text,
         j({"inputs": [
             {"name": "query", "datatype": "INT64", "shape": [1, 1], "data": [1]},
             {"name": "item", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]}]}),
         json_headers),
        ("binary header cuts the JSON", infer, j(_infer_body(_tokens())),
         {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "5"}),
        ("binary size mismatch", infer,
         j({"inputs": [dict(t, parameters={"binary_data_size": 3}, data=None)
                       for t in _tokens()]}).replace(b',"data":null', b"") + b"abc",
         {"Content-Type": "application/octet-stream",
          "Inference-Header-Content-Length": str(len(
              j({"inputs": [dict(t, parameters={"binary_data_size": 3}, data=None)
                            for t in _tokens()]}).replace(b',"data":null', b"")))}),
    ]  # fmt: skip
    return cases


def test_a_thousand_malformed_requests_get_4xx_and_the_server_keeps_serving(server) -> None:
    cases = malformed_requests()
    statuses: dict[str, set[int]] = {}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        good = client.post(
            "/v2/models/search/infer",
            json=_infer_body(_tokens()),
        )
        assert good.status_code == 200, good.text
        for i in range(1000):
            name, path, body, headers = cases[i % len(cases)]
            response = client.post(path, content=body, headers=headers)
            statuses.setdefault(name, set()).add(response.status_code)
            assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
            message = response.json()
            assert message.get("error") or message.get("detail"), (name, response.text)
        again = client.post("/v2/models/search/infer", json=_infer_body(_tokens()))
        assert again.status_code == 200 and again.json() == good.json()
        metrics = client.get("/metrics").text
    assert server.process.poll() is None
    assert statuses["unknown model"] == {404}
    assert statuses["batch over max"] == {400}
    line = next(
        x
        for x in metrics.splitlines()
        if x.startswith('recjob_inference_errors_total{kind="invalid_input",model="search"')
    )
    assert float(line.split()[-1]) >= 500


def test_bench_reports_latency_percentiles(server, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(BIN / "recjob-serve"),
            "bench",
            f"127.0.0.1:{server.grpc}",
            "--protocol",
            "grpc",
            "--model",
            "search-text",
            "--concurrency",
            "2",
            "--batch-size",
            "4",
            "--requests",
            "24",
            "-o",
            str(tmp_path / "bench.json"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["succeeded"] == 24 and report["errors"] == {}
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert report["rows_per_s"] == pytest.approx(report["requests_per_s"] * 4)
    bad = subprocess.run(
        [str(BIN / "recjob-serve"), "bench", server.url.removeprefix("http://"),
         "--protocol", "http", "--model", "nope", "--requests", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_listens_on_loopback_only_and_stops_cleanly(repository, tmp_path: Path) -> None:
    repo, _ = repository
    running = Server(repo, tmp_path / "server.log", "--model-version", "1")
    process = psutil.Process(running.process.pid)
    connections = getattr(process, "net_connections", None) or process.connections
    listening = {
        c.laddr.port: c.laddr.ip for c in connections(kind="inet") if c.status == psutil.CONN_LISTEN
    }
    assert set(listening) == {running.http, running.grpc}
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip in listening.values()), listening
    assert running.stop() == 0
    for port in (running.http, running.grpc):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_serve_refuses_a_missing_repository_or_version(repository, tmp_path: Path) -> None:
    repo, _ = repository
    missing = subprocess.run(
        [str(BIN / "recjob-serve"), "serve", str(tmp_path / "nothing")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    version = subprocess.run(
        [str(BIN / "recjob-serve"), "serve", str(repo), "--model-version", "9",
         "--http-port", str(free_port()), "--grpc-port", str(free_port())],
        capture_output=True, text=True, timeout=120, env={**os.environ},
    )  # fmt: skip
    assert version.returncode == 2 and "has no version 9 (published: [1])" in version.stderr


def _batch_series(metrics: str, model: str) -> tuple[float, float]:
    """(batches, rows) of recjob_batch_size for ``model``."""
    values = {}
    for kind in ("count", "sum"):
        match = re.search(rf'recjob_batch_size_{kind}{{model="{model}"[^}}]*}} (\S+)', metrics)
        values[kind] = float(match.group(1)) if match else 0.0
    return values["count"], values["sum"]


def test_dynamic_batching_runs_concurrent_requests_of_different_lengths_exactly(
    server, repository
) -> None:
    """Concurrent single-pair requests, each tokenized to its own length, get the scores
    ONNX Runtime gives each alone, while the server ran them in fewer, padded batches."""
    repo, model_dir = repository
    _, tokenizer = load_model(model_dir)
    onnx_path = repo / "search" / "1" / "model.onnx"
    pairs = PAIRS * 6
    alone, bodies = [], []
    for query, item in pairs:
        tokens = tokenizer([query], [item], truncation=True, max_length=32, return_tensors="np")
        batch = {
            k: tokens[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")
        }
        alone.append(float(run_onnx(onnx_path, batch)[0].ravel()[0]))
        bodies.append({"inputs": [
            {"name": k, "datatype": "INT64", "shape": list(v.shape), "data": v.ravel().tolist()}
            for k, v in batch.items()
        ]})  # fmt: skip
    assert len({len(b["inputs"][0]["data"]) for b in bodies}) > 1  # real, different lengths
    url = f"http://127.0.0.1:{server.http}"

    async def send_all():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(client.post(f"{url}/v2/models/search/infer", json=b) for b in bodies)
            )

    before = _batch_series(httpx.get(f"{url}/metrics").text, "search")
    responses = asyncio.run(send_all())
    metrics = httpx.get(f"{url}/metrics").text
    after = _batch_series(metrics, "search")
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses][:3]
    served = [r.json()["outputs"][0]["data"][0] for r in responses]
    np.testing.assert_allclose(served, alone, rtol=0, atol=1e-4)
    batches, rows = after[0] - before[0], after[1] - before[1]
    assert rows == len(bodies)
    assert batches < len(bodies)  # some requests shared a run
    assert re.search(r'recjob_batch_queue_seconds_count\{model="search"[^}]*\} (\S+)', metrics)


def test_a_python_model_with_dynamic_batching_answers_each_request_of_its_batch(
    server, repository, tmp_path: Path
) -> None:
    """The tokenizer (Python backend) declared with dynamic batching: concurrent raw-text
    requests through the ensemble reach its ``execute`` together and each gets the scores
    the unbatched server gives; a malformed one among them gets its own 400 (a request's
    error inside a batched ``execute`` is tested in test_tokenizer_backend_...)."""
    repo, _ = repository
    batched = tmp_path / "repo"
    shutil.copytree(repo, batched, symlinks=True)
    tokenizer, ensemble = text_model_names("search")
    config = batched / tokenizer / "config.pbtxt"
    config.write_text(
        config.read_text() + "dynamic_batching {\n  max_queue_delay_microseconds: 0\n}\n"
    )
    bodies = [
        {"inputs": [
            {"name": "query", "datatype": "BYTES", "shape": [1, 1], "data": [query]},
            {"name": "item", "datatype": "BYTES", "shape": [1, 1], "data": [item]},
        ]}
        for query, item in PAIRS * 4
    ]  # fmt: skip

    async def send_all(url: str, payloads: list[dict]) -> list:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(client.post(f"{url}/v2/models/{ensemble}/infer", json=b) for b in payloads)
            )

    expected = [r.json()["outputs"] for r in asyncio.run(send_all(server.url, bodies[:5]))]
    bad = {"inputs": [{**bodies[0]["inputs"][0], "data": [[1, 2]]}, bodies[0]["inputs"][1]]}
    running = Server(batched, tmp_path / "server.log")
    try:
        responses = asyncio.run(send_all(running.url, [*bodies, bad]))
        metrics = httpx.get(f"{running.url}/metrics").text
    finally:
        running.stop()
    *good, refused = responses
    assert refused.status_code == 400
    assert all(r.status_code == 200 for r in good), [r.text for r in good][:2]
    for index, response in enumerate(good):
        score = response.json()["outputs"][0]["data"]
        want = next(
            o for o in expected[index % 5] if o["name"] == response.json()["outputs"][0]["name"]
        )
        np.testing.assert_allclose(score, want["data"], atol=1e-5)
    batches, rows = _batch_series(metrics, tokenizer)
    assert rows == len(bodies) and batches < rows  # requests shared execute calls
