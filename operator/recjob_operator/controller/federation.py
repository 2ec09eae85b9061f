"""Builders of a federated RecJob's Kubernetes objects (pure: RecJob and TLS material in,
dicts out): Flower's deployment engine, one federation per model generation.

For the training child ``<t>`` (``<name>-g<gen>-train``):

- ``<t>-tls`` Secret (``kubernetes.io/tls``, plus ``ca.crt``): a CA and the SuperLink's
  certificate for its Service's DNS names (made by the backend, :mod:`..api.v1alpha1.tls`);
- ``<t>-link`` Service and Deployment: the SuperLink (``flower-superlink``, TLS, one HTTPS
  port for SuperNodes and the ``flwr`` CLI). The ServerApp runs in its pod as its
  subprocess and writes the model to the artifacts volume, the only volume it mounts;
- ``<t>-silo-<silo>`` ConfigMap and Deployment per silo, in the silo's namespace: a
  SuperNode told where its silo's trainer config is (``--node-config``), mounting only the
  claims of that silo's own ``pvc://`` data, trusting only the CA (``ca.crt`` in its
  ConfigMap: the silo's pod mounts no Secret);
- ``<t>-link`` and ``<t>-silos`` NetworkPolicies (:func:`network_policies`), created
  before the pods they fence;
- ``<t>-config`` ConfigMap and the ``<t>`` batch Job, the training child the core
  watches: ``python -m recjob_trainer.federated.submit`` prepares the owner's held-out
  reference data, submits the run to the SuperLink (or adopts the one an earlier pod
  submitted), waits for its end and leaves the summary in its termination message.

Every object carries the RecJob's labels, plus ``recjob.dev/federation: <t>`` and
``recjob.dev/owner-namespace`` on the SuperLink's and SuperNodes' objects and the Secret;
the backend deletes the Deployments by those labels once the training child has ended
(``StopFederation``), and the inert Service, Secret and ConfigMaps go with the RecJob,
their owner.

A silo may live in another namespace (``silos[].namespace``, its data on that namespace's
claims) when that namespace grants it: a Gateway API ReferenceGrant there from RecJobs of
the owner's namespace to the silo's PersistentVolumeClaims (the backend checks before it
creates anything: :mod:`..kube.silo_namespaces`). ownerReferences cannot cross namespaces, so a
silo's objects there are named ``<t>-silo-<silo>-from-<owner namespace>`` (with its
NetworkPolicy ``<t>-silos-from-<owner namespace>``), carry no ownerReference, and the
backend deletes them itself: with the federation, and with the RecJob.
The pods get no ServiceAccount token, non-root read-only containers, and
``spec.training.resources`` as requests and limits (the run's submitter, the ServerApp
and every silo hold the model)."""

from __future__ import annotations

import base64

from ..api.v1alpha1.common import GROUP, parse_quantity
from ..api.v1alpha1.recjob import RecJob
from ..api.v1alpha1.spec_federated import SiloSpec, silo_data_section
from ..api.v1alpha1.storage import data_uris, pod_storage, with_pod_storage
from ..api.v1alpha1.tls import CA_KEY, CERT_KEY, KEY_KEY, TlsMaterial
from ..api.v1alpha1.trainer import trainer_config
from .children import (
    _SCRATCH_ENV,
    _SCRATCH_MOUNTS,
    _SECURITY,
    CONFIG_MOUNT,
    PVC_ROOT,
    TERMINATION_LOG,
    _metadata,
    _pod_spec,
    _resources,
    _yaml,
    claim_volumes,
    generation_uri,
    labels,
    pvc_claims,
    training_config_map,
)
from .identity import training_name

#: The SuperLink's one port (Flower 1.42 serves the Fleet and Control APIs over HTTPS on
#: ``--port``).
SUPERLINK_PORT = 9093
#: Not under CONFIG_MOUNT: a mount point inside a read-only configMap volume cannot be made.
TLS_MOUNT = "/etc/recjob-tls"
#: A silo's work folder (its prepared data): an emptyDir.
SILO_WORK = "/var/lib/recjob/silo"
FEDERATION_LABEL = f"{GROUP}/federation"
ROLE_LABEL = f"{GROUP}/federation-role"
SILO_LABEL = f"{GROUP}/silo"
#: The RecJob's namespace, on every federation object: a silo's objects in another
#: namespace are told apart (and selected, and deleted) by it.
OWNER_NAMESPACE_LABEL = f"{GROUP}/owner-namespace"
#: On the submitter Job's pods only (not on the Job: the backend deletes by FEDERATION_LABEL,
#: and the finished Job's pod stays with its result).
SUBMITTER_LABEL = f"{GROUP}/federation-submitter"


def superlink_name(recjob: RecJob) -> str:
    """The SuperLink's Service and Deployment."""
    return f"{training_name(recjob)}-link"


