"""The API server's refusals, as the operator reports them."""

from __future__ import annotations

import json

from kubernetes.client.exceptions import ApiException


class ChildWriteError(Exception):
    """The API server refused to create, patch or delete a child."""

    def __init__(self, verb: str, kind: str, name: str, error: ApiException):
        self.verb, self.kind, self.name = verb, kind, name
        self.status = error.status or 0
        self.reason, self.message = api_error_text(error)
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.verb} {self.kind} {self.name}: {self.status} {self.reason}: {self.message}"


def api_error_text(error: ApiException) -> tuple[str, str]:
    """(reason, message) of an API error: the Status object's, else the HTTP reason."""
    try:
        status = json.loads(error.body or "")
    except (TypeError, ValueError):
        status = None
    if isinstance(status, dict) and status.get("message"):
        return str(status.get("reason") or error.reason or ""), str(status["message"])
    return str(error.reason or ""), str(error.body or error.reason or "no message")
