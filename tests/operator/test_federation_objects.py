"""A federated RecJob's Kubernetes objects (controller/federation.py), checked without a
cluster: valid against Kubernetes' own schemas, each SuperNode mounting only its silo's
claims, the server side none, the certificate naming the SuperLink's Service, the Job's
states. tests/cluster/test_federated.py runs them on the real cluster."""

from __future__ import annotations

import base64

import pytest
from cryptography import x509

from recjob_operator.api.v1alpha1.tls import make_tls_material
from recjob_operator.controller.children import batch_job_state
from recjob_operator.controller.federation import (
    FEDERATION_LABEL,
    federation_objects,
    superlink_address,
    superlink_dns_names,
)
from tests.conftest import EXAMPLES, load_yaml
from tests.operator.test_children import job

FEDERATED = EXAMPLES[0].parent / "federated" / "recjob-federated.yaml"


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    recjob = job(load_yaml(FEDERATED))
    made = federation_objects(recjob, make_tls_material(superlink_dns_names(recjob)))
    return {(o["kind"], o["metadata"]["name"]): o for o in made}


def _claims(obj: dict) -> set[str]:
    pod = obj["spec"]["template"]["spec"]
    return {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
            if "persistentVolumeClaim" in v}  # fmt: skip


def test_the_objects_are_valid_kubernetes_objects(objects) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for obj in objects.values():
        kubernetes_validate.validate(obj, "1.32", strict=True)
    assert sorted(objects) == [
        ("ConfigMap", "federated-search-g3-train-config"),
        ("ConfigMap", "federated-search-g3-train-silo-north"),
        ("ConfigMap", "federated-search-g3-train-silo-south"),
        ("Deployment", "federated-search-g3-train-link"),
        ("Deployment", "federated-search-g3-train-silo-north"),
        ("Deployment", "federated-search-g3-train-silo-south"),
        ("Job", "federated-search-g3-train"),
        ("NetworkPolicy", "federated-search-g3-train-link"),
        ("NetworkPolicy", "federated-search-g3-train-silos"),
        ("Secret", "federated-search-g3-train-tls"),
        ("Service", "federated-search-g3-train-link"),
    ]
    # what the backend deletes once the run has ended carries the label; the Job does not
    labelled = {k for k, o in objects.items() if FEDERATION_LABEL in o["metadata"]["labels"]}
    assert {kind for kind, _ in labelled} == {
        "Deployment",
        "Service",
        "Secret",
        "ConfigMap",
        "NetworkPolicy",
    }
    assert ("Job", "federated-search-g3-train") not in labelled
    for obj in objects.values():
        assert obj["metadata"]["ownerReferences"][0]["kind"] == "RecJob"


