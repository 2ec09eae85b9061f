"""Hostile clients against a real `recjob-serve serve` on loopback (issue 14): oversized
bodies, huge texts, half-sent requests and the model-control endpoints.

Counts and sizes are bounded; nothing asserts a duration: where the server used to hang,
a socket or client timeout fails the test instead.
"""

from __future__ import annotations

import json
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from recjob_serving.repository import parse_config, text_model_names
from tests.serving.test_server import (
    Server,
    _infer_body,
    _tokens,
    repository,  # noqa: F401  (module fixture)
)

MAX_BODY = 1_000_000
HEADER_TIMEOUT, READ_TIMEOUT = 4, 4
#: Longest wait for anything the server must do by itself (a timeout failing the test).
WAIT_S = 60


@pytest.fixture(scope="module")
def limited(repository, tmp_path_factory):  # noqa: F811
    """A server with a 1 MB body limit, 4 s header/read timeouts, model control off."""
    repo, _ = repository
    running = Server(
        repo,
        tmp_path_factory.mktemp("log") / "server.log",
        "--max-body-bytes", str(MAX_BODY),
        "--header-timeout", str(HEADER_TIMEOUT),
        "--read-timeout", str(READ_TIMEOUT),
    )  # fmt: skip
    yield running
    if running.process.poll() is None:
        running.stop()


def _connect(server: Server) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", server.http), timeout=WAIT_S)
    return connection


def _read_response(connection: socket.socket) -> tuple[int, bytes]:
    """Status and whole text the server sends until it closes (socket timeout: WAIT_S)."""
    data = b""
    try:
        while chunk := connection.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data.split(b" ", 2)[1]), data


def _text_request(query: str, item: str) -> dict:
    def text(name: str, value: str) -> dict:
        return {"name": name, "datatype": "BYTES", "shape": [1, 1], "data": [value]}

    return {"inputs": [text("query", query), text("item", item)]}


# --- 1. bodies -------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_before_it_is_read(limited) -> None:
    head = (
        "POST /v2/models/search/infer HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: application/json\r\nContent-Length: 135000000\r\n\r\n"
    )
    with _connect(limited) as connection:  # 135 MB announced, 64 KB sent: answered now
        connection.sendall(head.encode() + b'{"inputs": [' + b" " * 65536)
        status, data = _read_response(connection)
    assert status == 413, data[:500]
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert "over the limit of 1000000 bytes" in body["error"], body


