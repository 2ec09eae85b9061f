"""Translate between JSON Schema (pydantic) and the OpenAPI v3 dialect Kubernetes CRDs use.

- :func:`structural_schema` turns a pydantic model into a *structural* CRD schema
  (no ``$ref``, every node typed, OpenAPI 3.0 keywords, defaults kept).
- :func:`openapi_to_jsonschema` turns a CRD's OpenAPI schema back into a JSON Schema that
  the ``jsonschema`` library can validate objects with (nullable, int-or-string,
  preserve-unknown-fields, embedded resources), for our CRD and the upstream ones alike.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema

# Keywords a structural schema may not carry (or that have no OpenAPI 3.0 meaning).
_DROPPED_KEYWORDS = {"title", "$schema", "examples"}


class _DefaultsFromFactories(GenerateJsonSchema):
    """Like pydantic's generator, but also shows defaults that come from factories.

    Object (sub-model) and list defaults are written out in full: the API server checks
    a default against the schema's CEL rules as it stands, without applying the nested
    defaults first, so ``default: {}`` would fail every rule that reads a defaulted field.
    """

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        if "default" in schema:
            return schema["default"]
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return NoDefault
        return _dump(factory())


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of ``model`` for a CustomResourceDefinition."""
    raw = model.model_json_schema(by_alias=True, schema_generator=_DefaultsFromFactories)
    definitions = raw.pop("$defs", {})
    return _to_openapi(raw, definitions)


def _resolve(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    target = definitions[ref.rsplit("/", 1)[-1]]
    merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return _resolve(merged, definitions)


def _to_openapi(
    node: dict[str, Any], definitions: dict[str, Any], bounds: bool = True
) -> dict[str, Any]:
    """One node of the structural schema (``bounds``: add :func:`_add_bounds`'s; not in the
    int-or-string anyOf branches, which must stay bare ``{type: integer}``)."""
    node = _resolve(dict(node), definitions)
    # Optional[X]: `anyOf: [X, null]` -> X (an absent field is how a RecJob says "unset").
    any_of = node.get("anyOf")
    if any_of and any(branch.get("type") == "null" for branch in any_of):
        rest = [b for b in any_of if b.get("type") != "null"]
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        if outer.get("default", 0) is None:
            del outer["default"]
        if len(rest) == 1:
            node = {**_resolve(rest[0], definitions), **outer}
        else:
            node = {**outer, "anyOf": rest}
        return _to_openapi(node, definitions)

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYWORDS:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "properties":
            out[key] = {name: _to_openapi(sub, definitions) for name, sub in value.items()}
        elif key == "items":
            out[key] = _to_openapi(value, definitions)
        elif key == "additionalProperties":
            if value is False:
                continue  # structural schemas prune unknown fields; false is not allowed
            if value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
            else:
                out[key] = _to_openapi(value, definitions)
        elif key == "anyOf":
            out[key] = [_to_openapi(b, definitions, bounds=False) for b in value]
        else:
            out[key] = value
    if bounds:
        _add_bounds(out)
    if (
        out.get("type") == "object"
        and "properties" not in out
        and "additionalProperties" not in out
    ):
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _add_bounds(node: dict[str, Any]) -> None:
    """Bounds the API server uses: integers are int64, and an enum's strings are no longer
    than its longest value (CEL rules comparing them then have an estimable cost)."""
    if node.get("type") == "integer":
        node.setdefault("format", "int64")
    enum = node.get("enum")
    if node.get("type") == "string" and enum and all(isinstance(v, str) for v in enum):
        node.setdefault("maxLength", max(len(v) for v in enum))


def iter_schema_nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict]]:
    """Yield (path, node) for every node of an OpenAPI schema (for structural checks)."""
    yield path or ".", schema
    for name, sub in schema.get("properties", {}).items():
        yield from iter_schema_nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from iter_schema_nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from iter_schema_nodes(schema["additionalProperties"], f"{path}{{}}")
    for i, branch in enumerate(schema.get("anyOf", [])):
        yield from iter_schema_nodes(branch, f"{path}<anyOf{i}>")