def test_each_supernode_mounts_only_its_own_silos_claims(objects) -> None:
    north = objects[("Deployment", "federated-search-g3-train-silo-north")]
    south = objects[("Deployment", "federated-search-g3-train-silo-south")]
    assert _claims(north) == {"north-logs"} and _claims(south) == {"south-logs"}
    # the server side: the SuperLink (and its ServerApp) and the submitter see no silo data
    link = objects[("Deployment", "federated-search-g3-train-link")]
    submit = objects[("Job", "federated-search-g3-train")]
    assert _claims(link) == {"recjob-artifacts"}
    assert _claims(submit) == {"owner-logs", "recjob-artifacts"}
    config = objects[("ConfigMap", "federated-search-g3-train-silo-north")]["data"]["trainer.yaml"]
    assert "pvc://north-logs/train.csv" in config and "pvc://owner-logs" not in config
    # only the SuperLink gets the private key; every pod trusts the CA (a SuperNode mounts
    # no Secret: its CA is in its ConfigMap, as it would be in a silo's own namespace)
    (tls,) = [v for v in submit["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert [i["key"] for i in tls["secret"]["items"]] == ["ca.crt"]
    (tls,) = [v for v in link["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert {i["key"] for i in tls["secret"]["items"]} == {"ca.crt", "tls.crt", "tls.key"}
    secret = objects[("Secret", "federated-search-g3-train-tls")]["data"]["ca.crt"]
    for obj in (north, south):
        volumes = obj["spec"]["template"]["spec"]["volumes"]
        assert not [v for v in volumes if "secret" in v]
        ca = objects[("ConfigMap", obj["metadata"]["name"])]["data"]["ca.crt"]
        assert base64.b64decode(secret).decode() == ca
        command = obj["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[command.index("--root-certificates") + 1] == "/etc/recjob/ca.crt"
    command = north["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--superlink") + 1] == (
        "federated-search-g3-train-link.shop.svc:9093"
    )
    for obj in (north, south, link):
        pod = obj["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def _selects(selector: dict, pod_labels: dict) -> bool:
    """A NetworkPolicy's (or a peer's) podSelector, matchLabels only, on a pod's labels."""
    assert set(selector["podSelector"]) == {"matchLabels"}, selector
    wanted = selector["podSelector"]["matchLabels"]
    return all(pod_labels.get(k) == v for k, v in wanted.items())


def test_the_network_policies_fence_the_federation(objects) -> None:
    """Read as a CNI would: the SuperLink admits this federation's SuperNodes and submitter
    only; a SuperNode admits nobody and reaches only the SuperLink (and DNS); another
    federation's pods (other generation) are not admitted."""
    pod = {key: o["spec"]["template"]["metadata"]["labels"] for key, o in objects.items()
           if o["kind"] in ("Deployment", "Job")}  # fmt: skip
    link = pod[("Deployment", "federated-search-g3-train-link")]
    north = pod[("Deployment", "federated-search-g3-train-silo-north")]
    submitter = pod[("Job", "federated-search-g3-train")]
    other = {k: v.replace("-g3-", "-g4-") for k, v in north.items()}  # next generation's silo
    stranger = {"app": "anything"}

    link_policy = objects[("NetworkPolicy", "federated-search-g3-train-link")]["spec"]
    assert link_policy["policyTypes"] == ["Ingress"]
    assert _selects(link_policy, link) and not _selects(link_policy, north)
    (rule,) = link_policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 9093}]
    assert all(set(peer) == {"podSelector"} for peer in rule["from"])  # this namespace only
    admitted = lambda labels: any(_selects(peer, labels) for peer in rule["from"])  # noqa: E731
    assert admitted(north) and admitted(submitter)
    assert not admitted(other) and not admitted(stranger) and not admitted(link)

    silo_policy = objects[("NetworkPolicy", "federated-search-g3-train-silos")]["spec"]
    assert silo_policy["policyTypes"] == ["Ingress", "Egress"] and silo_policy["ingress"] == []
    assert _selects(silo_policy, north) and not _selects(silo_policy, link)
    assert not _selects(silo_policy, submitter) and not _selects(silo_policy, other)
    to_link, to_dns = silo_policy["egress"]
    assert [set(peer) for peer in to_link["to"]] == [{"podSelector"}]
    assert [_selects(peer, link) for peer in to_link["to"]] == [True]
    assert to_link["ports"] == [{"protocol": "TCP", "port": 9093}]
    assert {p["port"] for p in to_dns["ports"]} == {53}
    # created before any pod that they fence
    made = list(objects)
    first_pod = min(made.index(k) for k in pod)
    assert all(made.index(k) < first_pod for k in made if k[0] == "NetworkPolicy")


def test_the_certificate_names_the_superlinks_service(objects) -> None:
    recjob = job(load_yaml(FEDERATED))
    secret = objects[("Secret", "federated-search-g3-train-tls")]
    assert secret["type"] == "kubernetes.io/tls"
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert superlink_address(recjob).split(":")[0] in names.get_values_for_type(x509.DNSName)
    cert.verify_directly_issued_by(ca)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({}, ("Created", None, 0)),
        ({"active": 1}, ("Running", None, 0)),
        ({"active": 1, "failed": 1}, ("Restarting", None, 1)),
        ({"failed": 1, "conditions": [{"type": "Complete", "status": "True"}]},
         ("Succeeded", None, 1)),
        ({"failed": 3, "conditions": [{"type": "Failed", "status": "True",
                                       "message": "Job has reached the specified backoff limit"}]},
         ("Failed", "Job has reached the specified backoff limit", 3)),
    ],
)  # fmt: skip
def test_the_jobs_status_maps_to_the_cores_states(status: dict, expected: tuple) -> None:
    assert batch_job_state({"status": status}) == expected


def test_a_silo_is_given_none_of_the_owners_files() -> None:
    """Found on the cluster: a silo without validation data inherited spec.data's (the
    owner's) validation URI and failed reading a claim it does not mount; in local mode it
    read the owner's file. A silo's config names only its own files."""
    import yaml

    from recjob_operator.controller.federation import silo_config_map

    document = load_yaml(FEDERATED)
    document["spec"]["data"].update(validation="pvc://owner-logs/valid.csv",
                                    test="pvc://owner-logs/test.csv")  # fmt: skip
    recjob = job(document)
    material = make_tls_material(superlink_dns_names(recjob))
    for silo in recjob.spec.training.federated.silos:
        config = yaml.safe_load(silo_config_map(recjob, silo, material)["data"]["trainer.yaml"])
        files = {k: v for k, v in config["data"].items() if isinstance(v, str) and "://" in v}
        assert files == {k: v for k, v in silo.data.model_dump(exclude_none=True).items()}


# --------------------------------------------------------------------------- other namespaces
@pytest.fixture(scope="module")
def elsewhere() -> dict[tuple[str, str, str], dict]:
    """The objects of the reference federation (namespace shop) with silo south in
    namespace south-team, by (namespace, kind, name)."""
    document = load_yaml(FEDERATED)
    document["spec"]["training"]["federated"]["silos"][1]["namespace"] = "south-team"
    recjob = job(document)
    made = federation_objects(recjob, make_tls_material(superlink_dns_names(recjob)))
    return {(o["metadata"]["namespace"], o["kind"], o["metadata"]["name"]): o for o in made}


def test_a_silo_in_another_namespace_gets_its_objects_there_unowned(elsewhere) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for obj in elsewhere.values():
        kubernetes_validate.validate(obj, "1.32", strict=True)
    there = sorted(k for k in elsewhere if k[0] == "south-team")
    name = "federated-search-g3-train-silo-south-from-shop"
    assert there == [
        ("south-team", "ConfigMap", name),
        ("south-team", "Deployment", name),
        ("south-team", "NetworkPolicy", "federated-search-g3-train-silos-from-shop"),
    ]
    for key in there:  # ownerReferences cannot cross namespaces; the labels say whose
        meta = elsewhere[key]["metadata"]
        assert "ownerReferences" not in meta
        assert meta["labels"]["recjob.dev/owner-namespace"] == "shop"
        assert meta["labels"]["recjob.dev/federation"] == "federated-search-g3-train"
    for key, obj in elsewhere.items():
        if key[0] == "shop":
            assert obj["metadata"]["ownerReferences"][0]["kind"] == "RecJob"
    south = elsewhere[("south-team", "Deployment", name)]
    # a RecJob of south-team with the same name and silo would have the same labels but
    # its own namespace: the selector tells their pods apart
    assert south["spec"]["selector"]["matchLabels"]["recjob.dev/owner-namespace"] == "shop"
    assert _claims(south) == {"south-logs"}  # south-team's claim of that name
    pod = south["spec"]["template"]["spec"]
    assert pod["volumes"][0] == {"name": "silo-config", "configMap": {"name": name}}
    command = pod["containers"][0]["command"]
    assert command[command.index("--superlink") + 1] == (
        "federated-search-g3-train-link.shop.svc:9093"  # the SuperLink's, across namespaces
    )
    # north stays in shop under its usual name
    assert ("shop", "Deployment", "federated-search-g3-train-silo-north") in elsewhere
    # the ConfigMap is made before anything else there (the backend finds the namespace
    # by it when it deletes the rest)
    order = list(elsewhere)
    assert order.index(("south-team", "ConfigMap", name)) < min(
        order.index(k) for k in there if k[1] != "ConfigMap"
    )


def test_the_network_policies_reach_across_to_a_silo_in_another_namespace(elsewhere) -> None:
    """Read as a CNI would, with namespaces: the SuperLink admits south's pods from
    south-team and from nowhere else; south's fence there lets it reach only the SuperLink
    in shop."""
    labels = {k: o["spec"]["template"]["metadata"]["labels"] for k, o in elsewhere.items()
              if o["kind"] == "Deployment"}  # fmt: skip
    south = labels[("south-team", "Deployment", "federated-search-g3-train-silo-south-from-shop")]
    link = labels[("shop", "Deployment", "federated-search-g3-train-link")]

    def admits(peers: list[dict], namespace: str, pod: dict, own: str) -> bool:
        for peer in peers:
            names = peer.get(
                "namespaceSelector", {"matchLabels": {"kubernetes.io/metadata.name": own}}
            )
            if names["matchLabels"].get("kubernetes.io/metadata.name") != namespace:
                continue
            if all(pod.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items()):
                return True
        return False

    (rule,) = elsewhere[("shop", "NetworkPolicy", "federated-search-g3-train-link")]["spec"][
        "ingress"
    ]
    assert admits(rule["from"], "south-team", south, "shop")
    assert not admits(rule["from"], "elsewhere", south, "shop")
    # a pod of south-team's own federation of the same name is not this one's silo
    theirs = {**south, "recjob.dev/owner-namespace": "south-team"}
    assert not admits(rule["from"], "south-team", theirs, "shop")

    fence = elsewhere[("south-team", "NetworkPolicy", "federated-search-g3-train-silos-from-shop")]
    spec = fence["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= south.items()
    assert spec["ingress"] == [] and spec["policyTypes"] == ["Ingress", "Egress"]
    to_link, _dns = spec["egress"]
    assert admits(to_link["to"], "shop", link, "south-team")
    assert not admits(to_link["to"], "south-team", link, "south-team")


def _grant(namespace: str, to: list[dict], kind: str = "RecJob") -> dict:
    return {"spec": {"from": [{"group": "recjob.dev", "kind": kind, "namespace": namespace}],
                     "to": to}}  # fmt: skip


PVC = {"group": "", "kind": "PersistentVolumeClaim"}


@pytest.mark.parametrize(
    ("grants", "missing"),
    [
        ([], [(1, "south-logs")]),
        ([_grant("shop", [PVC])], []),  # every claim of south-team
        ([_grant("shop", [{**PVC, "name": "south-logs"}])], []),
        ([_grant("shop", [{**PVC, "name": "other"}])], [(1, "south-logs")]),
        ([_grant("elsewhere", [PVC])], [(1, "south-logs")]),  # another namespace's RecJobs
        ([_grant("shop", [PVC], kind="HTTPRoute")], [(1, "south-logs")]),
        ([_grant("shop", [{"group": "", "kind": "Secret"}])], [(1, "south-logs")]),
        ([_grant("shop", [{"group": "", "kind": "Secret"}]), _grant("shop", [PVC])], []),
    ],
)  # fmt: skip
def test_a_silo_in_another_namespace_needs_its_reference_grant(grants, missing) -> None:
    from recjob_operator.kube.silo_namespaces import grant_missing_message, ungranted_claims

    document = load_yaml(FEDERATED)
    document["spec"]["training"]["federated"]["silos"][1]["namespace"] = "south-team"
    recjob = job(document)
    assert ungranted_claims(recjob, {"south-team": grants}) == missing
    # the silo in the RecJob's own namespace needs none
    assert ungranted_claims(job(load_yaml(FEDERATED)), {}) == []
    if missing:
        message = grant_missing_message(recjob, *missing[0])
        assert message.startswith("spec.training.federated.silos[1].namespace: ")
        assert "ReferenceGrant" in message and "namespace: shop" in message
        assert "name: south-logs" in message
