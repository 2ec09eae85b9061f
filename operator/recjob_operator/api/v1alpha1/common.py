"""Building blocks shared by the RecJob spec and status: the base model and field types."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Annotated, Any

from pydantic import (
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
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")

#: A Go-style duration such as ``30s``, ``1m30s``, ``2h`` (units ms, s, m, h).
Duration = Annotated[
    str,
    StringConstraints(pattern=DURATION_PATTERN),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration such as 30s, 5m or 1h30m (units ms, s, m, h).",
        }
    ),
]


def parse_duration(text: str) -> timedelta:
    """Parse a Go-style duration (``1m30s``) into a timedelta; ValueError if malformed."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"expected a duration such as 30s, 5m or 1h30m, got {text!r}")
    seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
    return timedelta(seconds=seconds)


QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)


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
        value = str(value)
    if isinstance(value, str):
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
            "pattern": QUANTITY_PATTERN,
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
URI_PATTERN = rf"^((file|pvc|s3|gs)://{NO_SPACE}+|/{NO_SPACE}*|\.{{0,2}}/?[^:\x00-\x20\x7f]+)$"
URL_PATTERN = rf"^https?://{NO_SPACE}+$"

#: Where data or artifacts live: ``file://``, ``pvc://CLAIM/path``, ``s3://bucket/key``,
#: ``gs://``, or a plain path (relative paths resolve against the RecJob file in local mode).
StorageUri = Annotated[
    str,
    StringConstraints(pattern=URI_PATTERN, min_length=1, max_length=2048),
]