def test_a_chunked_body_over_the_limit_is_refused(limited) -> None:
    head = (
        "POST /v2/models/search/infer HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    sent = 0
    with _connect(limited) as connection:
        connection.sendall(head.encode())
        try:  # at most 4x the limit, stopping as soon as the server answers
            while sent < 4 * MAX_BODY and not _readable(connection):
                connection.sendall(chunk)
                sent += 65536
            connection.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, data = _read_response(connection)
    assert status == 413, data[:500]
    assert b"--max-body-bytes" in data


def _readable(connection: socket.socket) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(connection, selectors.EVENT_READ)
        return bool(selector.select(timeout=0))


def test_bodies_under_the_limit_are_served_and_the_server_keeps_serving(limited) -> None:
    with httpx.Client(base_url=limited.url, timeout=WAIT_S) as client:
        good = client.post("/v2/models/search/infer", json=_infer_body(_tokens()))
        assert good.status_code == 200, good.text
        padded = json.dumps(_infer_body(_tokens())) + " " * (MAX_BODY - 10_000)
        response = client.post(
            "/v2/models/search/infer",
            content=padded,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 200 and response.json() == good.json(), response.text
        again = client.post("/v2/models/search/infer", json=_infer_body(_tokens()))
        assert again.status_code == 200 and again.json() == good.json()


# --- 2. texts --------------------------------------------------------------------------


class _SpyTokenizer:
    """Records the texts a model hands its tokenizer, then tokenizes them."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, *texts, **kwargs):
        for batch in texts:
            self.texts.extend(batch)
        return self.tokenizer(*texts, **kwargs)


def test_texts_are_cut_to_bytes_before_tokenizing(repository) -> None:  # noqa: F811
    from recjob_serving.python_backend import PythonBackendModel, TritonError

    repo, _ = repository
    name, _ = text_model_names("search")
    config = parse_config((repo / name / "config.pbtxt").read_text())
    backend = PythonBackendModel(repo / name, 1, config)
    tokenizer = backend.model.tokenizer
    spy = backend.model.tokenizer = _SpyTokenizer(tokenizer)
    limit = 32 * 32  # 32 bytes per token of max_length 32
    long_item = "cordless drill driver kit " * 40_000  # ~1 MB
    accents = "é" * 100_000  # two bytes each: a cut must not split one
    queries = np.array([[b"drill"], [b"hose"], ["h\u00e9".encode()]], dtype=np.object_)
    items = np.array([[long_item.encode()], [accents.encode()], [b"x" * 3000]], np.object_)
    out = backend.execute({"query": queries, "item": items})
    assert spy.texts and max(len(t.encode()) for t in spy.texts) <= limit
    assert spy.texts[4] == "é" * (limit // 2) and spy.texts[5] == "x" * limit
    expected = tokenizer(
        ["drill", "hose", "hé"], [long_item, accents, "x" * 3000],
        padding=True, truncation=True, max_length=32, return_tensors="np",
    )  # fmt: skip
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(out[key], expected[key])  # same as the whole texts
    spy.texts.clear()
    odd = np.array([[b"a" + "é".encode() * 600], [b"k" * limit + b"\xff"]], dtype=np.object_)
    cut = backend.execute({"query": np.array([[b"a"], [b"b"]], np.object_), "item": odd})
    assert cut["input_ids"].shape[0] == 2  # no split character, nothing past the cut decoded
    assert spy.texts[2:] == ["a" + "é" * (limit // 2 - 1), "k" * limit]
    with pytest.raises(TritonError, match="utf-8"):  # invalid UTF-8 in what is kept
        backend.execute({"query": np.array([[b"\xff"]], np.object_), "item": items[:1]})


def test_a_long_text_costs_the_server_what_its_first_bytes_do(limited) -> None:
    item = "cordless drill driver kit " * 36_000  # ~940 KB, under the body limit
    with httpx.Client(base_url=limited.url, timeout=WAIT_S) as client:
        whole = client.post("/v2/models/search-text/infer", json=_text_request("drill", item))
        cut = client.post("/v2/models/search-text/infer", json=_text_request("drill", item[:1024]))
    assert whole.status_code == 200, whole.text
    assert whole.json()["outputs"] == cut.json()["outputs"]


# --- 3. slow clients -------------------------------------------------------------------


def test_half_open_connections_do_not_block_and_are_closed(limited) -> None:
    partial_headers = b"POST /v2/models/search/infer HTTP/1.1\r\nHost: x\r\nContent-Ty"
    partial_body = (
        b"POST /v2/models/search/infer HTTP/1.1\r\nHost: x\r\n"
        b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"inputs"'
    )
    sockets = []
    try:
        for i in range(300):  # 200 half-sent headers, 50 half-sent bodies, 50 silent
            connection = _connect(limited)
            if i < 200:
                connection.sendall(partial_headers)
            elif i < 250:
                connection.sendall(partial_body)
            sockets.append(connection)
        with httpx.Client(base_url=limited.url, timeout=WAIT_S) as client:
            for _ in range(3):
                response = client.post("/v2/models/search/infer", json=_infer_body(_tokens()))
                assert response.status_code == 200, response.text
        answers = _wait_closed(sockets, deadline=time.monotonic() + WAIT_S)
    finally:
        for connection in sockets:
            connection.close()
    assert len(answers) == 300, f"{300 - len(answers)} connections still open after {WAIT_S} s"
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers.values()), set(answers.values())
    assert b"not received within" in answers[0]


def _wait_closed(sockets: list[socket.socket], deadline: float) -> dict[int, bytes]:
    """What each socket got before the server closed it, for those closed by ``deadline``."""
    received: dict[int, bytes] = {}
    closed: dict[int, bytes] = {}
    with selectors.DefaultSelector() as selector:
        for index, connection in enumerate(sockets):
            selector.register(connection, selectors.EVENT_READ, index)
            received[index] = b""
        while len(closed) < len(sockets) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1):
                try:
                    data = key.fileobj.recv(65536)
                except ConnectionResetError:
                    data = b""
                received[key.data] += data
                if not data:
                    selector.unregister(key.fileobj)
                    closed[key.data] = received[key.data]
    return closed


def test_a_slow_but_timely_client_is_served(limited) -> None:
    body = json.dumps(_infer_body(_tokens())).encode()
    head = (
        b"POST /v2/models/search/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    )
    with _connect(limited) as connection:
        for part in (head, b"\r\n", body[:20], body[20:]):
            connection.sendall(part)
            time.sleep(0.3)
        status, data = _read_response(connection)
    assert status == 200, data[:500]


# --- 4. model control ------------------------------------------------------------------


GRPC_CONTROL = """
import json, sys, grpc
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
stub = GRPCInferenceServiceStub(grpc.insecure_channel(sys.argv[1]))
answers = []
for action in sys.argv[2:]:
    verb, _, model = action.partition(":")
    try:
        if verb == "ready":
            answers.append(f"ok {stub.ServerReady(pb.ServerReadyRequest()).ready}")
        elif verb == "load":
            request = pb.RepositoryModelLoadRequest(model_name=model)
            answers.append(f"ok {stub.RepositoryModelLoad(request).isLoaded}")
        else:
            request = pb.RepositoryModelUnloadRequest(model_name=model)
            answers.append(f"ok {stub.RepositoryModelUnload(request).isUnloaded}")
    except grpc.RpcError as error:
        answers.append(f"{error.code()} {error.details()}")
print(json.dumps(answers))
"""


def _grpc_control(port: int, *actions: str) -> list[str]:
    """Answers to ``ready``, ``load:<m>``, ``unload:<m>`` over gRPC, in order (KServe's
    own protocol stubs, in their own process: its repository messages are not
    tritonclient's)."""
    result = subprocess.run(
        [sys.executable, "-c", GRPC_CONTROL, f"127.0.0.1:{port}", *actions],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_model_control_is_off_by_default(limited) -> None:
    with httpx.Client(base_url=limited.url, timeout=WAIT_S) as client:
        for action in ("unload", "load"):
            response = client.post(f"/v2/repository/models/search/{action}")
            assert response.status_code == 403, response.text
            assert "--model-control-mode=explicit" in response.json()["error"]
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/models/search/ready").status_code == 200
        infer = client.post("/v2/models/search/infer", json=_infer_body(_tokens()))
        assert infer.status_code == 200, infer.text
    unload, load, ready = _grpc_control(limited.grpc, "unload:search", "load:search", "ready")
    assert unload.startswith("StatusCode.PERMISSION_DENIED") and "explicit" in unload, unload
    assert load.startswith("StatusCode.PERMISSION_DENIED"), load
    assert ready == "ok True"


def test_explicit_model_control_unloads_reports_not_ready_and_loads(
    repository,  # noqa: F811
    tmp_path: Path,
) -> None:
    repo, _ = repository
    running = Server(repo, tmp_path / "server.log", "--model-control-mode=explicit")
    try:
        with httpx.Client(base_url=running.url, timeout=WAIT_S) as client:
            good = client.post("/v2/models/search/infer", json=_infer_body(_tokens()))
            assert good.status_code == 200, good.text
            unload = client.post("/v2/repository/models/search/unload")
            assert unload.status_code == 200, unload.text
            assert client.get("/v2/health/ready").status_code == 503
            assert _grpc_control(running.grpc, "ready") == ["ok False"]
            gone = client.post("/v2/models/search/infer", json=_infer_body(_tokens()))
            assert gone.status_code == 404, gone.text
            assert client.post("/v2/repository/models/search/unload").status_code == 404
            assert client.post("/v2/repository/models/nope/load").status_code == 404
            assert client.post("/v2/repository/models/search/load").status_code == 200
            assert client.get("/v2/health/ready").status_code == 200
            again = client.post("/v2/models/search/infer", json=_infer_body(_tokens()))
            assert again.status_code == 200 and again.json() == good.json()
        answers = _grpc_control(running.grpc, "unload:search", "ready", "load:search", "ready")
        assert answers == ["ok True", "ok False", "ok True", "ok True"], answers
    finally:
        assert running.stop() == 0
