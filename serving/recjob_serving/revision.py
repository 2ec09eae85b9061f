"""The serving revision a model server runs as (``recjob-serve serve --revision``).

On a cluster each serving revision is one Deployment whose pods get their revision name
from the downward API (``RECJOB_REVISION``). With a revision set:

- every ``recjob_inference_*`` series carries ``revision="<name>"`` (``server.py``);
- every HTTP response carries ``x-recjob-revision: <name>`` (:class:`RevisionHeader`,
  outermost, so 413s and 404s carry it too; the header/read-timeout 408s of ``limits.py``
  add it themselves) and every gRPC call sends it as initial metadata
  (:class:`RevisionInterceptor`);
- ``POST /v2/feedback`` (:func:`feedback_handler`) counts
  ``recjob_feedback_impressions_total``, ``recjob_feedback_clicks_total`` and
  ``recjob_feedback_gain_total`` for this revision only: feedback naming another revision
  gets 409 (a client cannot make new series, and each ranking's feedback is counted by the
  revision that served it: the gateway routes requests carrying ``x-recjob-revision`` to
  that revision's pods). The three series exist from startup, at zero.

Without a revision the labels are empty, no header is sent and feedback gets 409.
"""

from __future__ import annotations

from grpc_interceptor.server import AsyncServerInterceptor
from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import JSONResponse

from .feedback import FeedbackError, parse_feedback

HEADER = "x-recjob-revision"
ENV = "RECJOB_REVISION"
FEEDBACK_PATH = "/v2/feedback"

IMPRESSIONS = Counter(
    "recjob_feedback_impressions_total", "Rankings shown (with feedback)", ["revision"]
)
CLICKS = Counter("recjob_feedback_clicks_total", "Rankings the user clicked", ["revision"])
GAIN = Counter("recjob_feedback_gain_total", "Sum of ranking gain (e.g. NDCG@k)", ["revision"])


def feedback_handler(revision: str):
    """The ``POST /v2/feedback`` endpoint of a server running as ``revision`` (its three
    feedback series are created now, at zero, so ``rate()`` sees zeros, not absence)."""
    if revision:
        for counter in (IMPRESSIONS, CLICKS, GAIN):
            counter.labels(revision=revision).inc(0)

    async def feedback(request: Request) -> JSONResponse:
        """Count one feedback event for this server's own revision."""
        if not revision:
            return _error(
                409,
                "this server has no revision configured (start it with --revision or "
                f"{ENV}): feedback is not counted",
            )
        try:
            event = parse_feedback(await request.body())
        except FeedbackError as error:
            return _error(400, str(error))
        if event.revision != revision:
            return _error(
                409,
                f"feedback for revision '{event.revision}' sent to the server of revision "
                f"'{revision}' (send it with header {HEADER}: {event.revision}, to the "
                "revision that served the ranking)",
            )
        IMPRESSIONS.labels(revision=revision).inc()
        if event.clicked:
            CLICKS.labels(revision=revision).inc()
        GAIN.labels(revision=revision).inc(event.gain)
        return JSONResponse({"ok": True, "revision": revision})

    return feedback


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class RevisionHeader:
    """ASGI middleware: ``x-recjob-revision: <revision>`` on every HTTP response."""

    def __init__(self, app, revision: str) -> None:
        self.app = app
        self.header = (HEADER.encode(), revision.encode())

    async def __call__(self, scope, receive, send) -> None:
        """Add the header to the response's start message."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != HEADER.encode()]
                message = {**message, "headers": [*headers, self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class RevisionInterceptor(AsyncServerInterceptor):
    """gRPC: ``x-recjob-revision`` in every call's initial metadata."""

    def __init__(self, revision: str) -> None:
        self.metadata = ((HEADER, revision),)

    async def intercept(self, method, request_or_iterator, context, method_name: str):
        """Send the metadata, then run the call."""
        await context.send_initial_metadata(self.metadata)
        response = method(request_or_iterator, context)
        if hasattr(response, "__aiter__"):
            return response
        return await response
