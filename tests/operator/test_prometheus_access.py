"""Metrics access a tenant cannot redirect or widen (issue 14): Prometheus servers come from
the operator's configuration, every selector is pinned to the RecJob's namespace on the
parsed query, one deadline per analysis, queries on their own pool, short excerpts only.

The hostile servers here are plain sockets on loopback playing what an attacker (or a
broken Prometheus) would: trickling, silent, huge, or not Prometheus at all.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from recjob_operator.api.v1alpha1.promql import QueryScopeError, check_scoped, check_template
from recjob_operator.api.v1alpha1.spec_delivery import MetricCheck, RolloutSpec
from recjob_operator.api.validation import validate_document
from recjob_operator.prometheus import (
    MAX_ANSWER_BYTES,
    PrometheusSource,
    PrometheusSources,
    excerpt,
)
from tests.conftest import MINIMAL

SCOPED = 'sum(rate(x{revision="{{revision}}",namespace="{{namespace}}"}[1m]))'
VALUES = {"revision": "shop-v2", "stable": "shop-v1", "namespace": "team-a", "service": "shop",
          "interval": "60s"}  # fmt: skip


def _problems(query: str) -> list[str]:
    document = copy.deepcopy(MINIMAL)
    document["spec"]["rollout"] = {"metrics": [{"name": "m", "query": query, "max": 1}]}
    _, problems = validate_document(document)
    return [str(p) for p in problems]


# ----------------------------------------------------------------- scoping, at validation
@pytest.mark.parametrize(
    "query, expected",
    [
        # the finding: a PromQL comment met the {{revision}} rule, payments' metrics read
        ('sum(x{namespace="payments"}) # {{revision}}', "not limited to the RecJob's namespace"),
        ('sum(x{revision="{{revision}}"})', "not limited to the RecJob's namespace"),
        ('sum(x{revision="{{revision}}",namespace=~".*"})', "not limited"),
        ('sum(x{revision="{{revision}}",namespace!="{{namespace}}"})', "not limited"),
        ('sum(x{revision="{{revision}}",namespace="team-a"})', "not limited"),  # literal
        ('x{revision="{{revision}}",namespace="{{namespace}}"} / y', "selector y{} is not limited"),
        ('x{revision="{{revision}}",namespace="{{namespace}}" or namespace="b"}', "not limited"),
        ('max_over_time(y{revision="{{revision}}"}[5m:1m])', "not limited"),
        ('info(x{revision="{{revision}}",namespace="{{namespace}}"})', "info() reads series"),
        ('x{namespace="{{namespace}}"} # {{revision}}', "a comment does not count"),
        ('sum(x{revision="{{revision}}",namespace="{{namespace}}"}', "not valid PromQL"),
    ],
)
def test_a_query_reaching_beyond_the_namespace_is_refused_naming_the_field(query, expected):
    problems = _problems(query)
    assert any(p.startswith("spec.rollout.metrics[0].query") and expected in p for p in problems), (
        problems
    )


@pytest.mark.parametrize(
    "query",
    [
        SCOPED,
        'sum(rate(c{revision="{{revision}}",namespace="{{namespace}}"}[1m])) / '
        'sum(rate(c{revision="{{stable}}",namespace="{{namespace}}"}[1m]))',
        'histogram_quantile(0.99, sum by (le) (rate(b{revision="{{revision}}",'
        'namespace="{{namespace}}",service="{{service}}"}[{{interval}}])))',
        'x{revision="{{revision}}",namespace="{{namespace}}" or revision="{{stable}}",'
        'namespace="{{namespace}}"}',
    ],
)
def test_scoped_queries_pass(query):
    assert _problems(query) == []


def test_every_default_and_shipped_query_is_scoped():
    for check in RolloutSpec().metrics:
        check_template(check.query)


def test_the_rendered_query_is_checked_for_the_recjobs_own_namespace():
    rendered = SCOPED.replace("{{revision}}", "shop-v2").replace("{{namespace}}", "team-a")
    check_scoped(rendered, "team-a")
    with pytest.raises(QueryScopeError, match="not limited"):
        check_scoped(rendered, "team-b")


def test_a_url_in_the_recjob_is_refused():
    document = copy.deepcopy(MINIMAL)
    document["spec"]["rollout"] = {"prometheusUrl": "http://attacker.example:9090"}
    _, problems = validate_document(document)
    assert any("spec.rollout.prometheusUrl" in str(p) for p in problems), problems


# ----------------------------------------------------------------- operator configuration
def test_sources_come_from_the_operators_settings():
    sources = PrometheusSources.from_env({
        "RECJOB_PROMETHEUS_URL": "http://prometheus-operated.monitoring.svc:9090",
        "RECJOB_PROMETHEUS_SOURCES": "team-a=http://a:9090, long-term=https://thanos:10902",
    })  # fmt: skip
    assert sources.url(None) == "http://prometheus-operated.monitoring.svc:9090"
    assert sources.url("long-term") == "https://thanos:10902"
    with pytest.raises(LookupError, match=r"'elsewhere' is not a Prometheus .*allowed: "
                                          r"default, long-term, team-a"):  # fmt: skip
        sources.url("elsewhere")
    with pytest.raises(LookupError, match="no default Prometheus"):
        PrometheusSources.from_env({}).url(None)
    for bad in ("nourl", "Bad_Name=http://x", "x=file:///etc/passwd"):
        with pytest.raises(ValueError):
            PrometheusSources.from_env({"RECJOB_PROMETHEUS_SOURCES": bad})


# ----------------------------------------------------------------- hostile servers
@contextmanager
def _server(handle):
    """A loopback TCP server calling ``handle(connection)`` per connection, in threads."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    seen: list[bytes] = []

    def serve():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            seen.append(connection.recv(65536))
            threading.Thread(target=_run, args=(handle, connection, stop), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", seen
    finally:
        stop.set()
        listener.close()


def _run(handle, connection, stop):
    try:
        handle(connection, stop)
    except OSError:
        pass
    finally:
        connection.close()


def _trickle(connection, stop):
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100000\r\n\r\n")  # fmt: skip
    while not stop.is_set():
        connection.sendall(b" ")
        time.sleep(0.2)


def _silent(connection, stop):
    stop.wait(30)


def _answer(body: bytes, status: int = 200):
    def handle(connection, stop):
        connection.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % (status, len(body)) + body)  # fmt: skip

    return handle


