"""A feedback event: what the user did with one served ranking (pure validation, no I/O).

The body of ``POST /v2/feedback`` (model server) and ``POST /feedback`` (local mode's
router) is one JSON object ``{"revision": str, "clicked": bool, "gain": number}``, as the
replay driver sends it. It feeds Prometheus counters for good, so anything that would
poison them (NaN, infinite, negative or absurdly large gain) is refused with a message.
:func:`check_revision` says which names ``--revision`` may take.

The local router (``recjob_operator.local.router``) has its own copy of this check: the
serving package must not import the operator nor the operator the serving package, and no
package both ship with holds it. ``tests/serving/test_server_revision.py`` holds the two
to the same verdicts.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

#: Largest gain one event may add (a counter that reaches infinity stays poisoned).
MAX_GAIN = 1e6
FIELDS = ("revision", "clicked", "gain")
#: What a serving revision's name may be: a Kubernetes-style name (a safe header value).
REVISION_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")


class FeedbackError(ValueError):
    """The body is not a valid feedback event (HTTP 400); the message says why."""


@dataclass(frozen=True)
class Feedback:
    """One valid feedback event."""

    revision: str
    clicked: bool
    gain: float


def parse_feedback(body: bytes) -> Feedback:
    """Parse and check a feedback body; ``FeedbackError`` naming the problem otherwise."""
    try:
        event = json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise FeedbackError(f"feedback is not JSON: {error}") from None
    if not isinstance(event, dict):
        raise FeedbackError('feedback must be a JSON object {"revision", "clicked", "gain"}')
    missing = [name for name in FIELDS if name not in event]
    if missing:
        raise FeedbackError(f"feedback lacks {', '.join(missing)} (it needs {', '.join(FIELDS)})")
    unknown = sorted(set(event) - set(FIELDS))
    if unknown:
        raise FeedbackError(f"unknown feedback field(s) {', '.join(unknown)}")
    revision, clicked, gain = event["revision"], event["clicked"], event["gain"]
    if not isinstance(revision, str) or not revision:
        raise FeedbackError("revision must be a non-empty string")
    if not isinstance(clicked, bool):
        raise FeedbackError("clicked must be true or false")
    if isinstance(gain, bool) or not isinstance(gain, int | float):
        raise FeedbackError("gain must be a number")
    try:
        gain = float(gain)
    except OverflowError:  # an integer too large for a float
        gain = math.inf
    if not math.isfinite(gain) or gain < 0:
        raise FeedbackError("gain must be a finite number >= 0")
    if gain > MAX_GAIN:
        raise FeedbackError(f"gain must be at most {MAX_GAIN:g}")
    return Feedback(revision, clicked, gain)


def check_revision(revision: str) -> str:
    """``revision`` if it is empty or a valid name, else ``ValueError`` saying why."""
    if revision and not REVISION_PATTERN.fullmatch(revision):
        raise ValueError(
            f"revision {revision!r} is not a name (letters, digits, '.', '_', '-'; "
            "starting and ending with a letter or digit; at most 253 characters)"
        )
    return revision
