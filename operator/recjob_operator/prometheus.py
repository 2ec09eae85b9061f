"""Reading canary metrics from Prometheus's HTTP API (both backends), and running a private
Prometheus for local mode.

A query must answer one number: an empty vector or NaN is "no data" (inconclusive,
never a pass); several series, a non-numeric answer, an HTTP or connection failure is a
query error, counted apart from failed checks.

Which Prometheus: the operator's configuration names the servers a RecJob may pick
(:class:`PrometheusSources`); a RecJob names one, never a URL. Each rendered query is
checked again on its parsed form (every selector pinned to the RecJob's namespace) before
it is sent. One analysis has one deadline for all its queries (``budget``), enforced
while the answer is read, not per socket read; queries run on a small pool of their own,
so a slow Prometheus never holds the reconcile threads past that deadline. Whatever a
server answers reaches status only as a short, printable excerpt.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import httpx
import yaml

from .api.v1alpha1.common import DNS_LABEL_PATTERN
from .api.v1alpha1.promql import QueryScopeError, check_scoped, render_query
from .api.v1alpha1.spec_delivery import MetricCheck
from .controller.analysis import Reading

#: The source a RecJob without spec.rollout.prometheus reads.
DEFAULT_SOURCE = "default"
#: Seconds one analysis (all its queries together) may take.
ANALYSIS_SECONDS = 10.0
#: Largest answer read from Prometheus (one number is a few hundred bytes).
MAX_ANSWER_BYTES = 1 << 20
#: Threads for metric queries (apart from the reconcile passes' executor).
QUERY_THREADS = 4
_EXCERPT = 160
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


def excerpt(text: object, limit: int = _EXCERPT) -> str:
    """A short, printable, one-line excerpt of ``text`` for status and events."""
    flat = _UNPRINTABLE.sub(" ", str(text)).strip()
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def named_urls(items, where: str) -> dict[str, str]:
    """``name=url`` items (blank ones skipped) as a mapping; ValueError naming ``where``."""
    urls = {}
    for item in filter(None, (i.strip() for i in items)):
        name, sep, url = item.partition("=")
        if not sep:
            raise ValueError(f"{where}: expected name=url, got {item!r}")
        urls[name.strip()] = url.strip()
    return urls


class PrometheusSources:
    """The Prometheus servers the operator is configured with, by name."""

    def __init__(self, urls: dict[str, str]):
        for name, url in urls.items():
            if not re.fullmatch(DNS_LABEL_PATTERN, name):
                raise ValueError(f"Prometheus source name {name!r}: expected a DNS label")
            if not re.fullmatch(r"https?://[^\s]+", url):
                raise ValueError(f"Prometheus source {name}: expected an http(s) URL, got {url!r}")
        self.urls = dict(urls)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> PrometheusSources:
        """RECJOB_PROMETHEUS_URL is the default source; RECJOB_PROMETHEUS_SOURCES adds
        named ones: ``name=url,name=url``. Raises ValueError on a malformed setting."""
        env = os.environ if environ is None else environ
        urls = {}
        if env.get("RECJOB_PROMETHEUS_URL"):
            urls[DEFAULT_SOURCE] = env["RECJOB_PROMETHEUS_URL"].strip()
        items = env.get("RECJOB_PROMETHEUS_SOURCES", "").split(",")
        urls.update(named_urls(items, "RECJOB_PROMETHEUS_SOURCES"))
        return cls(urls)

    def url(self, name: str | None) -> str:
        """The URL of source ``name`` (None: the default). Raises LookupError, saying
        which names the operator allows."""
        key = name or DEFAULT_SOURCE
        if key in self.urls:
            return self.urls[key]
        allowed = ", ".join(sorted(self.urls)) or "none"
        if name is None:
            raise LookupError(
                "no default Prometheus configured (the operator's RECJOB_PROMETHEUS_URL)"
            )
        raise LookupError(
            f"spec.rollout.prometheus: {name!r} is not a Prometheus this operator is "
            f"configured with (allowed: {allowed})"
        )


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _query_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(QUERY_THREADS, thread_name_prefix="recjob-prometheus")
        return _pool


class PrometheusSource:
    """Instant queries against one Prometheus, within one deadline per analysis."""

    def __init__(self, url: str, budget: float = ANALYSIS_SECONDS):
        self.url = url.rstrip("/")
        self.budget = budget

    def query(self, promql: str, deadline: float | None = None) -> float | None:
        """One instant query -> its single value (None: no data), answered before
        ``deadline`` (time.monotonic(); default: ``budget`` from now). Raises
        RuntimeError with a short message on any failure."""
        if deadline is None:
            deadline = time.monotonic() + self.budget
        status, raw = self._get(promql, deadline)
        try:
            body = json.loads(raw)
        except ValueError:
            raise RuntimeError(f"Prometheus answered HTTP {status}, not JSON") from None
        if not isinstance(body, dict) or body.get("status") not in ("success", "error"):
            raise RuntimeError(f"not a Prometheus API answer (HTTP {status})")
        if body["status"] != "success":
            kind = excerpt(body.get("errorType", "error"), 40)
            raise RuntimeError(f"{kind}: {excerpt(body.get('error', ''))}")
        try:
            return _single_value(body["data"])
        except (KeyError, IndexError, TypeError, ValueError):
            raise RuntimeError("not a Prometheus query result") from None

    def _get(self, promql: str, deadline: float) -> tuple[int, bytes]:
        """GET the query, reading the answer until ``deadline`` at most."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError("not sent: the analysis's time was spent")
        # Prometheus's own evaluation timeout (a Prometheus duration: whole milliseconds)
        params = {"query": promql, "timeout": f"{max(int(remaining * 1000), 100)}ms"}
        body = bytearray()
        try:
            with (
                httpx.Client(timeout=remaining) as client,
                client.stream("GET", f"{self.url}/api/v1/query", params=params) as response,
            ):
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        raise RuntimeError(f"answer over {MAX_ANSWER_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise TimeoutError
                return response.status_code, bytes(body)
        except (TimeoutError, httpx.TimeoutException):
            raise RuntimeError(
                f"Prometheus at {self.url} did not answer within {self.budget:g}s"
            ) from None
        except httpx.HTTPError as error:
            raise RuntimeError(f"Prometheus at {self.url} unreachable: {excerpt(error)}") from None

    def read(self, checks: list[MetricCheck], values: dict[str, str]) -> list[Reading]:
        """Every check's reading for one analysis, all within ``budget`` seconds; the
        queries run on the metric pool, this thread waits for them at most that long."""
        deadline = time.monotonic() + self.budget
        future = _query_pool().submit(self._read_all, checks, values, deadline)
        try:
            return future.result(timeout=self.budget + 1.0)
        except FutureTimeout:
            message = f"no answer within the analysis's {self.budget:g}s (query pool busy)"
            return [Reading(check.name, error=message) for check in checks]

    def _read_all(
        self, checks: list[MetricCheck], values: dict[str, str], deadline: float
    ) -> list[Reading]:
        readings = []
        for check in checks:
            try:
                promql = render_query(check.query, values)
                check_scoped(promql, values["namespace"])
                readings.append(Reading(check.name, self.query(promql, deadline)))
            except QueryScopeError as error:
                readings.append(Reading(check.name, error=f"query refused: {excerpt(error)}"))
            except RuntimeError as error:
                readings.append(Reading(check.name, error=excerpt(error, 240)))
        return readings


def _single_value(data: dict) -> float | None:
    """The one number of a query result (None: no data)."""
    if data["resultType"] == "scalar":
        value = float(data["result"][1])
    elif data["resultType"] == "vector":
        if not data["result"]:
            return None
        if len(data["result"]) > 1:
            raise RuntimeError(
                f"query returned {len(data['result'])} series; aggregate it to one number"
            )
        value = float(data["result"][0]["value"][1])
    else:
        raise RuntimeError(f"query returned a {excerpt(data['resultType'], 20)}, not a number")
    return None if math.isnan(value) else value


def prometheus_binary() -> str | None:
    """The prometheus executable (Debian's package installs /usr/bin/prometheus)."""
    return shutil.which("prometheus")


def prometheus_config(
    targets: list[str], scrape_seconds: float = 1.0, labels: dict[str, str] | None = None
) -> str:
    """A config scraping ``targets`` (host:port) every ``scrape_seconds``, their series
    labelled ``labels`` (e.g. the namespace the canary queries are scoped to)."""
    interval = f"{max(int(scrape_seconds * 1000), 100)}ms"
    static = {"targets": targets, **({"labels": labels} if labels else {})}
    return yaml.safe_dump(
        {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [{"job_name": "recjob-local", "static_configs": [static]}],
        }
    )


def prometheus_command(config: Path, storage: Path, port: int) -> list[str]:
    """The command line of a private Prometheus on 127.0.0.1:``port``."""
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError(
            "prometheus is not installed (Debian: apt-get install prometheus), and no "
            "--prometheus was given"
        )
    return [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={storage}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1d",
        "--log.level=warn",
    ]


def wait_ready(url: str, timeout: float = 30.0) -> None:
    """Block until Prometheus answers /-/ready (TimeoutError after ``timeout``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"Prometheus at {url} not ready after {timeout:.0f}s")
