"""Local mode's weighted router: what KServe's canaryTrafficPercent does in a cluster.

    python -m recjob_operator.local.router ROUTES.json --port N

Open Inference Protocol requests to ``/v2/...`` are sent to the stable or the canary server
by the current canary weight (re-read from ROUTES.json whenever it changes) and answered
with the server's response plus an ``x-recjob-revision`` header. ``POST /feedback``
records what the user did with a served ranking: ``{"revision": str, "clicked": bool,
"gain": number}``, the revision one the router serves now (else 409), gain finite, >= 0
and at most 1e6 (else 400, as anything malformed). ``/metrics`` has, per revision:
``recjob_inference_requests_total``, ``recjob_inference_errors_total`` (5xx and
unreachable server), ``recjob_inference_latency_seconds`` (histogram, through the
router), ``recjob_feedback_impressions_total``, ``recjob_feedback_clicks_total`` and
``recjob_feedback_gain_total`` (e.g. NDCG@k of the served ranking).

ROUTES.json: ``{"stable": {"url": ..., "revision": ...}, "canary": {...} | null,
"weight": 0-100}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

#: The router's own registry: its series have the model server's names (the same queries
#: read both), so in one process (tests) the default registry would refuse the second set.
REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "recjob_inference_requests_total", "Requests routed", ["revision"], registry=REGISTRY
)
ERRORS = Counter(
    "recjob_inference_errors_total",
    "Requests that failed (5xx or unreachable)",
    ["revision"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "recjob_inference_latency_seconds",
    "Request latency through the router",
    ["revision"],
    buckets=(0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
IMPRESSIONS = Counter(
    "recjob_feedback_impressions_total",
    "Rankings shown (with feedback)",
    ["revision"],
    registry=REGISTRY,
)
CLICKS = Counter(
    "recjob_feedback_clicks_total", "Rankings the user clicked", ["revision"], registry=REGISTRY
)
GAIN = Counter(
    "recjob_feedback_gain_total",
    "Sum of ranking gain (e.g. NDCG@k)",
    ["revision"],
    registry=REGISTRY,
)
SESSION = web.AppKey("session", aiohttp.ClientSession)
#: Largest gain one feedback event may add (a counter at infinity stays poisoned).
MAX_GAIN = 1e6
FEEDBACK_FIELDS = ("revision", "clicked", "gain")


def parse_feedback(body: bytes) -> tuple[str, bool, float]:
    """``(revision, clicked, gain)`` of a valid feedback body, else ``ValueError`` saying
    why. The model server checks its ``POST /v2/feedback`` the same way
    (``recjob_serving.feedback.parse_feedback``; neither package may import the other, and
    ``tests/serving/test_server_revision.py`` holds the two to the same verdicts)."""
    try:
        event = json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"feedback is not JSON: {error}") from None
    if not isinstance(event, dict):
        raise ValueError('feedback must be a JSON object {"revision", "clicked", "gain"}')
    fields = ", ".join(FEEDBACK_FIELDS)
    missing = [name for name in FEEDBACK_FIELDS if name not in event]
    if missing:
        raise ValueError(f"feedback lacks {', '.join(missing)} (it needs {fields})")
    unknown = sorted(set(event) - set(FEEDBACK_FIELDS))
    if unknown:
        raise ValueError(f"unknown feedback field(s) {', '.join(unknown)}")
    revision, clicked, gain = event["revision"], event["clicked"], event["gain"]
    if not isinstance(revision, str) or not revision:
        raise ValueError("revision must be a non-empty string")
    if not isinstance(clicked, bool):
        raise ValueError("clicked must be true or false")
    if isinstance(gain, bool) or not isinstance(gain, int | float):
        raise ValueError("gain must be a number")
    try:
        gain = float(gain)
    except OverflowError:  # an integer too large for a float
        gain = math.inf
    if not math.isfinite(gain) or gain < 0:
        raise ValueError("gain must be a finite number >= 0")
    if gain > MAX_GAIN:
        raise ValueError(f"gain must be at most {MAX_GAIN:g}")
    return revision, clicked, gain


class Routes:
    """The routing table, reloaded when its file changes."""

    def __init__(self, path: Path, seed: int = 0):
        self.path = path
        self._mtime = 0.0
        self.table: dict = {"stable": None, "canary": None, "weight": 0}
        self.rng = random.Random(seed)

    def current(self) -> dict:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            return self.table
        if mtime != self._mtime:
            try:
                self.table = json.loads(self.path.read_text())
                self._mtime = mtime
                for side in ("stable", "canary"):
                    if self.table.get(side):
                        revision = self.table[side]["revision"]
                        for metric in (REQUESTS, ERRORS, IMPRESSIONS, CLICKS, GAIN):
                            metric.labels(revision=revision)  # series exist from the start
            except (OSError, ValueError):
                pass  # a half-written file: keep the last table (writers replace atomically)
        return self.table

    def revisions(self) -> list[str]:
        """The revisions served now (stable first, then canary)."""
        table = self.current()
        return [table[side]["revision"] for side in ("stable", "canary") if table.get(side)]

    def choose(self) -> dict | None:
        table = self.current()
        canary, weight = table.get("canary"), int(table.get("weight") or 0)
        if canary and self.rng.random() * 100 < weight:
            return canary
        return table.get("stable") or canary


def make_app(routes: Routes) -> web.Application:
    """The router's aiohttp application."""
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def startup(app: web.Application) -> None:
        app[SESSION] = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30),
            connector=aiohttp.TCPConnector(limit=64),
        )

    async def cleanup(app: web.Application) -> None:
        await app[SESSION].close()

    async def forward(request: web.Request) -> web.Response:
        target = routes.choose()
        if target is None:
            return web.json_response({"error": "no model is deployed yet"}, status=503)
        revision = target["revision"]
        body = await request.read()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("content-type", "inference-header-content-length")
        }
        started = time.perf_counter()
        REQUESTS.labels(revision=revision).inc()
        try:
            async with app[SESSION].request(
                request.method, target["url"] + request.path_qs, data=body, headers=headers
            ) as upstream:
                payload = await upstream.read()
                status = upstream.status
                out_headers = {
                    k: v
                    for k, v in upstream.headers.items()
                    if k.lower() in ("content-type", "inference-header-content-length")
                }
        except (aiohttp.ClientError, TimeoutError) as error:
            ERRORS.labels(revision=revision).inc()
            return web.json_response(
                {"error": f"revision {revision} unreachable: {error}"},
                status=502,
                headers={"x-recjob-revision": revision},
            )
        if status >= 500:
            ERRORS.labels(revision=revision).inc()
        else:
            LATENCY.labels(revision=revision).observe(time.perf_counter() - started)
        return web.Response(
            body=payload, status=status, headers={**out_headers, "x-recjob-revision": revision}
        )

    async def feedback(request: web.Request) -> web.Response:
        try:
            revision, clicked, gain = parse_feedback(await request.read())
        except ValueError as error:
            return web.json_response({"error": str(error)}, status=400)
        known = routes.revisions()
        if revision not in known:
            return web.json_response(
                {
                    "error": f"feedback for revision '{revision}', which this router does not "
                    f"serve (its revisions: {', '.join(known) or 'none'})"
                },
                status=409,
            )
        IMPRESSIONS.labels(revision=revision).inc()
        if clicked:
            CLICKS.labels(revision=revision).inc()
        GAIN.labels(revision=revision).inc(gain)
        return web.json_response({"ok": True})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def routes_view(_: web.Request) -> web.Response:
        return web.json_response(routes.current())

    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    app.router.add_post("/feedback", feedback)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/routes", routes_view)
    app.router.add_route("*", "/v2/{tail:.*}", forward)
    app.router.add_route("*", "/v2", forward)
    return app


def main() -> None:
    """Run the router on 127.0.0.1 until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("routes", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    web.run_app(
        make_app(Routes(args.routes, args.seed)),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
