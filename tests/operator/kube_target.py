"""The API server the Kubernetes-level tests talk to: the project's fake one by default, a
real cluster when ``RECJOB_TEST_KUBECONFIG`` names its kubeconfig.

    RECJOB_TEST_KUBECONFIG=~/.kube/config RECJOB_TEST_NAMESPACE=recjob-test \\
        .venv/bin/python -m pytest tests/operator/test_kube_api.py

On a real cluster the namespace is created if missing (objects made by a test carry its
unique name and are deleted at the end); tests needing a resource the cluster does not
serve (the RecJob CRD, Kubeflow's PyTorchJob) skip. Fault injection differs by target:
``target.fake`` tells which one runs.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from recjob_operator.testing.fakeapi import DEFAULT_RESOURCES, FakeApiServer


@dataclass
class KubeTarget:
    """An API server to test against."""

    api: client.ApiClient
    namespace: str
    kubeconfig: Path
    server: FakeApiServer | None = None
    """The fake API server (None on a real cluster)."""

    @property
    def fake(self) -> bool:
        return self.server is not None

    def serves(self, group: str, version: str, plural: str) -> bool:
        """Whether the API server serves ``group/version`` ``plural`` (discovery)."""
        try:
            found = client.CustomObjectsApi(self.api).get_api_resources(group, version)
        except ApiException:
            return False
        return plural in {r.name for r in found.resources or []}

    def require(self, group: str, version: str, plural: str) -> None:
        """Skip the test unless ``plural`` is served."""
        if not self.serves(group, version, plural):
            pytest.skip(f"{group}/{version} {plural} is not served by the test cluster")


def unique(prefix: str) -> str:
    """A name no earlier run used (real clusters keep objects of failed runs)."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def start_target(tmp: Path) -> tuple[KubeTarget, FakeApiServer | None]:
    """A :class:`KubeTarget` (and the fake server to stop, if one was started)."""
    kubeconfig = os.environ.get("RECJOB_TEST_KUBECONFIG")
    if kubeconfig:
        namespace = os.environ.get("RECJOB_TEST_NAMESPACE", "recjob-test")
        api = config.new_client_from_config(kubeconfig)
        try:
            client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
        except ApiException as error:
            if error.status != 409:
                raise
        return KubeTarget(api, namespace, Path(kubeconfig)), None
    server = FakeApiServer().start()
    namespaces = next(r for r in DEFAULT_RESOURCES if r.plural == "namespaces")
    server.call(server.store.seed, namespaces, {"metadata": {"name": "recjob-test"}})
    path = tmp / "kubeconfig"
    server.kubeconfig(path)
    api = config.new_client_from_config(str(path))
    return KubeTarget(api, "recjob-test", path, server), server
