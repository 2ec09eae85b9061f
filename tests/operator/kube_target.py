"""The API server the Kubernetes-level tests talk to: a real kube-apiserver (tests/envtest.py:
etcd + kube-apiserver, no controllers; the tests play the controllers) by default, or a whole
cluster when ``RECJOB_TEST_KUBECONFIG`` names its kubeconfig.

    RECJOB_TEST_KUBECONFIG=.cluster/kubeconfig RECJOB_TEST_NAMESPACE=recjob-test \\
        .venv/bin/python -m pytest tests/operator/test_kube_reconciler.py

On a whole cluster the namespace is created if missing (objects made by a test carry its
unique name and are deleted at the end); tests needing a resource the cluster does not
serve (the RecJob CRD, Kubeflow's PyTorchJob) skip. ``target.env`` is the EnvTest (None on
a whole cluster): where no controller runs, a test writes what the controller would.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.envtest import PYTORCHJOB_CRD, RECJOB_CRD, EnvTest


@dataclass
class KubeTarget:
    """An API server to test against."""

    api: client.ApiClient
    namespace: str
    kubeconfig: Path
    env: EnvTest | None = None
    """The envtest API server (None on a whole cluster): no controllers run there."""

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


@contextmanager
def kube_target(tmp: Path) -> Iterator[KubeTarget]:
    """A :class:`KubeTarget`: the cluster of ``RECJOB_TEST_KUBECONFIG``, else an envtest
    API server with the RecJob and PyTorchJob CRDs (stopped on exit)."""
    kubeconfig = os.environ.get("RECJOB_TEST_KUBECONFIG")
    if kubeconfig:
        namespace = os.environ.get("RECJOB_TEST_NAMESPACE", "recjob-test")
        api = config.new_client_from_config(kubeconfig)
        try:
            client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
        except ApiException as error:
            if error.status != 409:
                raise
        yield KubeTarget(api, namespace, Path(kubeconfig))
        return
    with EnvTest(tmp / "envtest", crds=[RECJOB_CRD, PYTORCHJOB_CRD]) as env:
        env.namespace("recjob-test")
        yield KubeTarget(env.client(), "recjob-test", env.kubeconfig, env)
