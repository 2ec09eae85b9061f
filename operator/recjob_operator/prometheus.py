"""Reading canary metrics from Prometheus's HTTP API (both backends), and running a private
Prometheus for local mode.

A query must answer one number: an empty vector or NaN is "no data" (inconclusive,
never a pass); several series, a non-numeric answer, an HTTP or connection failure is a
query error, counted apart from failed checks.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import httpx
import yaml

from .api.v1alpha1.spec_delivery import MetricCheck
from .controller.analysis import Reading, render_query


class PrometheusSource:
    """Instant queries against one Prometheus."""

    def __init__(self, url: str, timeout: float = 5.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def query(self, promql: str) -> float | None:
        """One instant query -> its single value (None: no data). Raises RuntimeError
        with Prometheus's message on any failure."""
        try:
            response = httpx.get(
                f"{self.url}/api/v1/query", params={"query": promql}, timeout=self.timeout
            )
        except httpx.HTTPError as error:
            raise RuntimeError(f"Prometheus at {self.url} unreachable: {error}") from None
        try:
            body = response.json()
        except ValueError:
            raise RuntimeError(f"Prometheus answered HTTP {response.status_code}") from None
        if body.get("status") != "success":
            raise RuntimeError(f"{body.get('errorType', 'error')}: {body.get('error', body)}")
        data = body["data"]
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
            raise RuntimeError(f"query returned a {data['resultType']}, not a number")
        return None if math.isnan(value) else value

    def read(self, checks: list[MetricCheck], values: dict[str, str]) -> list[Reading]:
        """Every check's reading for one analysis."""
        readings = []
        for check in checks:
            try:
                readings.append(Reading(check.name, self.query(render_query(check.query, values))))
            except RuntimeError as error:
                readings.append(Reading(check.name, error=str(error)))
        return readings


def prometheus_binary() -> str | None:
    """The prometheus executable (Debian's package installs /usr/bin/prometheus)."""
    return shutil.which("prometheus")


def prometheus_config(targets: list[str], scrape_seconds: float = 1.0) -> str:
    """A config scraping ``targets`` (host:port) every ``scrape_seconds``."""
    interval = f"{max(int(scrape_seconds * 1000), 100)}ms"
    return yaml.safe_dump(
        {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {"job_name": "recjob-local", "static_configs": [{"targets": targets}]}
            ],
        }
    )


def prometheus_command(config: Path, storage: Path, port: int) -> list[str]:
    """The command line of a private Prometheus on 127.0.0.1:``port``."""
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError(
            "prometheus is not installed (Debian: apt-get install prometheus), and no "
            "spec.rollout.prometheusUrl / --prometheus was given"
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
