"""The API server's refusals, as the operator reports them."""

from __future__ import annotations

import json

from kubernetes.client.exceptions import ApiException


class ChildWriteError(Exception):
    """The API server refused to create, patch or delete a child."""

    def __init__(self, verb: str, kind: str, name: str, error: ApiException):
        self.verb, self.kind, self.name = verb, kind, name
        self.status = error.status or 0
        status = _status(error)
        self.reason, self.message = api_error_text(error, status)
        self.namespace_terminating = error.status == 403 and namespace_terminating(status)
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.verb} {self.kind} {self.name}: {self.status} {self.reason}: {self.message}"


def _status(error: ApiException) -> dict | None:
    """The Status object the API server answered with, if its body is one."""
    try:
        status = json.loads(error.body or "")
    except (TypeError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def api_error_text(error: ApiException, status: dict | None) -> tuple[str, str]:
    """(reason, message) of an API error: its Status object's (``status``), else the HTTP
    reason."""
    if status and status.get("message"):
        return str(status.get("reason") or error.reason or ""), str(status["message"])
    return str(error.reason or ""), str(error.body or error.reason or "no message")


#: The cause the API server's NamespaceLifecycle admission gives when it refuses to create
#: an object in a namespace that is being deleted (k8s.io/api/core/v1 NamespaceTerminatingCause).
NAMESPACE_TERMINATING = "NamespaceTerminating"


def namespace_terminating(status: dict | None) -> bool:
    """Whether a 403's Status object refuses a create in a namespace being deleted: final,
    since a Terminating namespace never becomes Active again."""
    causes = ((status or {}).get("details") or {}).get("causes") or []
    # metav1.StatusCause serialises its Type as "reason"
    return any(isinstance(c, dict) and c.get("reason") == NAMESPACE_TERMINATING for c in causes)
