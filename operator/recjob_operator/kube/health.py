"""The operator's health endpoint (``RECJOB_HEALTH_PORT``, default 8080): ``GET /healthz``.

Served from the operator's event loop (an answer proves the loop runs), from the start of
the process: the standby replica, which waits for the leader Lease inside kopf's startup,
must answer the kubelet's probes too (kopf's own ``--liveness`` endpoint only starts once
startup is over). 200 with ``{"leader": bool, "identity": ...}`` on both replicas (a
standby is healthy and ready: readiness must not hold back a rolling update); 503 once the
leader has lost its Lease (the process is about to exit).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web


class HealthServer:
    """A tiny aiohttp server answering ``/healthz`` from ``state()``."""

    def __init__(self, state: Callable[[], dict], address: str = "0.0.0.0", port: int = 8080):
        """``state()``: a JSON-able dict; ``"healthy": False`` in it answers 503."""
        self.state, self.address, self.port = state, address, port
        self._runner: web.AppRunner | None = None

    async def _healthz(self, _: web.Request) -> web.Response:
        state = self.state()
        code = 200 if state.get("healthy", True) else 503
        return web.Response(status=code, text=json.dumps(state), content_type="application/json")

    async def start(self) -> None:
        """Listen (in the running event loop)."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.address, self.port).start()

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
