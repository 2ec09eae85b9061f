"""RecJob semantic rules of federated training (``spec.training.federated``), and what the
Kubernetes backend cannot run of a valid federation (:func:`cluster_problems`). Mirrored
by CEL rules of the CRD like the rest of :mod:`.semantics`."""

from __future__ import annotations

from .problems import Problem, Problems
from .v1alpha1 import RecJob, cel_federated
from .v1alpha1.spec import RecJobSpec
from .v1alpha1.storage import data_uris
from .v1alpha1.uris import pvc_claim


def silo_file_rules(spec: RecJobSpec) -> list[Problem]:
    """The files each silo's data must name itself: a silo reads only its own files (none
    of spec.data's), so what spec.data's format needs must be in every silo's data. Not
    mirrored in CEL: the rule joins spec.data.format with each list item's fields, and a
    CEL rule's fieldPath cannot name a list item, so its error could not name the silo."""
    fed, out = spec.training.federated, Problems()
    if fed is None or fed.silos is None or spec.data.format != "atomic":
        return out
    for i, silo in enumerate(fed.silos):
        p = f"spec.training.federated.silos[{i}].data"
        if silo.data.catalog is None:
            out.add(
                f"{p}.catalog",
                "the atomic format needs the item texts in every silo (a silo reads only "
                "its own files, not spec.data.catalog): set the silo's catalog",
            )
        if silo.data.validation is None and silo.data.test is None:
            out.add(
                f"{p}.test",
                "the atomic format needs the silo's held-out .inter files: set test (and "
                "validation, else validation is carved from the silo's training file)",
            )
    return out


def federated_rules(spec: RecJobSpec) -> list[Problem]:
    """spec.training.federated (messages shared with api/v1alpha1/cel_federated.py)."""
    fed, p = spec.training.federated, "spec.training.federated"
    out = Problems()
    if fed is None:
        return out
    if spec.training.nodes != 1:
        out.add(
            "spec.training.nodes",
            f"{cel_federated.FEDERATED_ONE_PROCESS} (got {spec.training.nodes})",
        )
    if spec.training.processes_per_node != 1:
        out.add(
            "spec.training.processesPerNode",
            f"{cel_federated.FEDERATED_ONE_PROCESS} (got {spec.training.processes_per_node})",
        )
    if fed.silos is None and fed.partition is None:
        out.add(f"{p}.silos", cel_federated.FEDERATED_SILOS_REQUIRED)
    if fed.silos is not None and fed.partition is not None:
        out.add(f"{p}.partition", cel_federated.FEDERATED_SILOS_AND_PARTITION)
    if fed.silos is not None:
        names = [silo.name for silo in fed.silos]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            out.add(
                f"{p}.silos", f"{cel_federated.FEDERATED_DUPLICATE_SILO}: {', '.join(duplicates)}"
            )
    count = len(fed.silos) if fed.silos is not None else None
    if fed.partition is not None:
        count = fed.partition.count
        if fed.partition.by == "column" and fed.partition.column is None:
            out.add(f"{p}.partition.column", cel_federated.FEDERATED_COLUMN_REQUIRED)
        if fed.partition.by != "column" and fed.partition.column is not None:
            out.add(f"{p}.partition.column", cel_federated.FEDERATED_COLUMN_FORBIDDEN)
    for silos in (len(fed.silos) if fed.silos is not None else None, count):
        if silos is not None and fed.participation.min_silos > silos:
            out.add(
                f"{p}.participation.minSilos",
                f"{fed.participation.min_silos} {cel_federated.FEDERATED_TOO_FEW_SILOS} ({silos})",
            )
            break
    strategy = fed.strategy
    if strategy.type == "FedProx" and strategy.mu is None:
        out.add(f"{p}.strategy.mu", cel_federated.FEDERATED_MU_REQUIRED)
    if strategy.type != "FedProx" and strategy.mu is not None:
        out.add(f"{p}.strategy.mu", cel_federated.FEDERATED_MU_FORBIDDEN)
    if (
        strategy.type not in cel_federated.SERVER_OPTIMIZERS
        and strategy.server_learning_rate is not None
    ):
        out.add(f"{p}.strategy.serverLearningRate", cel_federated.FEDERATED_SERVER_LR_FORBIDDEN)
    if strategy.type != "FedAvgM" and strategy.server_momentum is not None:
        out.add(f"{p}.strategy.serverMomentum", cel_federated.FEDERATED_SERVER_MOMENTUM_FORBIDDEN)
    if fed.secure_aggregation and fed.participation.min_silos < 2:
        out.add(f"{p}.participation.minSilos", cel_federated.FEDERATED_SECURE_AGGREGATION_SILOS)
    if fed.exchange == "lora" and spec.model.fine_tuning.method != "lora":
        out.add(f"{p}.exchange", cel_federated.FEDERATED_LORA_EXCHANGE)
    if spec.compression is not None:
        out.add("spec.compression", cel_federated.FEDERATED_COMPRESSION)
    if spec.model.architecture == "sequential":
        out.add("spec.model.architecture", cel_federated.FEDERATED_SEQUENTIAL)
    return out


#: Why the Kubernetes backend refuses a partitioned federation (local mode runs it).
FEDERATED_PARTITION_LOCAL_ONLY = (
    "partition splits spec.data into silos on one machine (local mode: recjob run); on "
    "Kubernetes list silos instead, each with its own data on a PersistentVolumeClaim of "
    "its own, so that each SuperNode mounts only its silo's claim"
)
FEDERATED_SILO_PVC = (
    "on Kubernetes a silo's data must be on a PersistentVolumeClaim (pvc://<claim>/<path>) "
    "that only its SuperNode mounts; object storage would need spec.storage's credentials "
    "in every silo's pod"
)


def cluster_problems(job: RecJob) -> list[Problem]:
    """What a valid RecJob asks for that the Kubernetes backend cannot run: reported as
    Valid=False instead of a silent fallback. A federation there needs silos whose data
    are each on claims of their own (no other silo, nor the owner's pods, mounts them)."""
    fed, p = job.spec.training.federated, "spec.training.federated"
    if fed is None:
        return []
    if fed.partition is not None:
        return [Problem(f"{p}.partition", FEDERATED_PARTITION_LOCAL_ONLY)]
    out = Problems()
    namespace = job.metadata.namespace or "default"
    owner = {(namespace, pvc_claim(uri)) for _, uri in data_uris(job.spec)}
    owner |= {(namespace, pvc_claim(job.spec.artifacts_uri))}
    users: dict[tuple[str, str], list[str]] = {}  # (namespace, claim): its silos
    for i, silo in enumerate(fed.silos or []):
        for field, uri in silo.data.uris().items():
            if not uri.startswith("pvc://"):
                out.add(f"{p}.silos[{i}].data.{field}", FEDERATED_SILO_PVC)
                continue
            claim = (silo.namespace or namespace, pvc_claim(uri))
            if claim in owner:
                out.add(
                    f"{p}.silos[{i}].data.{field}",
                    f"claim {claim[1]} is also mounted by the model owner's pods (spec.data or "
                    "spec.artifactsUri): a silo's data need a claim of their own",
                )
            users.setdefault(claim, [])
            if silo.name not in users[claim]:
                users[claim].append(silo.name)
    for (claim_namespace, claim), silos in users.items():
        if len(silos) > 1:
            where = "" if claim_namespace == namespace else f" (namespace {claim_namespace})"
            out.add(
                f"{p}.silos",
                f"claim {claim}{where} holds the data of silos {', '.join(silos)}: each "
                "silo's data need a claim of their own (every claim a silo names is mounted "
                "by its SuperNode)",
            )
    return out
