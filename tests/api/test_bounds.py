"""Values that pass the types but would crash later are refused up front, naming the field.

Seeds beyond numpy's 32 bits, durations that overflow a timedelta (or Go's duration in the
API server's CEL), integers beyond int64 (every integer field has a maximum of 2^53 - 1),
infinities and NaN, approval annotations that ``str.isdigit()`` accepts but ``int()``
does not.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from recjob_operator.api.v1alpha1 import parse_duration
from recjob_operator.api.v1alpha1.common import (
    DURATION_MAX_LENGTH,
    MAX_INTEGER,
    SEED_MAX,
    parse_generation,
)
from recjob_operator.api.validation import validate_document
from recjob_operator.crd import openapi_schema
from recjob_operator.schema import iter_schema_nodes
from tests.api.test_invalid import mutate
from tests.conftest import MINIMAL, REPO, load_yaml

SEARCH = load_yaml(REPO / "examples" / "recjob-search.yaml")
REFERENCE = load_yaml(REPO / "examples" / "recjob-reference.yaml")


def problems_at(document: dict, path: str) -> list[str]:
    """The messages of the problems at ``path`` (validation never raises)."""
    _, problems = validate_document(document)
    return [p.message for p in problems if p.path == path]


# --------------------------------------------------------------------------- seeds
SEEDS = [
    "spec.training.seed",
    "spec.data.preprocessing.split.seed",
    "spec.data.preprocessing.negativeSampling.seed",
]


@pytest.mark.parametrize("path", SEEDS)
def test_seeds_must_fit_numpy(path: str) -> None:
    """The trainer calls np.random.seed(seed), which takes 0 .. 2**32 - 1 only."""
    np = pytest.importorskip("numpy")
    np.random.seed(SEED_MAX)
    with pytest.raises(ValueError):
        np.random.seed(SEED_MAX + 1)
    assert problems_at(mutate(SEARCH, {path: SEED_MAX}), path) == []
    messages = problems_at(mutate(SEARCH, {path: 4294967296}), path)
    assert messages and "less than or equal to 4294967295" in messages[0]


# --------------------------------------------------------------------------- durations
DURATIONS = ["spec.rollout.interval", "spec.rollout.noData.deadline"]


def test_every_duration_field_is_known() -> None:
    """The duration fields are the ones tested here (a new one must be added)."""
    found = [
        path
        for path, node in iter_schema_nodes(openapi_schema())
        if node.get("pattern", "").startswith("^([0-9]{1,6}")
    ]
    assert sorted(found) == sorted(f".{p}" for p in DURATIONS)


@pytest.mark.parametrize("path", DURATIONS)
@pytest.mark.parametrize("value", ["99999999999999999999h", "9999999h", "1h" * 11])
def test_overflowing_durations_are_refused(path: str, value: str) -> None:
    document = mutate(SEARCH, {"spec.rollout.noData.deadline": "1h", path: value})
    messages = problems_at(document, path)
    assert messages and "duration" in messages[0] and "6 digits" in messages[0]
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_the_longest_duration_fits_timedelta_go_and_datetime() -> None:
    """Within the pattern (6 digits a number, 20 characters) the largest duration is about
    2.1 million hours: below Go's time.Duration limit (~2.56 million hours, what CEL's
    duration() in the API server parses into) and far from timedelta's."""
    longest = "999999h999999.9999h"
    assert len(longest) <= DURATION_MAX_LENGTH
    document = mutate(
        SEARCH, {"spec.rollout.interval": "1s", "spec.rollout.noData.deadline": longest}
    )
    job, problems = validate_document(document)
    assert problems == [] and job is not None
    delta = parse_duration(longest)
    assert delta.total_seconds() < (2**63 - 1) / 1e9  # Go's duration, in seconds
    assert datetime.now(UTC) + delta > datetime.now(UTC)  # the core adds it to now


