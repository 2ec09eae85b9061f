"""The Kubernetes backend: observes and acts for the reconcile core through the API server.

Training is a Kubeflow PyTorchJob, conversion a batch Job (its quality-gate summary read
from the pod's termination message), serving KServe (:mod:`.serving`). Observation reads a
:class:`~.cache.ChildView` (the watch caches in the operator). Every create is
create-if-absent by deterministic name (409 AlreadyExists = done); any other refusal
(quota 403, admission webhook 4xx, 422 Invalid, ...) raises :class:`ChildWriteError`
with the API server's message. Status is written to the status subresource with a
resourceVersion precondition; a 409 raises :class:`StatusConflict` (the caller re-reads
and recomputes, see :mod:`.reconciler`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ..api.text import one_line
from ..api.v1alpha1.common import APPROVE_ANNOTATION, GROUP
from ..api.v1alpha1.recjob import RecJob
from ..api.v1alpha1.status import RecJobStatus
from ..api.v1alpha1.tls import make_tls_material
from ..controller.analysis import Reading
from ..controller.children import (
    batch_job_state,
    conversion_config_map,
    conversion_job,
    pytorch_job,
    pytorch_job_state,
    training_config_map,
)
from ..controller.federation import (
    FEDERATION_LABEL,
    SUPERLINK_LOOPBACK,
    federation_objects,
    superlink_dns_names,
)
from ..controller.identity import conversion_child_name, training_child_name
from ..controller.plan import MAX_EVENT_MESSAGE
from ..controller.reconcile import (
    ChildObservation,
    CleanupGeneration,
    CreateConversion,
    CreateTraining,
    DeployStable,
    EmitEvent,
    Observed,
    Promote,
    ReleaseService,
    RollBack,
    SetCanary,
    StopFederation,
    analysis_query_values,
    conversion_name,
    training_name,
)
from ..prometheus import PrometheusSource, PrometheusSources
from .cache import KUBEFLOW, MANAGED_SELECTOR, ChildView
from .errors import ChildWriteError
from .metrics import api_call
from .serving import KubeServing
from .silo_namespaces import SiloNamespaces, check_grants, federation_selector, recjob_selector

log = logging.getLogger("recjob_operator.kube")

RECJOBS = (GROUP, "v1alpha1", "recjobs")
#: The built-in kinds children are made of (anything else: Kubeflow's).
CREATE_KINDS = {"ConfigMap": "configmaps", "Secret": "secrets", "Service": "services",
                "Deployment": "deployments", "Job": "jobs",
                "NetworkPolicy": "networkpolicies"}  # fmt: skip
MANAGED_LABEL, MANAGED_VALUE = MANAGED_SELECTOR.split("=")


def event_name(recjob: RecJob, event: EmitEvent) -> str:
    """``<recjob>.<digest>``: the digest of the RecJob's uid and generation and the event's
    type, reason and message, so one event of one generation has one name."""
    key = "\x00".join((recjob.metadata.uid or "", str(recjob.generation), event.type,
                        event.reason, event.message))  # fmt: skip
    return f"{recjob.metadata.name}.{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def with_trainer_error(message: str | None, report: dict | None) -> str | None:
    """A failed PyTorchJob's message with the error the trainer left in its master's
    termination message (``{"error": ...}``), if it left one."""
    error = (report or {}).get("error")
    if not isinstance(error, str) or not error:
        return message
    return f"{message}; trainer: {error}" if message else f"trainer: {error}"


class StatusConflict(Exception):
    """The RecJob changed since it was read (409 on the status write)."""


def _rolling_out(recjob: RecJob) -> bool:
    """Whether the RecJob's service matters to this pass: rolling out, or converting (a
    finished conversion starts the rollout in the same pass)."""
    return recjob.status is not None and recjob.status.phase in ("Converting", "RollingOut")


def _missing(error: ApiException) -> bool:
    return error.status == 404


class KubeBackend:
    """One operator's view of the cluster (a kubernetes ApiClient)."""

    def __init__(self, api: client.ApiClient, prometheus: PrometheusSources | None = None):
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.serving = KubeServing(api)
        self.silo_namespaces = SiloNamespaces(api)
        self.prometheus = prometheus or PrometheusSources({})
        self._creators = {
            "configmaps": self.core.create_namespaced_config_map,
            "secrets": self.core.create_namespaced_secret,
            "services": self.core.create_namespaced_service,
            "deployments": self.apps.create_namespaced_deployment,
            "jobs": self.batch.create_namespaced_job,
            "networkpolicies": client.NetworkingV1Api(api).create_namespaced_network_policy,
        }

    # ------------------------------------------------------------------ observe
    def observe(self, recjob: RecJob, view: ChildView) -> Observed:
        """Children of the RecJob's current generation and its service, from ``view``."""
        ns = recjob.metadata.namespace or "default"
        annotations = recjob.metadata.annotations or {}
        approved = annotations.get(APPROVE_ANNOTATION, "")
        numeric = approved.isascii() and approved.isdigit()
        return Observed(
            training=self._training(recjob, ns, view),
            conversion=self._conversion(recjob, ns, view),
            serving=self.serving.observe(recjob, view) if _rolling_out(recjob) else None,
            approved_generation=int(approved) if numeric else None,
        )

    @staticmethod
    def _training(recjob: RecJob, ns: str, view: ChildView) -> ChildObservation | None:
        name = training_name(recjob)
        if recjob.spec.training.federated is not None:
            return KubeBackend._federated_training(ns, name, view)
        job = view.pytorchjob(ns, name)
        if job is None:
            return None
        state, message, restarts = pytorch_job_state(job)
        result = None
        if state == "Succeeded":
            result = view.report(ns, "pytorchjobs", name) or {}
        elif state == "Failed":  # the Training Operator says which replica; the trainer, why
            message = with_trainer_error(message, view.report(ns, "pytorchjobs", name))
        return ChildObservation(name, state, message=message, restarts=restarts, result=result)

    @staticmethod
    def _federated_training(ns: str, name: str, view: ChildView) -> ChildObservation | None:
        """The federated run's submitter Job (controller.federation)."""
        job = view.job(ns, name)
        if job is None:
            return None
        state, message, restarts = batch_job_state(job)
        report = view.report(ns, "jobs", name)
        if state == "Succeeded":
            return ChildObservation(name, state, restarts=restarts, result=report or {})
        if state == "Failed":
            message = with_trainer_error(message, report)
        return ChildObservation(name, state, message=message, restarts=restarts)

    @staticmethod
    def _conversion(recjob: RecJob, ns: str, view: ChildView) -> ChildObservation | None:
        name = conversion_name(recjob)
        job = view.job(ns, name)
        if job is None:
            return None
        state, message, _ = batch_job_state(job)
        if state == "Succeeded":
            return ChildObservation(name, state, result=view.report(ns, "jobs", name))
        if state == "Failed":
            return ChildObservation(
                name, state, message=message, result=view.report(ns, "jobs", name)
            )
        return ChildObservation(name, "Running")  # not ended yet

    # ------------------------------------------------------------------ metrics
    def read_metrics(self, recjob: RecJob) -> list[Reading]:
        """The canary checks, read from Prometheus for the current revisions."""
        status = recjob.status
        assert status is not None and status.rollout is not None
        try:
            url = self.prometheus.url(recjob.spec.rollout.prometheus)
        except LookupError as error:
            return [Reading(m.name, error=str(error)) for m in recjob.spec.rollout.metrics]
        values = analysis_query_values(recjob)
        return PrometheusSource(url).read(recjob.spec.rollout.metrics, values)

    # ------------------------------------------------------------------ act
    def apply(self, recjob: RecJob, actions: list, done: set | None = None) -> None:
        """Carry out the core's actions in order; each is safe to repeat. Each action
        carried out is added to ``done``; the first refused write raises
        :class:`ChildWriteError` (later actions are not attempted)."""
        ns = recjob.metadata.namespace or "default"
        for action in actions:
            if isinstance(action, EmitEvent):
                self.emit_event(recjob, action)
            elif isinstance(action, CreateTraining | CreateConversion):
                if isinstance(action, CreateTraining) and recjob.spec.training.federated:
                    check_grants(self.custom, recjob)  # silos in other namespaces
                for obj in self.child_objects(recjob, action):
                    namespace = obj["metadata"].get("namespace") or ns
                    self._create(namespace, CREATE_KINDS.get(obj["kind"], KUBEFLOW), obj)
            elif isinstance(action, DeployStable):
                self.serving.deploy_stable(recjob, action.model_version)
            elif isinstance(action, SetCanary):
                self.serving.set_canary(recjob, action.model_version, action.weight)
            elif isinstance(action, Promote):
                self.serving.promote(recjob, action.model_version)
            elif isinstance(action, RollBack):
                self.serving.roll_back(recjob, action.canary_version, action.stable_version)
            elif isinstance(action, ReleaseService):
                self.serving.release(recjob)
            elif isinstance(action, CleanupGeneration):
                self._cleanup(recjob, ns, action)
            elif isinstance(action, StopFederation):
                self.stop_federation(ns, action.name)
            if done is not None:
                done.add(action)

    @staticmethod
    def child_objects(recjob: RecJob, action: CreateTraining | CreateConversion) -> list[dict]:
        """The objects a create action makes: its ConfigMap, then the child."""
        if isinstance(action, CreateTraining):
            if recjob.spec.training.federated is not None:  # a new CA each time: the
                # Secret that exists already (409) is kept, with the pods that use it
                tls = make_tls_material(superlink_dns_names(recjob), [SUPERLINK_LOOPBACK[1]])
                return federation_objects(recjob, tls)
            return [training_config_map(recjob), pytorch_job(recjob)]
        return [conversion_config_map(recjob), conversion_job(recjob)]

    def _create(self, ns: str, kind: str | tuple[str, str, str], obj: dict) -> None:
        """Create ``obj`` unless it exists (409 AlreadyExists = done)."""
        plural = kind if isinstance(kind, str) else kind[2]
        call: Callable
        if isinstance(kind, str):
            call, args = self._creators[kind], (ns, obj)
        else:
            call = self.custom.create_namespaced_custom_object
            args = (kind[0], kind[1], ns, kind[2], obj)
        try:
            api_call("create", plural, call, *args)
        except ApiException as error:
            if error.status != 409:
                kind_, name = obj["kind"], obj["metadata"]["name"]
                raise ChildWriteError("create", kind_, name, error) from None

    def _cleanup(self, recjob: RecJob, ns: str, action: CleanupGeneration) -> None:
        """Delete a superseded model generation's training and/or conversion child."""
        name, generation = recjob.metadata.name, action.generation
        if action.training:
            self.delete_child(ns, "training", training_child_name(name, generation))
        if action.conversion is not None:
            convert = conversion_child_name(name, generation, action.conversion)
            self.delete_child(ns, "conversion", convert)

    def delete_child(self, ns: str, role: str, name: str) -> None:
        """Delete the ``training`` child ``name`` (a PyTorchJob, or a federated run's Job
        and its federation: the name says which only with the spec it came from) or the
        ``conversion`` Job ``name``, if it exists (its pods go with it)."""
        if role == "training":
            self._delete(
                "PyTorchJob", name, self.custom.delete_namespaced_custom_object,
                *KUBEFLOW[:2], ns, KUBEFLOW[2], name,
            )  # fmt: skip
            self.stop_federation(ns, name)
        self._delete("Job", name, self.batch.delete_namespaced_job, name, ns)

    @staticmethod
    def _delete(kind: str, name: str, call: Callable, *args) -> None:
        plural = KUBEFLOW[2] if kind == "PyTorchJob" else "jobs"
        try:
            api_call("delete", plural, call, *args, propagation_policy="Background")
        except ApiException as error:
            if not _missing(error):
                raise ChildWriteError("delete", kind, name, error) from None

    def stop_federation(self, ns: str, training: str) -> None:
        """Delete the SuperLink and SuperNode Deployments of the federated training child
        ``training`` (by its label; none left is fine). Its Service and Secret are inert:
        the RecJob's garbage collection takes them, so the operator needs no right to
        delete Secrets. Of silos in other namespaces, which no garbage collector reaches,
        the ConfigMaps and NetworkPolicies go too."""
        selector = f"{FEDERATION_LABEL}={training}"
        try:
            delete = self.apps.delete_collection_namespaced_deployment
            api_call("deletecollection", "deployments", delete, ns, label_selector=selector,
                     propagation_policy="Background")  # fmt: skip
        except ApiException as error:
            raise ChildWriteError("delete", "deployments", selector, error) from None
        self.silo_namespaces.delete(ns, federation_selector(ns, **{FEDERATION_LABEL: training}))

    def delete_silos_elsewhere(self, ns: str, name: str) -> None:
        """Delete what RecJob ``ns/name``'s federations, of any generation, made in other
        namespaces (its finalizer: nothing there is owned by it)."""
        self.silo_namespaces.delete(ns, recjob_selector(ns, name))

    def emit_event(self, recjob: RecJob, event: EmitEvent) -> None:
        """A Kubernetes Event on the RecJob (best effort: a failure is only logged). Its
        name is derived from what it says (:func:`event_name`): the same event emitted
        again by a pass that repeats one cut short before its status write (operator
        killed, 409) meets 409 AlreadyExists and is recorded once."""
        ns = recjob.metadata.namespace or "default"
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": event_name(recjob, event), "namespace": ns},
            "involvedObject": {
                "apiVersion": recjob.api_version,
                "kind": recjob.kind,
                "name": recjob.metadata.name,
                "namespace": ns,
                "uid": recjob.metadata.uid,
            },
            "type": event.type,
            "reason": event.reason,
            "message": one_line(event.message, MAX_EVENT_MESSAGE),  # logs, users' data
            "source": {"component": "recjob-operator"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            api_call("create", "events", self.core.create_namespaced_event, ns, body)
        except ApiException as error:  # events are best effort
            if error.status != 409:  # 409: recorded by an earlier attempt of this pass
                log.warning("event %s not recorded: %s", event.reason, error.reason)

    # ------------------------------------------------------------------ the RecJob
    def read_recjob(self, namespace: str, name: str) -> dict | None:
        """The RecJob as stored now (None once it is gone)."""
        try:
            return api_call(
                "get", "recjobs", self.custom.get_namespaced_custom_object,
                *RECJOBS[:2], namespace, RECJOBS[2], name,
            )  # fmt: skip
        except ApiException as error:
            if _missing(error):
                return None
            raise

    def write_status(self, recjob: RecJob, status: RecJobStatus) -> RecJob:
        """Write ``status`` with the RecJob's resourceVersion as a precondition (returns the
        RecJob as stored); :class:`StatusConflict` if the RecJob changed meanwhile."""
        ns = recjob.metadata.namespace or "default"
        # A PUT of the status subresource: the API server keeps all but the status from the
        # stored object, so the body needs no spec, and nothing is merged (applying a merge
        # patch re-encodes the whole stored object: 15% of the API server's CPU, status and
        # finalizer patches together, while 2,000 new RecJobs were reconciled). The status
        # sent is whole: the operator computed it from the stored one.
        meta = {"name": recjob.metadata.name, "namespace": ns,
                "resourceVersion": recjob.metadata.resource_version}  # fmt: skip
        written = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        body = {"apiVersion": "/".join(RECJOBS[:2]), "kind": "RecJob", "metadata": meta,
                "status": written}  # fmt: skip
        try:
            stored = api_call(
                "update", "recjobs/status", self.custom.replace_namespaced_custom_object_status,
                *RECJOBS[:2], ns, RECJOBS[2], recjob.metadata.name, body,
            )  # fmt: skip
        except ApiException as error:
            if error.status == 409:
                raise StatusConflict(recjob.metadata.name) from None
            raise
        # the RecJob as stored: the one read (the precondition held) with the status written
        # (parsing the answer again was 3% of the operator's CPU at 1,000 new RecJobs)
        meta = recjob.metadata.model_copy(
            update={"resource_version": stored["metadata"]["resourceVersion"]}
        )
        return recjob.model_copy(update={"metadata": meta, "status": status})

    def write_status_body(self, namespace: str, name: str, status: dict) -> None:
        """Write a status without precondition (an invalid RecJob's Failed status)."""
        api_call(
            "patch", "recjobs/status", self.custom.patch_namespaced_custom_object_status,
            *RECJOBS[:2], namespace, RECJOBS[2], name, {"status": status},
        )  # fmt: skip
