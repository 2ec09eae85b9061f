"""RecJob validation: a document parsed by the API types, schema errors from pydantic turned
into problems that name the field path (``spec.rollout.steps[2]``) and what was expected,
then the semantic rules beyond the schema (:mod:`.semantics`). Validation never raises on
bad input; it returns problems (:func:`parse_recjob` raises them together).
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, ValidationError

from .problems import Problem, RecJobInvalid
from .semantics import semantic_problems
from .v1alpha1 import RecJob
from .v1alpha1.common import (
    DNS_LABEL_PATTERN,
    DURATION_PATTERN,
    URI_PATTERN,
    URL_PATTERN,
)
from .v1alpha1.recjob import NAME_PATTERN
from .v1alpha1.spec_base import METRIC_PATTERN
from .v1alpha1.uris import uri_problem

__all__ = [
    "Problem",
    "RecJobInvalid",
    "parse_recjob",
    "validate_document",
]

#: Human words for the regular expressions of the API types.
_PATTERN_WORDS = {
    DURATION_PATTERN: "a duration such as 30s, 5m or 1h30m (units ms, s, m, h; at most 6 "
    "digits before a unit)",
    DNS_LABEL_PATTERN: "a DNS label: lowercase letters, digits and '-', starting with a letter",
    NAME_PATTERN: "a DNS label: lowercase letters, digits and '-', starting with a letter",
    URI_PATTERN: (
        "a storage URI (file:///absolute/path, pvc://CLAIM/path, s3://BUCKET/key, "
        "gs://BUCKET/key) or a path"
    ),
    METRIC_PATTERN: "a metric: auc, logloss, rmse, mrr, auto, or ndcg|hr|recall|precision@K",
    URL_PATTERN: "an http(s) URL",
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$": "a DNS label: lowercase letters, digits and '-'",
}


def parse_recjob(document: Any) -> RecJob:
    """Validate a RecJob document (a dict) and return the typed object, or raise RecJobInvalid."""
    job, problems = validate_document(document)
    if problems or job is None:
        raise RecJobInvalid(problems)
    return job


def validate_document(
    document: Any, semantics: Callable[[RecJob], list[Problem]] | None = None
) -> tuple[RecJob | None, list[Problem]]:
    """Schema and semantic validation of one document; never raises on bad input.
    ``semantics``: what finds the semantic problems of a RecJob that passed the schema
    (default :func:`semantic_problems`; the operator's daemon remembers them per
    generation)."""
    if not isinstance(document, dict):
        return None, [Problem("", f"expected a RecJob object (a mapping), got {_kind(document)}")]
    try:
        job = RecJob.model_validate(document)
    except ValidationError as error:
        errors = error.errors()
        problems = [_problem_from_error(e) for e in errors]
        return None, problems + _semantic_problems_elsewhere(document, errors)
    return job, (semantics or semantic_problems)(job)


def _semantic_problems_elsewhere(document: dict, errors: list[dict[str, Any]]) -> list[Problem]:
    """Semantic problems in the parts of a document that have no schema error.

    The fields with schema errors are removed (so defaults stand in for them); if the rest
    then parses, its semantic problems are reported too, except those about removed fields.
    """
    repaired = copy.deepcopy(document)
    removed: list[str] = []
    for error in errors:
        loc = list(error.get("loc", ()))
        while loc and isinstance(loc[-1], int):
            loc.pop()  # a bad list element: fall back to the whole list's default
        if error.get("type") == "missing" or not loc or not _delete(repaired, loc):
            return []
        removed.append(_path(loc))
    try:
        job = RecJob.model_validate(repaired)
    except ValidationError:
        return []
    return [
        p
        for p in semantic_problems(job)
        if not any(p.path == r or p.path.startswith((r + ".", r + "[")) for r in removed)
    ]


def _delete(document: Any, loc: list[Any]) -> bool:
    node = document
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(node, dict) and loc[-1] in node:
        del node[loc[-1]]
        return True
    return isinstance(node, dict)  # already gone (an earlier error removed it)


# --------------------------------------------------------------------------- schema errors
def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _problem_from_error(error: dict[str, Any]) -> Problem:
    loc = list(error.get("loc", ()))
    kind = error.get("type", "")
    value = error.get("input")
    if kind == "missing":
        return Problem(_path(loc), "required field is missing")
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1])
        hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
        return Problem(_path(loc), f"unknown field {loc[-1]!r}{hint}")
    if kind == "string_pattern_mismatch":
        pattern = (error.get("ctx") or {}).get("pattern", "")
        if pattern == URI_PATTERN and isinstance(value, str) and (why := uri_problem(value)):
            return Problem(_path(loc), f"{why} (got {_short(value)})")
        expected = _PATTERN_WORDS.get(pattern, f"text matching {pattern}")
        return Problem(_path(loc), f"expected {expected} (got {_short(value)})")
    message = error.get("msg", "invalid value")
    if kind == "value_error":
        return Problem(_path(loc), message.removeprefix("Value error, "))
    message = message.replace("Input should be", "expected", 1)
    got = "null" if value is None else f"{_kind(value)} {_short(value)}"
    return Problem(_path(loc), f"{message} (got {got})")


def _allowed_fields(loc: list[Any]) -> list[str]:
    """The field names (camelCase) accepted at ``loc``, walking the API types."""
    model: Any = RecJob
    for part in loc:
        model = _unwrap(model)
        if isinstance(part, int):
            args = typing.get_args(model)
            model = args[0] if args else None
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        field = next(
            (f for n, f in model.model_fields.items() if (f.alias or n) == part or n == part), None
        )
        if field is None:
            return []
        model = field.annotation
    model = _unwrap(model)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return sorted(f.alias or n for n, f in model.model_fields.items())
    return []


def _unwrap(annotation: Any) -> Any:
    """Strip Optional / Annotated from a type annotation."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation
