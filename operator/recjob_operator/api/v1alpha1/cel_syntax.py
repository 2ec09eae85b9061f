"""The building blocks of the RecJob's CEL rules (``x-kubernetes-validations``): one rule,
a schema's rule list, CEL string literals, and the regexes that tell a known query
placeholder from an unknown one (RE2 has no lookahead). The rules themselves: ``cel.py``,
``cel_federated.py``, ``cel_delivery.py``."""

from __future__ import annotations

import re
from typing import Any

from .common import PLACEHOLDER_SPACE, QUERY_PLACEHOLDERS

Rules = list[dict[str, str]]

#: Most canary steps (RolloutSpec.steps maxItems); the step rules index up to this.
MAX_STEPS = 20


def rule(expression: str, message: str, field_path: str = "", reason: str = "") -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry (``reason``: a Kubernetes FieldValue* cause)."""
    out = {"rule": expression, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


def schema_rules(*rules: dict[str, str]) -> dict[str, Any]:
    """The ``json_schema_extra`` that puts ``rules`` on a model's or field's schema."""
    return {"x-kubernetes-validations": list(rules)}


def cel_string(text: str) -> str:
    """``text`` as a CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def one_of(expression: str, values: list[str]) -> str:
    """CEL: ``expression`` is one of ``values``."""
    return f"{expression} in [{', '.join(cel_string(v) for v in values)}]"


#: No rule uses ``FieldValueDuplicate``: the API server reports it as ``Duplicate value``
#: without the rule's message (tests/cluster/test_api_validation.py).
REQUIRED, FORBIDDEN = "FieldValueRequired", "FieldValueForbidden"


# --------------------------------------------------------------------------- placeholders
_IDENTIFIER_START = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_"
_IDENTIFIER_REST = _IDENTIFIER_START + "0123456789"


def _char_class(chars: str) -> str:
    """A regex character class of ``chars`` written as ranges."""
    codes = sorted({ord(c) for c in chars})
    parts, start = [], 0
    while start < len(codes):
        end = start
        while end + 1 < len(codes) and codes[end + 1] == codes[end] + 1:
            end += 1
        first, last = chr(codes[start]), chr(codes[end])
        parts.append(first if first == last else f"{first}-{last}")
        start = end + 1
    return "[" + "".join(parts) + "]"


def _not_in(words: list[str], allowed: str, at_root: bool) -> str:
    """A regex for the identifiers (first character from ``allowed``) not in ``words``,
    built from the words' trie: leave it at some character, stop early, or go on past it.
    RE2 has no lookahead, so this is how CEL tells an unknown placeholder from a known one."""
    children: dict[str, list[str]] = {}
    for word in words:
        if word:
            children.setdefault(word[0], []).append(word[1:])
    branches = []
    if not at_root and "" not in words:
        branches.append("")  # the identifier ends here, a proper prefix of a known name
    others = "".join(c for c in allowed if c not in children)
    # RE2's \w is exactly [0-9A-Za-z_], in the API server and in cel-python alike
    if others == _IDENTIFIER_REST:
        branches.append(r"\w+")
    elif others:
        branches.append(_char_class(others) + r"\w*")
    for char in sorted(children):
        branches.append(re.escape(char) + _not_in(children[char], _IDENTIFIER_REST, False))
    return "(" + "|".join(branches) + ")"


#: A ``{{name}}`` placeholder; spaces are spelled out (RE2's and Python's \s differ).
PLACEHOLDER_PATTERN = (
    rf"\{{\{{{PLACEHOLDER_SPACE}*([A-Za-z_][A-Za-z0-9_]*){PLACEHOLDER_SPACE}*\}}\}}"
)
REVISION_PATTERN = rf"\{{\{{{PLACEHOLDER_SPACE}*revision{PLACEHOLDER_SPACE}*\}}\}}"
UNKNOWN_PLACEHOLDER_PATTERN = (
    rf"\{{\{{{PLACEHOLDER_SPACE}*"
    + _not_in(list(QUERY_PLACEHOLDERS), _IDENTIFIER_START, True)
    + rf"{PLACEHOLDER_SPACE}*\}}\}}"
)
KNOWN_PLACEHOLDERS = ", ".join("{{" + name + "}}" for name in QUERY_PLACEHOLDERS)