def test_cel_duration_rules_never_error_on_accepted_durations() -> None:
    from tests.api.cel_harness import cel_failures

    document = mutate(SEARCH, {"spec.rollout.interval": "1s",
                               "spec.rollout.noData.deadline": "999999h999999.9999h"})  # fmt: skip
    assert cel_failures(document) == []


# --------------------------------------------------------------------------- integers
def _integer_fields(schema: dict, prefix: str = "") -> list[tuple[str, dict]]:
    out = []
    for name, sub in schema.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        if sub.get("type") == "integer":
            out.append((path, sub))
        elif sub.get("type") == "object":
            out += _integer_fields(sub, path)
    return out


SPEC_INTEGERS = _integer_fields(openapi_schema()["properties"]["spec"], "spec")


def test_every_integer_of_the_crd_is_an_int64_with_a_maximum() -> None:
    """``format: int64`` and a maximum the API server can read (a float64-exact one)."""
    nodes = [
        (path, node)
        for path, node in iter_schema_nodes(openapi_schema())
        if node.get("type") == "integer" and "<anyOf" not in path
    ]
    assert len(nodes) > 40
    for path, node in nodes:
        assert node.get("format") == "int64", path
        if path.startswith(".spec") or path.startswith(".status"):
            assert node.get("maximum", MAX_INTEGER + 1) <= MAX_INTEGER, path


@pytest.mark.parametrize("path", [p for p, _ in SPEC_INTEGERS])
@pytest.mark.parametrize("value", [2**63, 10**30])
def test_integers_beyond_int64_are_refused_naming_the_field(path: str, value: int) -> None:
    messages = problems_at(mutate(REFERENCE, {path: value}), path)
    assert messages and "less than or equal to" in messages[0], path


def test_huge_integers_elsewhere_are_refused() -> None:
    document = mutate(MINIMAL, {"metadata.generation": 2**64})
    assert problems_at(document, "metadata.generation")
    for value in (2**63, 10**30):
        document = mutate(SEARCH, {"spec.training.resources.cpu": value})
        messages = problems_at(document, "spec.training.resources.cpu")
        assert messages and f"at most {MAX_INTEGER}" in messages[0]
    document = mutate(SEARCH, {"spec.rollout.steps": [10, 2**64, 100]})
    assert problems_at(document, "spec.rollout.steps[1]")


# --------------------------------------------------------------------------- numbers
@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.training.learningRate", float("inf")),
        ("spec.training.gradientClipping", float("inf")),
        ("spec.compression", {"distillation": {"taskWeight": float("inf")}}),
        ("spec.rollout.metrics[0].max", float("nan")),
        ("spec.rollout.metrics[0].max", float("-inf")),
    ],
)
def test_infinity_and_nan_are_refused(path: str, value: Any) -> None:
    _, problems = validate_document(mutate(SEARCH, {path: value}))
    assert any(p.path.startswith(path) and "finite" in p.message for p in problems), problems


# --------------------------------------------------------------------------- annotations
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", 3),
        ("0012", 12),
        ("²", None),  # isdigit() is True, int() fails
        ("١٢", None),  # Arabic-Indic digits: int() takes them, a generation is ASCII
        ("", None),
        (None, None),
        ("-1", None),
        ("1.0", None),
        (" 3", None),
        ("9" * 19, int("9" * 19)),
        ("9" * 5000, None),  # int() refuses more than 4300 digits
    ],
)
def test_parse_generation(text: str | None, expected: int | None) -> None:
    assert parse_generation(text) == expected


def test_local_mode_reads_a_superscript_approval_without_crashing(tmp_path: Path) -> None:
    from recjob_operator.api.validation import parse_recjob
    from recjob_operator.local.backend import LocalBackend

    document = mutate(MINIMAL, {"metadata.annotations": {"recjob.dev/approve-generation": "²"}})
    job = parse_recjob(document)
    observed = LocalBackend(tmp_path, tmp_path / "recjob.yaml").observe(job)
    assert observed.approved_generation is None
