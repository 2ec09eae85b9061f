"""A federation's silo in another namespace, against a real API server (envtest by
default, :mod:`tests.operator.kube_target`): the objects made there carry no
ownerReference, so the backend deletes them itself, and only its own; without the Gateway
API's ReferenceGrant kind served, a silo elsewhere is refused before anything is created.
The whole path (the grant made, real SuperNode pods across namespaces) is
tests/cluster/test_federated.py's."""

from __future__ import annotations

import pytest
from kubernetes import client

from recjob_operator.api.v1alpha1.tls import make_tls_material
from recjob_operator.controller.actions import CreateTraining
from recjob_operator.controller.federation import federation_objects, superlink_dns_names
from recjob_operator.kube.backend import CREATE_KINDS, KubeBackend
from recjob_operator.kube.errors import ChildWriteError
from recjob_operator.kube.silo_namespaces import REFERENCE_GRANTS, check_grants
from tests.conftest import EXAMPLES, load_yaml
from tests.operator.kube_target import kube_target, unique
from tests.operator.test_children import job

FEDERATED = EXAMPLES[0].parent / "federated" / "recjob-federated.yaml"
T = "fed-g3-train"  # the training child of RecJob fed at model generation 3


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    with kube_target(tmp_path_factory.mktemp("silo-namespaces")) as target:
        yield target


@pytest.fixture
def elsewhere(target):
    """A second namespace (deleted afterwards)."""
    core = client.CoreV1Api(target.api)
    name = unique("silo")
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def federated(namespace: str, silo_namespace: str, name: str = "fed"):
    document = load_yaml(FEDERATED)
    document["metadata"]["name"] = name
    document["spec"]["training"]["federated"]["silos"][1]["namespace"] = silo_namespace
    recjob = job(document)
    recjob.metadata.namespace = namespace
    return recjob


def _in(target, namespace: str) -> set[tuple[str, str]]:
    """(kind, name) of the ConfigMaps, Deployments and NetworkPolicies in ``namespace``."""
    core, apps = client.CoreV1Api(target.api), client.AppsV1Api(target.api)
    net = client.NetworkingV1Api(target.api)
    found = set()
    for kind, call in (("ConfigMap", core.list_namespaced_config_map),
                       ("Deployment", apps.list_namespaced_deployment),
                       ("NetworkPolicy", net.list_namespaced_network_policy)):  # fmt: skip
        found |= {(kind, o.metadata.name) for o in call(namespace).items
                  if o.metadata.name != "kube-root-ca.crt"}  # fmt: skip
    return found


def _make(target, backend: KubeBackend, recjob) -> None:
    objects = federation_objects(recjob, make_tls_material(superlink_dns_names(recjob)))
    for obj in objects:
        if obj["kind"] in ("ConfigMap", "Deployment", "NetworkPolicy"):
            backend._create(obj["metadata"]["namespace"], CREATE_KINDS[obj["kind"]], obj)


def test_the_objects_made_elsewhere_go_with_the_federation_and_with_the_recjob(
    target, elsewhere
) -> None:
    backend = KubeBackend(target.api)
    ours = federated(target.namespace, elsewhere)
    _make(target, backend, ours)
    made = _in(target, elsewhere)
    assert made == {
        ("ConfigMap", f"{T}-silo-south-from-{target.namespace}"),
        ("Deployment", f"{T}-silo-south-from-{target.namespace}"),
        ("NetworkPolicy", f"{T}-silos-from-{target.namespace}"),
    }
    # the namespace's own RecJob of the same name, with a silo of the same name: same
    # names but for the suffix, same federation label; only its owner-namespace differs
    theirs = federated(elsewhere, elsewhere)
    theirs.spec.training.federated.silos[1].namespace = None
    _make(target, backend, theirs)
    own = _in(target, elsewhere) - made
    assert own and not own & made

    backend.stop_federation(target.namespace, T)
    assert _in(target, elsewhere) == own  # ours gone; theirs kept
    # the owner's namespace keeps what the RecJob owns (garbage-collected with it)
    kept = _in(target, target.namespace)
    assert ("ConfigMap", T + "-silo-north") in kept
    assert not [n for k, n in kept if k == "Deployment" and "federated-search" in n]

    # a generation stopped before the operator could delete its silo elsewhere: the
    # RecJob's finalizer deletes what any generation of it left there
    _make(target, backend, ours)
    assert _in(target, elsewhere) == own | made
    backend.delete_silos_elsewhere(target.namespace, ours.metadata.name)
    assert _in(target, elsewhere) == own


def test_a_silo_elsewhere_is_refused_where_reference_grants_are_not_served(
    target, elsewhere
) -> None:
    if target.serves(*REFERENCE_GRANTS):
        pytest.skip("this cluster serves ReferenceGrants: tests/cluster/test_federated.py")
    recjob = federated(target.namespace, elsewhere, name="refused")
    with pytest.raises(ChildWriteError) as refused:
        check_grants(client.CustomObjectsApi(target.api), recjob)
    assert refused.value.reason == "NotServed" and refused.value.status == 403
    assert f"a silo in namespace {elsewhere} needs a ReferenceGrant" in str(refused.value)
    check_grants(client.CustomObjectsApi(target.api), federated(target.namespace, target.namespace))
    # the refusal comes before anything is made, in either namespace
    backend = KubeBackend(target.api)
    with pytest.raises(ChildWriteError):
        backend.apply(recjob, [CreateTraining("refused-g3-train")])
    assert _in(target, elsewhere) == set()
    deployments = client.AppsV1Api(target.api).list_namespaced_deployment(target.namespace)
    assert not [d for d in deployments.items if d.metadata.name.startswith("refused-")]