def owner_namespace(recjob: RecJob) -> str:
    """The RecJob's namespace."""
    return recjob.metadata.namespace or "default"


def silo_namespace(recjob: RecJob, silo: SiloSpec) -> str:
    """The namespace a silo's SuperNode runs in (the RecJob's unless it names another)."""
    return silo.namespace or owner_namespace(recjob)


def _from_owner(recjob: RecJob, namespace: str) -> str:
    """The suffix of names in ``namespace``: none in the owner's, ``-from-<owner>`` in
    another (where a RecJob of that namespace may use the same names)."""
    own = owner_namespace(recjob)
    return "" if namespace == own else f"-from-{own}"


def silo_object_name(recjob: RecJob, silo: SiloSpec) -> str:
    """A silo's SuperNode Deployment and ConfigMap."""
    suffix = _from_owner(recjob, silo_namespace(recjob, silo))
    return f"{training_name(recjob)}-silo-{silo.name}{suffix}"


def silo_namespaces(recjob: RecJob) -> list[str]:
    """The namespaces other than the RecJob's that its silos run in, in order."""
    silos = recjob.spec.training.federated.silos or []
    spaces = dict.fromkeys(silo_namespace(recjob, s) for s in silos)
    return [ns for ns in spaces if ns != owner_namespace(recjob)]


def tls_secret_name(recjob: RecJob) -> str:
    return f"{training_name(recjob)}-tls"


#: The SuperLink's own SuperExec (which starts the ServerApp) reaches it on loopback.
SUPERLINK_LOOPBACK = ("localhost", "127.0.0.1")


def superlink_dns_names(recjob: RecJob) -> list[str]:
    """The DNS names the SuperLink's certificate is for: its Service in the cluster DNS
    (and ``localhost``, :data:`SUPERLINK_LOOPBACK`)."""
    service, ns = superlink_name(recjob), owner_namespace(recjob)
    svc = f"{service}.{ns}.svc"
    return [service, f"{service}.{ns}", svc, f"{svc}.cluster.local", SUPERLINK_LOOPBACK[0]]


def superlink_address(recjob: RecJob) -> str:
    """``host:port`` the SuperNodes and the submitter connect to."""
    return f"{superlink_dns_names(recjob)[2]}:{SUPERLINK_PORT}"


def _labels(recjob: RecJob, role: str, silo: str | None = None) -> dict[str, str]:
    out = {**labels(recjob, "federation"), FEDERATION_LABEL: training_name(recjob)}
    out[OWNER_NAMESPACE_LABEL] = owner_namespace(recjob)
    out[ROLE_LABEL] = role
    if silo is not None:
        out[SILO_LABEL] = silo
    return out


def _federation_metadata(
    recjob: RecJob, name: str, role: str, silo: str | None = None, namespace: str | None = None
) -> dict:
    """Metadata in the RecJob's namespace (owned by it), or in another ``namespace``
    (not owned: ownerReferences cannot cross namespaces)."""
    meta = _metadata(recjob, name, "federation")
    meta["labels"] = _labels(recjob, role, silo)
    if namespace not in (None, owner_namespace(recjob)):
        meta["namespace"] = namespace
        del meta["ownerReferences"]
    return meta


def _tls_volume(recjob: RecJob, server: bool) -> dict:
    """The Secret as files: the CA for the submitter, the key pair for the SuperLink only
    (a SuperNode's CA is in its ConfigMap)."""
    keys = [CA_KEY, CERT_KEY, KEY_KEY] if server else [CA_KEY]
    return {
        "name": "tls",
        "secret": {
            "secretName": tls_secret_name(recjob),
            "items": [{"key": k, "path": k} for k in keys],
            "defaultMode": 0o440,
        },
    }


def _env(threads: str = "1") -> list[dict]:
    return [
        {"name": "RECJOB_PVC_ROOT", "value": PVC_ROOT},
        {"name": "OMP_NUM_THREADS", "value": threads},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        *_SCRATCH_ENV,
    ]


def _threads(recjob: RecJob) -> str:
    """Compute threads of a pod: its CPU limit, whole cores, at least 1."""
    return str(max(1, int(parse_quantity(str(recjob.spec.training.resources.cpu)))))


def _container(recjob: RecJob, name: str, command: list[str], mounts: list[dict],
               threads: str = "1", **extra: object) -> dict:  # fmt: skip
    return {
        "name": name,
        "image": recjob.spec.training.image,
        "command": command,
        "env": _env(threads),
        "resources": _resources(recjob.spec.training.resources),
        "volumeMounts": [*mounts, *_SCRATCH_MOUNTS],
        "securityContext": _SECURITY,
        **extra,
    }


