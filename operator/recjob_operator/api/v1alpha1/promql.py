"""Canary queries kept inside the RecJob's namespace, checked on the parsed PromQL.

A RecJob's checks are PromQL templates. A tenant must not read another namespace's
metrics through them, so every series selector of the rendered query must carry the
equality matcher ``namespace="<the RecJob's namespace>"`` (with ``or`` matchers: every
alternative). The check is made on the syntax tree from ``promql-parser`` (the Rust
parser's Python binding), never on the text: a ``# {{revision}}`` comment or a string
that merely contains the label does not count.

Why a parser rather than prom-label-proxy in front of Prometheus: the operator refuses an
unscoped query when the RecJob is validated (``Valid=False`` naming the field, and in
``recjob validate``), before any canary runs, and again on every rendered query it sends;
no extra component sits on the metrics path, and a Prometheus the operator is configured
with needs no proxy deployed beside it.
"""

from __future__ import annotations

import functools
import re

import promql_parser

from .cel_syntax import PLACEHOLDER_PATTERN

#: The label every series selector must pin to the RecJob's namespace.
NAMESPACE_LABEL = "namespace"
#: Functions that read series outside the selectors written in the query.
_UNSCOPED_FUNCTIONS = frozenset({"info"})
#: Placeholder values used to check a template before any analysis has values.
CHECK_VALUES = {
    "revision": "recjob-check-v2",
    "stable": "recjob-check-v1",
    "namespace": "recjob-check-namespace",
    "service": "recjob-check",
    "interval": "60s",
}


_PLACEHOLDER = re.compile(PLACEHOLDER_PATTERN)


def render_query(template: str, values: dict[str, str]) -> str:
    """Fill ``{{name}}`` placeholders (unknown names are left alone: validation refuses
    them before a RecJob gets here)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


class QueryScopeError(ValueError):
    """A query that does not parse, or reads beyond one namespace."""


def _scoped(selector: promql_parser.VectorSelector, namespace: str) -> bool:
    groups = selector.matchers.or_matchers or [selector.matchers.matchers]
    return all(
        any(
            m.name == NAMESPACE_LABEL and m.op == promql_parser.MatchOp.Equal
            and m.value == namespace
            for m in group
        )
        for group in groups
    )  # fmt: skip


def check_scoped(promql: str, namespace: str) -> str:
    """Raise :class:`QueryScopeError` unless ``promql`` parses and every series selector in
    it matches ``namespace="<namespace>"`` exactly; returns the parsed query, printed (no
    comments)."""
    try:
        expr = promql_parser.parse(promql)
    except ValueError as error:
        raise QueryScopeError(f"not valid PromQL: {str(error)[:200]}") from None
    unscoped: list[str] = []
    functions: list[str] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and not _scoped(node, namespace):
            unscoped.append(str(node))
        elif isinstance(node, promql_parser.Call) and node.func.name in _UNSCOPED_FUNCTIONS:
            functions.append(node.func.name)

    promql_parser.walk(expr, visit)
    if functions:
        raise QueryScopeError(f"{functions[0]}() reads series from every namespace")
    if unscoped:
        shown = ", ".join(s if len(s) <= 120 else s[:117] + "..." for s in unscoped[:3])
        raise QueryScopeError(
            f"selector {shown} is not limited to the RecJob's namespace: every selector "
            'needs namespace="{{namespace}}"'
        )
    return str(expr)


@functools.lru_cache(maxsize=1024)
def check_template(template: str) -> None:
    """Check a query template as :func:`check_scoped` checks each of its renderings: with
    placeholder values whose namespace only ``{{namespace}}`` can produce. A template that
    passed is remembered (most RecJobs share the default ones; parsing them was 4% of the
    operator's CPU at 1,000 new RecJobs); one that fails raises each time."""
    try:
        parsed = check_scoped(render_query(template, CHECK_VALUES), CHECK_VALUES["namespace"])
    except QueryScopeError as error:  # shown as written: placeholders, not check values
        message = str(error)
        for name, value in CHECK_VALUES.items():
            message = message.replace(f'"{value}"', f'"{{{{{name}}}}}"')
        raise QueryScopeError(message.replace("[60s]", "[{{interval}}]")) from None
    if CHECK_VALUES["revision"] not in parsed:
        raise QueryScopeError(
            "must use {{revision}} in the query itself (a comment does not count)"
        )
