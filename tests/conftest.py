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


#: Where a worker starts: the cluster tests first (one cluster, one operator Deployment),
#: then the longest folders.
LONGEST_FIRST = (
    "cluster", "local", "federated", "serving", "trainer", "examples", "api", "operator",
)  # fmt: skip

#: The heavy lane of a parallel run (``make test``: two pytest-xdist workers): the cluster
#: tests and the modules that train, convert, federate or run `recjob run` with several
#: processes each. On 2 cores these are CPU-bound, and two of them side by side ran slower
#: than one after the other (the CI run of 2026-12-05: 68 min of the serial run's work in
#: 87 min). They run in one unit, on one worker, in the order above; the other worker runs
#: the many short tests (API, operator, unit tests, single servers) beside them.
HEAVY = (
    "tests/cluster/",
    "tests/local/",
    "tests/examples/",
    "tests/federated/test_local_federation.py",
    "tests/federated/test_silo_dropout.py",
    "tests/serving/test_export_gate.py",
    "tests/trainer/test_best_model.py",
    "tests/trainer/test_checkpoint_safety.py",
    "tests/trainer/test_object_store_runs.py",
    "tests/trainer/test_pytorchjob_launch.py",
    "tests/trainer/test_storage.py",
    "tests/trainer/test_training.py",
)


def _folder_rank(path: str) -> int:
    parts = Path(path).parts
    folder = parts[1] if len(parts) > 2 and parts[0] == "tests" else ""
    return LONGEST_FIRST.index(folder) if folder in LONGEST_FIRST else len(LONGEST_FIRST)


class HeavyLaneScheduling(LoadScopeScheduling):
    """pytest-xdist's per-module scheduling (a module's tests, and so its module fixtures
    such as trained models, stay on one worker), with every :data:`HEAVY` test in one unit:
    one worker runs them in order (the cluster tests in file order: test_zz_rbac reads the
    audit log the others made). Units go out in collection order, which the workers'
    collection hook below sorts.

    Not pytest-xdist's loadgroup distribution: version 3.8 marks a group by rewriting
    ``item._nodeid``, which pytest 9 no longer reads, so each test became a unit of its own."""

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::", 1)[0]
        return "heavy" if path.startswith(HEAVY) else path


class _XdistScheduling:
    @staticmethod
    def pytest_xdist_make_scheduler(config: pytest.Config, log) -> HeavyLaneScheduling:
        """The scheduler of a parallel run (``pytest -n N``): units in collection order
        (pytest-xdist would otherwise sort them by their number of tests)."""
        config.option.loadscopereorder = False
        return HeavyLaneScheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    """Schedule parallel runs with :class:`HeavyLaneScheduling` (pytest-xdist loaded)."""
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistScheduling(), "recjob-xdist-scheduling")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a pytest-xdist worker, the heavy lane first, then the longest folders (stable:
    file order within a folder). A run without workers is left as collected."""
    if hasattr(config, "workerinput"):

        def rank(item: pytest.Item) -> tuple[bool, int]:
            path = item.nodeid.split("::", 1)[0]
            return (not path.startswith(HEAVY), _folder_rank(path))

        items.sort(key=rank)