def _deployment(recjob: RecJob, name: str, role: str, silo: SiloSpec | None, pod: dict) -> dict:
    selector, silo_name, namespace = _selector(recjob, role), None, None
    if silo is not None:
        silo_name, namespace = silo.name, silo_namespace(recjob, silo)
        selector[SILO_LABEL] = silo_name
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _federation_metadata(recjob, name, role, silo_name, namespace),
        "spec": {
            "replicas": 1,
            # one SuperLink (its state is in memory) and one SuperNode per silo at a time
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": _labels(recjob, role, silo_name)}, "spec": pod},
        },
    }


def _selector(recjob: RecJob, role: str) -> dict[str, str]:
    """The pods of one role of this federation (in whichever namespace)."""
    return {
        FEDERATION_LABEL: training_name(recjob),
        OWNER_NAMESPACE_LABEL: owner_namespace(recjob),
        ROLE_LABEL: role,
    }


# --------------------------------------------------------------------------- objects
def tls_secret(recjob: RecJob, material: TlsMaterial) -> dict:
    """The federation's CA and the SuperLink's key pair."""
    data = {k: base64.b64encode(v).decode() for k, v in material.secret_data().items()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": _federation_metadata(recjob, tls_secret_name(recjob), "tls"),
        "data": data,
    }