def structural_violations(schema: dict[str, Any]) -> list[str]:
    """Rules of Kubernetes structural schemas that ``schema`` breaks (empty if none)."""
    problems = []
    for path, node in iter_schema_nodes(schema):
        in_any_of = "<anyOf" in path.rsplit(".", 1)[-1]
        special = node.get("x-kubernetes-int-or-string") or node.get(
            "x-kubernetes-preserve-unknown-fields"
        )
        if not in_any_of and "type" not in node and not special:
            problems.append(f"{path}: no type")
        for keyword in ("$ref", "$defs", "definitions", "const", "title", "oneOf", "allOf"):
            if keyword in node:
                problems.append(f"{path}: keyword {keyword} is not allowed")
        if node.get("additionalProperties") is False:
            problems.append(f"{path}: additionalProperties: false is not allowed")
        if "additionalProperties" in node and "properties" in node:
            problems.append(f"{path}: properties and additionalProperties are exclusive")
        for keyword in ("exclusiveMinimum", "exclusiveMaximum"):
            if keyword in node and not isinstance(node[keyword], bool):
                problems.append(f"{path}: {keyword} must be a boolean in OpenAPI v3.0")
        if node.get("uniqueItems") is True:
            problems.append(f"{path}: uniqueItems: true is not allowed")
        if in_any_of and ("default" in node or "description" in node):
            problems.append(f"{path}: anyOf branches may not carry default or description")
    return problems


def openapi_to_jsonschema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) equivalent of a CRD's OpenAPI v3 schema.

    Unknown fields are rejected unless the schema preserves them, as an API server with
    strict field validation does.
    """
    out = _openapi_node_to_jsonschema(copy.deepcopy(schema))
    # The API server checks metadata as ObjectMeta; a CRD may only restrict its name.
    metadata = out.get("properties", {}).get("metadata")
    if isinstance(metadata, dict):
        metadata.pop("additionalProperties", None)
    return out


def _openapi_node_to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {k: _openapi_node_to_jsonschema(v) for k, v in value.items()}
        elif (key == "items" and isinstance(value, dict)) or (
            key == "additionalProperties" and isinstance(value, dict)
        ):
            out[key] = _openapi_node_to_jsonschema(value)
        elif key in ("anyOf", "oneOf", "allOf"):
            out[key] = [_openapi_node_to_jsonschema(v) for v in value]
        elif key == "not":
            out[key] = _openapi_node_to_jsonschema(value)
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and isinstance(value, bool):
            continue  # handled below
        elif key.startswith("x-kubernetes-") or key in ("nullable", "default", "description"):
            continue
        else:
            out[key] = value
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(key) is True and bound in out:
            out[key] = out.pop(bound)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    preserve = node.get("x-kubernetes-preserve-unknown-fields") or node.get(
        "x-kubernetes-embedded-resource"
    )
    closed = out.get("type") == "object" and "properties" in out
    if closed and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def prune_nulls(obj: Any, schema: dict[str, Any]) -> Any:
    """Drop null values of fields that are not nullable, as the API server does before
    defaulting and validation."""
    if isinstance(obj, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = {}
        for key, value in obj.items():
            sub = props.get(key, extra if isinstance(extra, dict) else {})
            if value is None and not sub.get("nullable"):
                continue
            out[key] = prune_nulls(value, sub)
        return out
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [prune_nulls(v, schema["items"]) for v in obj]
    return obj


def apply_defaults(obj: Any, schema: dict[str, Any]) -> Any:
    """Fill in ``default`` values from a structural schema, as the API server does.

    A defaulted object is itself defaulted, so ``default: {}`` on an object field fills in
    the defaults of its children.
    """
    if isinstance(obj, dict):
        out = dict(obj)
        for key, sub in schema.get("properties", {}).items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = apply_defaults(out[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in out:
                if key not in schema.get("properties", {}):
                    out[key] = apply_defaults(out[key], extra)
        return out
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(v, schema["items"]) for v in obj]
    return obj
