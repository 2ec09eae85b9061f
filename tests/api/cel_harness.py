"""Evaluate the CRD's ``x-kubernetes-validations`` rules on a RecJob as the API server would.

The API server prunes nulls, applies the schema's defaults, gives every value its schema
type (a JSON ``0`` in a ``type: number`` field is the double ``0.0``) and evaluates each
rule with ``self`` bound to the node that carries it. This module does the same with
cel-python (``celpy``, RE2 for ``matches``); a rule whose evaluation errors counts as a
failure, as it does in the API server.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jsonschema
import pytest

from recjob_operator import crd
from recjob_operator.schema import (
    apply_defaults,
    iter_schema_nodes,
    openapi_to_jsonschema,
    prune_nulls,
)

celpy = pytest.importorskip("celpy", reason="cel-python (dev extra) evaluates the CEL rules")


@dataclass(frozen=True)
class Failure:
    """A rule that refused a value: where (``path`` + its fieldPath) and why."""

    path: str
    message: str
    rule: str
    error: str | None = None


def _typed(value: Any, schema: dict) -> Any:
    """``value`` with the numbers its schema declares as ``number`` made floats."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {
            k: _typed(v, props.get(k, extra if isinstance(extra, dict) else {}))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_typed(v, schema.get("items", {})) for v in value]
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@functools.cache
def openapi_schema() -> dict:
    """The CRD's schema (built once; do not change it)."""
    return crd.openapi_schema()


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(openapi_to_jsonschema(openapi_schema()))


def schema_errors(document: dict) -> list[str]:
    """What the API server's OpenAPI check refuses in ``document`` (stored form)."""
    return [e.message for e in _validator().iter_errors(stored(document))]


@functools.cache
def _environment() -> Any:
    return celpy.Environment()


@functools.cache
def compiled(expression: str) -> Any:
    """The cel-python program of one rule (compiled once)."""
    env = _environment()
    return env.program(env.compile(expression))


def all_rules() -> list[tuple[str, dict]]:
    """(schema path, rule) of every rule in the CRD's schema."""
    return [
        (path, rule)
        for path, node in iter_schema_nodes(openapi_schema())
        for rule in node.get("x-kubernetes-validations", [])
    ]


def stored(document: dict) -> dict:
    """What the API server would store for ``document``: null-pruned and defaulted."""
    schema = openapi_schema()
    return apply_defaults(prune_nulls(document, schema), schema)


def _walk(value: Any, schema: dict, path: str, out: list[Failure]) -> None:
    rules = schema.get("x-kubernetes-validations", [])
    activation = {"self": celpy.json_to_cel(value)} if rules else {}
    for rule in rules:
        try:
            result = compiled(rule["rule"]).evaluate(activation)
        except Exception as error:  # CELEvalError: refused, as by the API server
            out.append(Failure(path + rule.get("fieldPath", ""), rule["message"], rule["rule"],
                               str(error)))  # fmt: skip
            continue
        if isinstance(result, celpy.CELEvalError):
            out.append(Failure(path + rule.get("fieldPath", ""), rule["message"], rule["rule"],
                               str(result)))  # fmt: skip
        elif not bool(result):
            out.append(Failure(path + rule.get("fieldPath", ""), rule["message"], rule["rule"]))
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _walk(value[key], sub, f"{path}.{key}", out)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _walk(item, schema["items"], f"{path}[{i}]", out)


def cel_failures(document: dict) -> list[Failure]:
    """Every CEL rule of the CRD that ``document`` breaks (paths like ``spec.data.format``)."""
    schema = openapi_schema()
    obj = _typed(stored(document), schema)
    out: list[Failure] = []
    _walk(obj, schema, "", out)
    return [Failure(f.path.lstrip("."), f.message, f.rule, f.error) for f in out]
