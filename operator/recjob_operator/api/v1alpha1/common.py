"""Building blocks shared by the RecJob spec and status: the base model and field types."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

GROUP = "recjob.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "RecJob"
PLURAL = "recjobs"
SINGULAR = "recjob"
SHORT_NAMES = ["rj"]

#: Annotation a person sets to let a rollout that waits for approval take its last step.
#: Its value must be the RecJob generation being approved (so an old approval never
#: carries over to a new model).
APPROVE_ANNOTATION = f"{GROUP}/approve-generation"

#: The finalizer that holds a deleted RecJob until the operator's delete handler has run
#: (manifests/manager/finalizer_policy.yaml adds it at admission, kopf otherwise).
FINALIZER = f"{GROUP}/finalizer"

#: Largest value of any integer field (the CRD's ``maximum``, with ``format: int64``):
#: 2^53 - 1, the largest integer a float64 holds exactly. The API server keeps integers
#: as int64 but reads a schema's ``maximum`` as a float64 (2^63 - 1 would round up to
#: 2^63, which it refuses), and every JSON reader keeps these exactly.
MAX_INTEGER = 2**53 - 1
#: Largest seed: numpy's legacy seeding (``np.random.seed``) takes 32-bit seeds only.
SEED_MAX = 2**32 - 1

#: Pretrained models shipped with RecJob: name -> (layers, hidden size, attention heads).
BUNDLED_MODELS: dict[str, tuple[int, int, int]] = {"all-MiniLM-L6-v2": (6, 384, 12)}

#: Placeholders a canary PromQL template may use.
QUERY_PLACEHOLDERS = ("revision", "stable", "namespace", "service", "interval")
#: The spaces allowed inside ``{{ name }}``, spelled out: Python's, RE2's (the API
#: server's CEL) and Go's ``\\s`` do not agree.
PLACEHOLDER_SPACE = r"[\t\n\f\r ]"


def parse_generation(text: str | None) -> int | None:
    """A generation written in an annotation (``"3"``), or None when it is not one.

    Only ASCII digits count: ``"²".isdigit()`` is True but ``int("²")`` fails, and
    ``int()`` also takes other scripts' digits and refuses very long numbers.
    """
    if not text or len(text) > 19 or not (text.isascii() and text.isdecimal()):
        return None
    return int(text)


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,  # like the API server: "5" is not an integer, "true" is not a boolean
        validate_default=True,
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as it appears in YAML / the Kubernetes API (camelCase, no nulls)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


#: A point in time; accepts RFC 3339 strings as they come from the API server.
Timestamp = Annotated[datetime, Field(strict=False)]

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
#: At most 6 digits before a unit's decimal point and 20 characters in all: the largest
#: duration (~2.1 million hours) then fits a Go time.Duration (CEL's ``duration()`` in the
#: API server) and a Python timedelta, so no duration can overflow either.
DURATION_PATTERN = r"^([0-9]{1,6}(\.[0-9]+)?(ms|s|m|h))+$"
DURATION_MAX_LENGTH = 20
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")


def parse_duration(text: str) -> timedelta:
    """Parse a Go-style duration (``1m30s``) into a timedelta; ValueError if malformed."""
    if len(text) > DURATION_MAX_LENGTH or not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(
            "expected a duration such as 30s, 5m or 1h30m (units ms, s, m, h; at most 6 "
            f"digits before a unit and {DURATION_MAX_LENGTH} characters), got {text!r}"
        )
    seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
    return timedelta(seconds=seconds)


def _valid_duration(text: str) -> str:
    parse_duration(text)
    return text


#: A Go-style duration such as ``30s``, ``1m30s``, ``2h`` (units ms, s, m, h).
Duration = Annotated[
    str,
    AfterValidator(_valid_duration),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": DURATION_MAX_LENGTH,
            "description": "A duration such as 30s, 5m or 1h30m (units ms, s, m, h).",
        }
    ),
]


QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
#: What the CRD allows: resource quantities are never negative (the Python check says so
#: in words; the API server needs the sign out of the pattern and a minimum).
NON_NEGATIVE_QUANTITY_PATTERN = QUANTITY_PATTERN.replace(r"^(\+|-)?", r"^\+?", 1)
QUANTITY_MAX_LENGTH = 64


def _to_quantity(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a Kubernetes quantity such as 2, 500m or 8Gi, got a boolean")
    if isinstance(value, float):
        raise ValueError(
            f"write fractional quantities as strings ('{value}' or "
            f"'{int(value * 1000)}m'), as Kubernetes does"
        )
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a non-negative quantity, got {value}")
        if value > MAX_INTEGER:
            raise ValueError(f"expected a quantity of at most {MAX_INTEGER}, got {value}")
        value = str(value)
    if isinstance(value, str):
        if len(value) > QUANTITY_MAX_LENGTH:
            raise ValueError(
                f"expected a Kubernetes quantity of at most {QUANTITY_MAX_LENGTH} characters"
            )
        if not _QUANTITY_RE.match(value):
            raise ValueError(
                f"expected a Kubernetes quantity such as 2, 500m or 8Gi, got {value!r}"
            )
        if value.startswith("-"):
            raise ValueError(f"expected a non-negative quantity, got {value!r}")
    return value


#: A Kubernetes resource quantity (``2``, ``500m``, ``8Gi``), kept as its string form.
Quantity = Annotated[
    str,
    BeforeValidator(_to_quantity),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": NON_NEGATIVE_QUANTITY_PATTERN,
            "maxLength": QUANTITY_MAX_LENGTH,
            "minimum": 0,
            "maximum": MAX_INTEGER,
            "description": "A Kubernetes quantity such as 2, 500m or 8Gi.",
        }
    ),
]

_QUANTITY_SUFFIX = {
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
    "P": 1e15, "E": 1e18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
    "Ei": 2**60,
}  # fmt: skip


def parse_quantity(text: str) -> float:
    """The numeric value of a Kubernetes quantity (``500m`` -> 0.5, ``1Gi`` -> 1073741824)."""
    match = re.fullmatch(
        r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))([eE][+-]?[0-9.]+|[A-Za-z]*)", text
    )
    if not match or (
        match.group(2) and match.group(2)[0] not in "eE" and match.group(2) not in _QUANTITY_SUFFIX
    ):
        raise ValueError(f"expected a Kubernetes quantity such as 2, 500m or 8Gi, got {text!r}")
    number, suffix = match.groups()
    if suffix and suffix[0] in "eE":
        return float(number + suffix)
    return float(number) * _QUANTITY_SUFFIX[suffix]


DNS_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

#: A DNS-1035 label (lowercase letters, digits and '-', starting with a letter).
DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, min_length=1, max_length=63)]

#: No spaces or control characters. Explicit ranges, not \s / \S: Python, Rust (pydantic)
#: and Go (the API server) disagree on what \s matches (e.g. U+001F).
NO_SPACE = r"[^\x00-\x20\x7f]"
#: file:// URIs are absolute only (file:///path): see ``uris.py`` for the other rules.
URI_PATTERN = (
    rf"^(file:///{NO_SPACE}*|(pvc|s3|gs)://{NO_SPACE}+|/{NO_SPACE}*"
    r"|\.{0,2}/?[^:\x00-\x20\x7f]+)$"
)
URL_PATTERN = rf"^https?://{NO_SPACE}+$"

#: Where data or artifacts live: ``file:///abs``, ``pvc://CLAIM/path``, ``s3://bucket/key``,
#: ``gs://``, or a plain path (relative paths resolve against the RecJob file in local mode).
StorageUri = Annotated[
    str,
    StringConstraints(pattern=URI_PATTERN, min_length=1, max_length=2048),
]
