"""Limits on what a client can make the model server hold: request size, time and control.

- :class:`BodyLimit`: an ASGI middleware answering **413** as soon as a request body is
  known to exceed ``max_bytes`` (from ``Content-Length`` before reading anything, or while
  a chunked body streams in), before anything parses it.
- :func:`deadline_protocol`: uvicorn's HTTP protocol with a header timeout (from the
  connection, or the first byte of a next request, to complete headers) and a read timeout
  (from complete headers to the end of the body); a connection past either gets **408**
  and is closed. Idle keep-alive connections keep uvicorn's own timeout.
- :class:`ModelControl`: the model repository extension (``/v2/repository/models/<m>/
  load|unload`` and gRPC ``RepositoryModelLoad|Unload``), refused (403 / PERMISSION_DENIED)
  unless enabled; when enabled, an unloaded model is kept aside so ``load`` restores it,
  and :class:`ControlledModelRepository` tells the server it is not ready meanwhile.
- Top-k requests (a sequential recommender's ``<model>-topk``): ``max_k`` (largest k) and
  ``max_history`` (item ids in one history row); the top-k model's own parameters of the
  same names are lowered to these when the server loads it, and it refuses requests over
  them with a 400.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from grpc_interceptor.exceptions import PermissionDenied
from kserve.errors import ModelNotFound
from kserve.model_repository import ModelRepository
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from starlette.responses import JSONResponse
from uvicorn.protocols.http.auto import AutoHTTPProtocol

MiB = 1 << 20
#: Default limits of a top-k request (also written into each top-k model's config).
DEFAULT_MAX_K = 1000
DEFAULT_MAX_HISTORY = 1000


@dataclass(frozen=True)
class ServerLimits:
    """What ``recjob-serve serve`` allows a client (see the module docstring)."""

    max_body_bytes: int = 16 * MiB
    header_timeout: float = 10.0
    read_timeout: float = 30.0
    model_control: str = "none"  # or "explicit"
    max_k: int = DEFAULT_MAX_K
    max_history: int = DEFAULT_MAX_HISTORY


class BodyTooLarge(Exception):
    """A request body went over the limit while it was being read."""


class BodyLimit:
    """ASGI middleware: request bodies over ``max_bytes`` get 413 before they are parsed."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _refusal(self) -> JSONResponse:
        message = f"request body over the limit of {self.max_bytes} bytes (--max-body-bytes)"
        return JSONResponse({"error": message}, status_code=413, headers={"connection": "close"})

    async def __call__(self, scope, receive, send) -> None:
        """Refuse on ``Content-Length``, else count the body as the app reads it."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refusal()(scope, receive, send)
        received, too_large, started = 0, False, False

        async def counted_receive():
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                too_large = True
                raise BodyTooLarge
            return message

        async def guarded_send(message) -> None:
            # once over the limit, what the failing app answers (a 500) is dropped
            nonlocal started
            if not too_large:
                started = True
                await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await self._refusal()(scope, receive, send)


class _Deadlines(AutoHTTPProtocol):
    """uvicorn's HTTP protocol (httptools, else h11) with header and read timeouts."""

    header_timeout = ServerLimits.header_timeout
    read_timeout = ServerLimits.read_timeout
    extra_headers = b""  # more "name: value\r\n" lines for the 408

    def connection_made(self, transport) -> None:
        """A new connection: its headers are due within ``header_timeout``."""
        super().connection_made(transport)
        self._phase: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._update()

    def data_received(self, data: bytes) -> None:
        """Parse as uvicorn does, then see what is awaited now."""
        super().data_received(data)
        self._update()

    def on_response_complete(self) -> None:
        """Answered: idle until the next request's first byte (keep-alive timeout)."""
        super().on_response_complete()
        self._update(idle=True)

    def connection_lost(self, exc) -> None:
        """Gone: no timer left behind."""
        self._update(idle=True)
        super().connection_lost(exc)

    def _update(self, idle: bool = False) -> None:
        """(Re)arm the timer for what the connection waits for now: headers, a body, or
        nothing (the app is answering, or the connection idles between requests)."""
        cycle = self.cycle
        if idle:
            phase = None
        elif cycle is None or cycle.response_complete:
            phase = "headers"
        else:
            phase = "body" if cycle.more_body else None
        if phase == self._phase:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._phase, self._timer = phase, None
        if phase is not None:
            timeout = self.header_timeout if phase == "headers" else self.read_timeout
            self._timer = self.loop.call_later(timeout, self._expire, phase, timeout)

    def _expire(self, phase: str, timeout: float) -> None:
        """408 (unless a response has started) and close."""
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            body = json.dumps({"error": f"request {phase} not received within {timeout:g} s"})
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                + self.extra_headers
                + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n{body}".encode()
            )
        self.transport.close()


def deadline_protocol(
    header_timeout: float, read_timeout: float, headers: dict[str, str] | None = None
) -> type:
    """A uvicorn HTTP protocol class (``Config.http``) with these timeouts in seconds;
    its 408s also carry ``headers`` (names and values of plain ASCII)."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    attributes = {
        "header_timeout": header_timeout,
        "read_timeout": read_timeout,
        "extra_headers": extra.encode("ascii"),
    }
    return type("DeadlineHTTPProtocol", (_Deadlines,), attributes)


class ModelControlDisabled(PermissionDenied):
    """Model control was asked of a server started without it (403 / PERMISSION_DENIED)."""

    def __init__(self) -> None:
        super().__init__(
            "model control is disabled on this server "
            "(start it with --model-control-mode=explicit to allow load/unload)"
        )


async def model_control_disabled_handler(_, error: ModelControlDisabled) -> JSONResponse:
    """REST answer to :class:`ModelControlDisabled`."""
    return JSONResponse({"error": error.details}, status_code=403)


class ControlledModelRepository(ModelRepository):
    """KServe's model registry whose unloaded models are kept aside for ``load``."""

    def __init__(self) -> None:
        super().__init__()
        self.unloaded: dict = {}

    def unload(self, name: str) -> None:
        """Take the model out of service (``KeyError`` when it is not being served)."""
        self.unloaded[name] = self.models.pop(name)

    def load(self, name: str) -> bool:
        """Put an unloaded model back in service (False when the name is unknown)."""
        if name in self.unloaded:
            self.models[name] = self.unloaded.pop(name)
        return name in self.models


class ModelControl(ModelRepositoryExtension):
    """The repository extension, refused unless ``enabled``."""

    def __init__(self, registry: ControlledModelRepository, enabled: bool) -> None:
        super().__init__(model_registry=registry)
        self.registry, self.enabled = registry, enabled

    async def load(self, model_name: str) -> dict:
        """Serve an unloaded model again (404 for a name the repository never had)."""
        if not self.enabled:
            raise ModelControlDisabled()
        if not self.registry.load(model_name):
            raise ModelNotFound(model_name)
        return {"name": model_name, "load": True}

    async def unload(self, model_name: str) -> dict:
        """Stop serving a model; the server reports not ready until it is loaded again."""
        if not self.enabled:
            raise ModelControlDisabled()
        await super().unload(model_name)
        return {"name": model_name, "unload": True}
