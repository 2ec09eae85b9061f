"""Shared test fixtures: repository paths, the generated CRD, sample documents."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

# the object-store servers are session fixtures defined once for the whole suite: moto's
# in-process server keeps global state (users, auth), so two of them would collide
from tests.object_stores import gcs_env, s3_env, s3_server  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
#: ../shared beside the checkout (CI lays it there); RECJOB_SHARED overrides.
SHARED = Path(os.environ.get("RECJOB_SHARED", REPO.parent / "shared"))

EXAMPLES = sorted((REPO / "examples").glob("recjob-*.yaml"))
CLUSTER_SAMPLES = sorted((REPO / "manifests" / "samples").glob("recjob-*.yaml"))

MINIMAL = {
    "apiVersion": "recjob.dev/v1alpha1",
    "kind": "RecJob",
    "metadata": {"name": "minimal"},
    "spec": {
        "data": {
            "task": "search-ranking",
            "train": "data/train.csv",
            "columns": {"query": "q", "itemText": "title", "label": "relevance"},
        }
    },
}


@pytest.fixture
def minimal() -> dict:
    """A smallest valid RecJob (a fresh copy per test)."""
    return copy.deepcopy(MINIMAL)


def load_yaml(path: Path) -> dict:
    """The single YAML document in ``path``."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))
