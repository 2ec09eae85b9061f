"""Local mode's serving (what KServe does on a cluster): one ``recjob-serve serve`` per
model version of the service, a weighted router in front (canaryTrafficPercent), live
traffic from the replay driver, and a private Prometheus scraping the router for the
canary analysis. Its processes and files live in ``<workdir>/services/<service>/``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx

from ..api.v1alpha1.recjob import RecJob
from ..controller.reconcile import ServingObservation, revision_name
from ..prometheus import PrometheusSource, prometheus_command, prometheus_config, wait_ready
from .options import LocalOptions, local_namespace
from .processes import BIN, ManagedProcess, free_port
from .workdir import WorkDir, write_atomic


class LocalServing(WorkDir):
    """Serves the model versions of a RecJob's service, and observes them."""

    def __init__(self, workdir: Path, options: LocalOptions):
        super().__init__(workdir)
        self.options = options

    # ------------------------------------------------------------------ observe
    def _routes(self, recjob: RecJob) -> dict:
        try:
            return json.loads((self.run_dir(recjob) / "routes.json").read_text())
        except (OSError, ValueError):
            return {"stable": None, "canary": None, "weight": 0}

    def observe(self, recjob: RecJob) -> ServingObservation | None:
        """The service's stable and canary versions as the router and servers are."""
        state = self.service_state(recjob)
        stable = state.get("stable_version")
        routes = self._routes(recjob)
        canary = routes.get("canary") or {}
        running = stable is not None and self._server(recjob, stable).alive()
        ready = running and _ready(self._server_url(recjob, stable))
        canary_version = canary.get("version")
        canary_alive = canary_version is not None and self._server(recjob, canary_version).alive()
        return ServingObservation(
            stable_version=stable,
            canary_version=canary_version if canary_alive else None,
            canary_weight=int(routes.get("weight") or 0) if canary_alive else 0,
            ready=bool(ready and self._router(recjob).alive()),
            stable_revision=revision_name(recjob.service_name, stable) if stable else None,
            canary_revision=canary.get("revision") if canary_alive else None,
        )

    def metric_source(self, recjob: RecJob) -> PrometheusSource:
        """The Prometheus the RecJob's checks read: the source it names among those given
        to ``recjob run`` (LookupError if not given), else the private one."""
        if not self._private_prometheus(recjob):
            return PrometheusSource(self.options.sources().url(recjob.spec.rollout.prometheus))
        record = ManagedProcess(self.run_dir(recjob), "prometheus").info() or {}
        return PrometheusSource(f"http://127.0.0.1:{record.get('meta', {}).get('port', 9)}")

    def _private_prometheus(self, recjob: RecJob) -> bool:
        return recjob.spec.rollout.prometheus is None and not self.options.prometheus_url

    # ------------------------------------------------------------------ processes
    def _server(self, recjob: RecJob, version: int) -> ManagedProcess:
        return ManagedProcess(self.run_dir(recjob), f"server-v{version}")

    def _server_url(self, recjob: RecJob, version: int) -> str:
        info = self._server(recjob, version).info() or {}
        return f"http://127.0.0.1:{info.get('meta', {}).get('http_port', 9)}"

    def _ensure_server(self, recjob: RecJob, version: int) -> str:
        server = self._server(recjob, version)
        if not server.alive():
            http, grpc = free_port(), free_port()
            server.start(
                [
                    str(BIN / "recjob-serve"),
                    "serve",
                    str(self.repository(recjob)),
                    "--model-version",
                    str(version),
                    "--http-port",
                    str(http),
                    "--grpc-port",
                    str(grpc),
                    "--grace-period",
                    "2",
                ],
                meta={"http_port": http, "grpc_port": grpc},
            )
        url = self._server_url(recjob, version)
        deadline = time.time() + self.options.server_start_timeout
        while not _ready(url):
            if not server.alive():
                raise RuntimeError(
                    f"model server for version {version} exited:\n{server.log_tail(20)}"
                )
            if time.time() > deadline:
                raise TimeoutError(f"model server for version {version} not ready at {url}")
            time.sleep(0.3)
        return url

    def _router(self, recjob: RecJob) -> ManagedProcess:
        return ManagedProcess(self.run_dir(recjob), "router")

    def router_url(self, recjob: RecJob) -> str:
        """Where the service's live traffic goes."""
        info = self._router(recjob).info() or {}
        return f"http://127.0.0.1:{info.get('meta', {}).get('port', 9)}"

    def _ensure_infrastructure(self, recjob: RecJob) -> None:
        """Router, private Prometheus scraping it, and the replay driver."""
        run = self.run_dir(recjob)
        router = self._router(recjob)
        routes = run / "routes.json"
        if not routes.exists():
            write_atomic(routes, json.dumps({"stable": None, "canary": None, "weight": 0}))
        if not router.alive():
            port = free_port()
            router.start(
                [sys.executable, "-m", "recjob_operator.local.router", str(routes),
                 "--port", str(port)],
                meta={"port": port},
            )  # fmt: skip
            _wait_http(f"http://127.0.0.1:{port}/routes", router)
        if self._private_prometheus(recjob):
            prometheus = ManagedProcess(run, "prometheus")
            if not prometheus.alive():
                port = free_port()
                router_port = (router.info() or {})["meta"]["port"]
                config = run / "prometheus.yml"
                write_atomic(
                    config,
                    prometheus_config(
                        [f"127.0.0.1:{router_port}"],
                        self.options.scrape_seconds,
                        {"namespace": local_namespace(recjob)},
                    ),
                )
                prometheus.start(
                    prometheus_command(config, run / "prometheus-data", port), meta={"port": port}
                )
                wait_ready(f"http://127.0.0.1:{port}")

    def _ensure_replay(self, recjob: RecJob) -> None:
        replay = ManagedProcess(self.run_dir(recjob), "replay")
        if replay.alive():
            return
        data = self.generation_dir(recjob) / "train" / "data"
        # a sequential recommender is asked for the top-k of its whole catalog
        # (<service>-topk); the other models rank 20 candidates' texts (<service>-text)
        sequential = recjob.spec.model.architecture == "sequential"
        how = (
            ["--model", f"{recjob.service_name}-topk", "--topk", str(self.options.replay_topk)]
            if sequential
            else ["--model", f"{recjob.service_name}-text", "--k", str(self.options.replay_k)]
        )
        replay.start(
            [
                sys.executable,
                "-m",
                "recjob_operator.local.replay",
                "--router",
                self.router_url(recjob),
                *how,
                "--data",
                str(data),
                "--task",
                recjob.spec.data.task
                if recjob.spec.data.task == "recommendation"
                else "search-ranking",
                "--rate",
                str(self.options.replay_rate),
            ]
        )

    def _write_routes(
        self, recjob: RecJob, stable: int | None, canary: int | None, weight: int
    ) -> None:
        def entry(version: int | None) -> dict | None:
            if version is None:
                return None
            return {
                "url": self._server_url(recjob, version),
                "revision": revision_name(recjob.service_name, version),
                "version": version,
            }

        write_atomic(
            self.run_dir(recjob) / "routes.json",
            json.dumps({"stable": entry(stable), "canary": entry(canary), "weight": weight}),
        )

    # ------------------------------------------------------------------ act
    def deploy_stable(self, recjob: RecJob, version: int) -> None:
        self._ensure_infrastructure(recjob)
        self._ensure_server(recjob, version)
        self._write_routes(recjob, version, None, 0)
        self._save_service_state(recjob, {"stable_version": version})
        self._ensure_replay(recjob)

    def set_canary(self, recjob: RecJob, version: int, weight: int) -> None:
        self._ensure_infrastructure(recjob)
        stable = self.service_state(recjob).get("stable_version")
        if stable is not None:
            self._ensure_server(recjob, stable)
        self._ensure_server(recjob, version)
        self._write_routes(recjob, stable, version, weight)
        self._ensure_replay(recjob)

    def promote(self, recjob: RecJob, version: int) -> None:
        previous = self.service_state(recjob).get("stable_version")
        self._ensure_server(recjob, version)
        self._write_routes(recjob, version, None, 0)
        self._save_service_state(recjob, {"stable_version": version, "previous": previous})
        if previous is not None and previous != version:
            self._server(recjob, previous).stop()

    def roll_back(self, recjob: RecJob, canary: int) -> None:
        stable = self.service_state(recjob).get("stable_version")
        self._write_routes(recjob, stable, None, 0)
        if canary != stable:
            self._server(recjob, canary).stop()

    # ------------------------------------------------------------------ shutdown
    def live_metrics(self, recjob: RecJob) -> str:
        """The router's /metrics text (empty when it is not running)."""
        try:
            return httpx.get(f"{self.router_url(recjob)}/metrics", timeout=2).text
        except httpx.HTTPError:
            return ""

    def stop(self, recjob: RecJob) -> None:
        """Stop the replay driver, router, Prometheus and every model server."""
        run = self.run_dir(recjob)
        for name in ("replay", "router", "prometheus"):
            ManagedProcess(run, name).stop()
        for record in run.glob("server-v*.json"):
            ManagedProcess(run, record.stem).stop()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_http(url: str, process: ManagedProcess, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if not process.alive():
            raise RuntimeError(f"{process.name} exited:\n{process.log_tail(20)}")
        time.sleep(0.2)
    raise TimeoutError(f"{process.name} did not answer {url}")