def superlink_service(recjob: RecJob) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _federation_metadata(recjob, superlink_name(recjob), "superlink"),
        "spec": {
            "selector": _selector(recjob, "superlink"),
            "ports": [
                {
                    "name": "https",
                    "port": SUPERLINK_PORT,
                    "targetPort": SUPERLINK_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def superlink_deployment(recjob: RecJob) -> dict:
    """The SuperLink; its ServerApp subprocess writes to the artifacts volume only."""
    volumes, mounts = claim_volumes(pvc_claims([recjob.spec.artifacts_uri]), "artifacts")
    command = [
        "flower-superlink",
        *("--ssl-ca-certfile", f"{TLS_MOUNT}/{CA_KEY}"),
        *("--ssl-certfile", f"{TLS_MOUNT}/{CERT_KEY}"),
        *("--ssl-keyfile", f"{TLS_MOUNT}/{KEY_KEY}"),
        *("--host", "0.0.0.0", "--port", str(SUPERLINK_PORT)),
        "--disable-runtime-dependency-installation",
    ]
    container = _container(
        recjob, "superlink", command,
        [{"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True}, *mounts],
        threads=_threads(recjob),
        ports=[{"name": "https", "containerPort": SUPERLINK_PORT, "protocol": "TCP"}],
        readinessProbe={"tcpSocket": {"port": SUPERLINK_PORT}, "periodSeconds": 2},
    )  # fmt: skip
    pod = with_pod_storage(
        _pod_spec([container], [_tls_volume(recjob, server=True), *volumes]),
        pod_storage(recjob.spec),
    )
    return _deployment(recjob, superlink_name(recjob), "superlink", None, pod)


def silo_config_map(recjob: RecJob, silo: SiloSpec, material: TlsMaterial) -> dict:
    """The silo's trainer config (the RecJob's, with the silo's own data URIs) and the CA
    its SuperNode trusts."""
    config = trainer_config(recjob, generation_uri(recjob, "train"))
    config = config.model_copy(
        update={
            "name": f"{config.name}-{silo.name}",
            "data": silo_data_section(config.data, silo.data.uris()),
            "output_uri": SILO_WORK,
        }
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _federation_metadata(
            recjob,
            silo_object_name(recjob, silo),
            "supernode",
            silo.name,
            silo_namespace(recjob, silo),
        ),
        "data": {"trainer.yaml": _yaml(config.to_wire()), CA_KEY: material.ca_cert.decode()},
    }


def supernode_deployment(recjob: RecJob, silo: SiloSpec) -> dict:
    """A silo's SuperNode, mounting only its own data's claims."""
    name = silo_object_name(recjob, silo)
    claims = pvc_claims(silo.data.uris().values())
    volumes, mounts = claim_volumes(claims, "silo")
    threads = _threads(recjob)
    command = [
        "flower-supernode",
        *("--superlink", superlink_address(recjob)),
        *("--root-certificates", f"{CONFIG_MOUNT}/{CA_KEY}"),
        *("--node-config", f'silo-config="{CONFIG_MOUNT}/trainer.yaml"'),
    ]
    container = _container(
        recjob, "supernode", command,
        [
            {"name": "silo-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "work", "mountPath": SILO_WORK},
            *mounts,
        ],
        threads=threads,
    )  # fmt: skip
    container["env"].append({"name": "RECJOB_SILO_THREADS", "value": threads})
    pod = _pod_spec(
        [container],
        [
            {"name": "silo-config", "configMap": {"name": name}},
            {"name": "work", "emptyDir": {}},
            *volumes,
        ],
    )
    return _deployment(recjob, name, "supernode", silo, pod)


def submit_job(recjob: RecJob) -> dict:
    """The training child: submits the run to the SuperLink and waits for its end."""
    training = recjob.spec.training
    # the artifacts and the owner's held-out data (spec.data), never a silo's
    owner = [recjob.spec.artifacts_uri] + [u for _, u in data_uris(recjob.spec)]
    volumes, mounts = claim_volumes(pvc_claims(owner))
    command = [
        "python", "-m", "recjob_trainer.federated.submit",
        "--config", f"{CONFIG_MOUNT}/trainer.yaml",
        "--superlink", superlink_address(recjob),
        "--root-certificates", f"{TLS_MOUNT}/{CA_KEY}",
    ]  # fmt: skip
    container = _container(
        recjob, "submit", command,
        [
            {"name": "recjob-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True},
            *mounts,
        ],
        threads=_threads(recjob),
        terminationMessagePath=TERMINATION_LOG,
        terminationMessagePolicy="File",
    )  # fmt: skip
    container["env"].append({"name": "RECJOB_TERMINATION_LOG", "value": TERMINATION_LOG})
    pod = with_pod_storage(
        _pod_spec(
            [container],
            [
                {"name": "recjob-config", "configMap": {"name": f"{training_name(recjob)}-config"}},
                _tls_volume(recjob, server=False),
                *volumes,
            ],
            restartPolicy="Never",
        ),
        pod_storage(recjob.spec),
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(recjob, training_name(recjob), "training"),
        "spec": {
            "backoffLimit": training.max_restarts,
            "template": {
                "metadata": {
                    "labels": {**labels(recjob, "training"), SUBMITTER_LABEL: training_name(recjob)}
                },
                "spec": pod,
            },
        },
    }


def _pods(**match: str) -> dict:
    return {"podSelector": {"matchLabels": match}}


def _in(namespace: str, peer: dict) -> dict:
    """``peer``'s pods in ``namespace`` (a peer without a namespaceSelector selects pods
    of the policy's own namespace only)."""
    names = {"kubernetes.io/metadata.name": namespace}  # set by the API server on every namespace
    return {"namespaceSelector": {"matchLabels": names}, **peer}


def _policy(recjob: RecJob, name: str, role: str, spec: dict, namespace: str | None = None) -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _federation_metadata(recjob, name, role, namespace=namespace),
        "spec": spec,
    }


def network_policies(recjob: RecJob) -> list[dict]:
    """Who may talk to whom, for a CNI that enforces NetworkPolicy (TLS authenticates only
    the SuperLink, and Flower 1.42's SuperNode authentication needs its Control API, which
    any client reaching the port may call):

    - ``<t>-link``: the SuperLink's pod accepts connections only from this federation's
      SuperNodes (in the RecJob's namespace and in each silo's) and its submitter, on its
      one port;
    - ``<t>-silos`` (and ``<t>-silos-from-<owner>`` in each other silo namespace): a
      SuperNode's pod accepts none, and connects only to that SuperLink and to DNS (port
      53): a silo's data has no way out but the model updates."""
    t, own = training_name(recjob), owner_namespace(recjob)
    port = [{"protocol": "TCP", "port": SUPERLINK_PORT}]
    link = _pods(**_selector(recjob, "superlink"))
    silos = _pods(**_selector(recjob, "supernode"))
    dns = [{"protocol": p, "port": 53} for p in ("UDP", "TCP")]
    others = silo_namespaces(recjob)
    admitted = [silos, *(_in(ns, silos) for ns in others), _pods(**{SUBMITTER_LABEL: t})]
    fences = [
        _policy(
            recjob,
            f"{t}-silos{_from_owner(recjob, ns)}",
            "supernode",
            {
                **silos,
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [],
                "egress": [
                    {"to": [link if ns == own else _in(own, link)], "ports": port},
                    {"to": [{"namespaceSelector": {}}], "ports": dns},
                ],
            },
            ns,
        )
        for ns in [own, *others]
    ]
    return [
        _policy(
            recjob,
            f"{t}-link",
            "superlink",
            {**link, "policyTypes": ["Ingress"], "ingress": [{"from": admitted, "ports": port}]},
        ),
        *fences,
    ]


def federation_objects(recjob: RecJob, material: TlsMaterial) -> list[dict]:
    """Everything a federated training run needs, in creation order: the training child
    (the Job) last, so that its existence means the rest was created."""
    silos = recjob.spec.training.federated.silos or []
    return [
        tls_secret(recjob, material),
        # first: a silo's ConfigMap is what the backend finds its other namespace by
        *(silo_config_map(recjob, s, material) for s in silos),
        *network_policies(recjob),
        training_config_map(recjob),
        superlink_service(recjob),
        superlink_deployment(recjob),
        *(supernode_deployment(recjob, s) for s in silos),
        submit_job(recjob),
    ]
