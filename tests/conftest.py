"""Shared test fixtures: repository paths, the generated CRD, sample documents."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml
from xdist.scheduler import LoadScopeScheduling

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


#: Where a parallel run (``make test``: two pytest-xdist workers) starts: the cluster tests
#: first, as one unit (about 40 minutes on a slow 2-core machine), then the longest folders,
#: so that the two workers finish at about the same time. tests/api comes second because
#: pytest-xdist hands each worker a second unit at the start, which the cluster's worker
#: keeps until the cluster tests end: a short module there, not a long one.
LONGEST_FIRST = (
    "cluster", "api", "local", "federated", "serving", "trainer", "examples", "operator",
)  # fmt: skip


def _folder_rank(path: str) -> int:
    parts = Path(path).parts
    folder = parts[1] if len(parts) > 2 and parts[0] == "tests" else ""
    return LONGEST_FIRST.index(folder) if folder in LONGEST_FIRST else len(LONGEST_FIRST)


class ClusterTogetherScheduling(LoadScopeScheduling):
    """pytest-xdist's per-module scheduling (a module's tests, and so its module fixtures
    such as trained models, stay on one worker), with every tests/cluster test in one unit:
    one worker runs them in file order (one cluster and one operator Deployment;
    test_zz_rbac reads the audit log the others made). Units go out in collection order,
    which the workers' collection hook below sorts longest folder first.

    Not pytest-xdist's loadgroup distribution: version 3.8 marks a group by rewriting
    ``item._nodeid``, which pytest 9 no longer reads, so each test became a unit of its own."""

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::", 1)[0]
        return "tests/cluster" if _folder_rank(path) == LONGEST_FIRST.index("cluster") else path


class _XdistScheduling:
    @staticmethod
    def pytest_xdist_make_scheduler(config: pytest.Config, log) -> ClusterTogetherScheduling:
        """The scheduler of a parallel run (``pytest -n N``): units in collection order
        (pytest-xdist would otherwise sort them by their number of tests)."""
        config.option.loadscopereorder = False
        return ClusterTogetherScheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    """Schedule parallel runs with :class:`ClusterTogetherScheduling` (pytest-xdist loaded)."""
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistScheduling(), "recjob-xdist-scheduling")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a pytest-xdist worker, the longest folders first (stable: file order within a
    folder). A run without workers is left as collected."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: _folder_rank(item.nodeid.split("::", 1)[0]))