def _checks(n: int = 2) -> list[MetricCheck]:
    return [MetricCheck(name=f"m{i}", query=SCOPED, max=1.0) for i in range(n)]


@pytest.mark.parametrize("handle", [_trickle, _silent], ids=["trickling", "silent"])
def test_one_deadline_bounds_a_whole_analysis(handle):
    """The finding: a trickling answer held one query over 40 s (5 s per read)."""
    with _server(handle) as (url, _):
        started = time.monotonic()
        readings = PrometheusSource(url, budget=1.5).read(_checks(3), VALUES)
        took = time.monotonic() - started
    assert took < 1.5 + 1.5, took  # the budget, plus at most one read's slack
    assert all(r.value is None and r.error for r in readings)
    assert "did not answer within 1.5s" in readings[0].error
    assert all("not sent" in r.error or "within" in r.error for r in readings[1:])


def test_a_busy_query_pool_never_holds_the_reconcile_thread_past_the_deadline():
    """Every query thread stuck on a silent server: another analysis still returns (with
    an error reading) in about its budget; the reconcile threads are not the query pool."""
    with _server(_silent) as (url, _), ThreadPoolExecutor(8) as reconcilers:
        source = PrometheusSource(url, budget=1.0)
        futures = [reconcilers.submit(source.read, _checks(1), VALUES) for _ in range(8)]
        started = time.monotonic()
        results = [f.result(timeout=10) for f in futures]
        took = time.monotonic() - started
    assert took < 2.0 + 1.0, took
    assert all(r.error for rs in results for r in rs)


@pytest.mark.parametrize(
    "body, status, expected",
    [
        (json.dumps({"secret": "x" * 5000, "nested": [1, 2]}).encode(), 200,
         "not a Prometheus API answer (HTTP 200)"),
        (b"<html>" + b"\x1b[31m" * 2000 + b"</html>", 502,
         "Prometheus answered HTTP 502, not JSON"),
        (json.dumps({"status": "error", "errorType": "bad_data",
                     "error": "\x00\x1b]0;pwned\x07" + "y" * 10000}).encode(), 400, "bad_data: "),
    ],
    ids=["foreign-json", "html", "long-error"],
)  # fmt: skip
def test_answers_reach_status_only_as_short_printable_excerpts(body, status, expected):
    with _server(_answer(body, status)) as (url, _):
        (reading,) = PrometheusSource(url, budget=2).read(_checks(1), VALUES)
    assert reading.error.startswith(expected), reading.error
    assert len(reading.error) <= 240 and reading.error.isprintable()
    assert "xxxx" not in reading.error


def test_an_oversized_answer_is_refused():
    body = b'{"status": "success", "data": ' + b" " * (MAX_ANSWER_BYTES + 10) + b"}"
    with _server(_answer(body)) as (url, _):
        (reading,) = PrometheusSource(url, budget=5).read(_checks(1), VALUES)
    assert reading.error == f"answer over {MAX_ANSWER_BYTES} bytes"


def test_an_unscoped_rendering_is_never_sent():
    """Defence in depth: a query that slipped past validation is refused before it is sent."""
    sneaky = MetricCheck(name="m", query='sum(x{namespace="payments",revision="{{revision}}"})',
                         max=1.0)  # fmt: skip
    with _server(_answer(b"{}")) as (url, seen):
        (reading,) = PrometheusSource(url, budget=2).read([sneaky], VALUES)
        time.sleep(0.3)
    assert reading.error.startswith("query refused: selector"), reading.error
    assert seen == []


def test_the_query_carries_the_remaining_time_as_prometheus_timeout():
    data = {"resultType": "scalar", "result": [0, "0.5"]}
    answer = json.dumps({"status": "success", "data": data}).encode()
    with _server(_answer(answer)) as (url, seen):
        (reading,) = PrometheusSource(url, budget=3).read(_checks(1), VALUES)
    assert reading.value == 0.5
    request = seen[0].split(b"\r\n")[0].decode()
    assert re.search(r"[?&]timeout=\d+ms[& ]", request), request  # a Prometheus duration
    assert "namespace%3D%22team-a%22" in request, request


def test_excerpt_is_short_and_printable():
    text = excerpt("a\nb\x00c" + "z" * 500)
    assert text.startswith("a b c") and len(text) == 160 and text.endswith("...")
