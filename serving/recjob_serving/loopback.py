"""KServe's ModelServer, listening where it is told and answering bad requests with 400.

KServe 0.21 always binds 0.0.0.0: here only the single-process path of
``ModelServer.start`` is used, the REST server's uvicorn config gets the host, and the gRPC
server binds ``host:port`` instead of ``[::]:port``. KServe's REST decoder also lets some
malformed requests escape as 500s (a binary body whose JSON lacks ``inputs``, binary
BYTES that are not UTF-8 or whose length prefix is cut off, data that does not fill its
shape): those become 400s.
The limits of ``limits.py`` (body size, header/read timeouts, model control) are applied
here too, and so is the serving revision of ``revision.py`` (response header, gRPC
metadata, ``POST /v2/feedback``).
"""

from __future__ import annotations

import asyncio
import struct

from grpc import aio
from kserve import ModelServer
from kserve.errors import InferenceError, InvalidInput, ModelNotFound
from kserve.logging import logger
from kserve.model_server import FASTAPI_APP_IMPORT_STRING
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.rest.server import RESTServer

from .limits import (
    BodyLimit,
    ControlledModelRepository,
    ModelControl,
    ModelControlDisabled,
    ServerLimits,
    deadline_protocol,
    model_control_disabled_handler,
)
from .revision import FEEDBACK_PATH, HEADER, RevisionHeader, RevisionInterceptor, feedback_handler


class ClientErrorDataPlane(DataPlane):
    """KServe's data plane whose request decoding reports failures as the client's (400)."""

    def decode(self, body, headers, protocol_version=None, model_name=None):
        """As DataPlane.decode; any decoding failure becomes ``InvalidInput``."""
        try:
            if protocol_version is None:
                return super().decode(body, headers, model_name=model_name)
            return super().decode(body, headers, protocol_version, model_name)
        except (InvalidInput, ModelNotFound):
            raise
        except (
            InferenceError,
            KeyError,
            ValueError,
            TypeError,
            IndexError,
            AttributeError,
            OverflowError,
            struct.error,  # binary BYTES whose 4-byte length prefix is cut off
        ) as error:
            raise InvalidInput(f"malformed request: {type(error).__name__}: {error}") from None

    async def ready(self) -> bool:
        """Not ready while a model of the repository is unloaded (model control)."""
        return not getattr(self.model_registry, "unloaded", None) and await super().ready()


class LimitedRESTServer(RESTServer):
    """KServe's REST server with a body limit, 403 for disabled model control, the
    feedback endpoint and the revision header."""

    def __init__(self, *args, max_body_bytes: int, revision: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.max_body_bytes, self.revision = max_body_bytes, revision

    def create_application(self) -> None:
        """As RESTServer's, plus the 403 handler, ``POST /v2/feedback``, the body limit
        and (outermost, with a revision) the revision header."""
        super().create_application()
        from kserve.model_server import app

        app.add_exception_handler(ModelControlDisabled, model_control_disabled_handler)
        app.add_route(FEEDBACK_PATH, feedback_handler(self.revision), methods=["POST"])
        app.add_middleware(BodyLimit, max_bytes=self.max_body_bytes)
        if self.revision:
            app.add_middleware(RevisionHeader, revision=self.revision)


class LoopbackGRPCServer(GRPCServer):
    """KServe's gRPC server bound to one host."""

    def __init__(
        self,
        host: str,
        *args,
        max_message_bytes: int,
        revision: str = "",
        log_requests: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._host, self._max_message_bytes = host, max_message_bytes
        self._revision, self._log_requests = revision, log_requests

    async def start(self, max_workers: int) -> None:
        """As GRPCServer.start, but listening on ``host:port``."""
        from concurrent import futures

        servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
        interceptors = [ExceptionToStatusInterceptor()]
        if self._log_requests:
            interceptors.insert(0, LoggingInterceptor())
        if self._revision:
            interceptors.insert(0, RevisionInterceptor(self._revision))
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", self._max_message_bytes)],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        address = f"{self._host}:{self._port}"
        if self._server.add_insecure_port(address) == 0:
            raise OSError(f"cannot listen on {address} (gRPC)")
        logger.info("Starting gRPC server on %s", address)
        await self._server.start()
        await self._server.wait_for_termination()


class LoopbackModelServer(ModelServer):
    """ModelServer whose REST and gRPC servers listen on ``host`` only, within ``limits``,
    as serving revision ``revision`` ("" for none), logging every request only with
    ``log_requests``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        limits: ServerLimits | None = None,
        revision: str = "",
        log_requests: bool = False,
        **kwargs,
    ):
        super().__init__(
            workers=1,
            registered_models=ControlledModelRepository(),
            enable_latency_logging=log_requests,
            **kwargs,
        )
        self.host, self.limits, self.revision = host, limits or ServerLimits(), revision
        self.log_requests = log_requests
        self.dataplane = ClientErrorDataPlane(model_registry=self.registered_models)
        self.model_repository_extension = ModelControl(
            self.registered_models, enabled=self.limits.model_control == "explicit"
        )

    def start(self, models: list) -> None:
        """Register the models and serve REST (+ gRPC) until stopped."""
        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = LimitedRESTServer(
            FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            grace_period=self.grace_period,
            event_loop=self.event_loop,
            timeout_keep_alive=self.timeout_keep_alive,
            max_body_bytes=self.limits.max_body_bytes,
            revision=self.revision,
        )
        self._rest_server.config.host = self.host
        self._rest_server.config.access_log = self.log_requests
        self._rest_server.config.http = deadline_protocol(
            self.limits.header_timeout,
            self.limits.read_timeout,
            {HEADER: self.revision} if self.revision else None,
        )
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            self._grpc_server = LoopbackGRPCServer(
                self.host,
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
                kwargs={},
                grace_period=self.grace_period,
                max_message_bytes=self.limits.max_body_bytes,
                revision=self.revision,
                log_requests=self.log_requests,
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())
