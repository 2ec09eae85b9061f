"""The Kubernetes backend: observes and acts for the reconcile core through the API server.

Training is a Kubeflow PyTorchJob, conversion a batch Job (its quality-gate summary read
from the pod's termination message), serving a KServe InferenceService whose annotations
record which model version is stable and which is the canary. Every create is
create-if-absent by deterministic name (409 AlreadyExists = done); status is written to
the status subresource with a resourceVersion precondition and re-read on 409.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ..api.v1alpha1.common import APPROVE_ANNOTATION, GROUP
from ..api.v1alpha1.recjob import RecJob
from ..api.v1alpha1.status import RecJobStatus
from ..controller.analysis import Reading
from ..controller.children import (
    conversion_config_map,
    conversion_job,
    inference_service,
    pytorch_job,
    pytorch_job_state,
    training_config_map,
)
from ..controller.reconcile import (
    ChildObservation,
    CleanupGeneration,
    CreateConversion,
    CreateTraining,
    DeployStable,
    EmitEvent,
    Observed,
    Promote,
    RollBack,
    ServingObservation,
    SetCanary,
    analysis_query_values,
    conversion_name,
    training_name,
)
from ..prometheus import PrometheusSource

log = logging.getLogger("recjob_operator.kube")

STABLE_ANNOTATION = f"{GROUP}/stable-model-version"
VERSION_ANNOTATION = f"{GROUP}/model-version"
KUBEFLOW = ("kubeflow.org", "v1", "pytorchjobs")
KSERVE = ("serving.kserve.io", "v1beta1", "inferenceservices")
RECJOBS = (GROUP, "v1alpha1", "recjobs")


def _missing(error: ApiException) -> bool:
    return error.status == 404


class KubeBackend:
    """One operator's view of the cluster (a kubernetes ApiClient)."""

    def __init__(self, api: client.ApiClient, prometheus_url: str | None = None):
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.prometheus_url = prometheus_url

    # ------------------------------------------------------------------ observe
    def observe(self, recjob: RecJob) -> Observed:
        """Children of the RecJob's current generation and its service."""
        ns = recjob.metadata.namespace or "default"
        annotations = recjob.metadata.annotations or {}
        approved = annotations.get(APPROVE_ANNOTATION, "")
        return Observed(
            training=self._training(recjob, ns),
            conversion=self._conversion(recjob, ns),
            serving=self._serving(recjob, ns),
            approved_generation=int(approved) if approved.isdigit() else None,
        )

    def _training(self, recjob: RecJob, ns: str) -> ChildObservation | None:
        name = training_name(recjob)
        try:
            job = self.custom.get_namespaced_custom_object(*KUBEFLOW[:2], ns, KUBEFLOW[2], name)
        except ApiException as error:
            if _missing(error):
                return None
            raise
        state, message, restarts = pytorch_job_state(job)
        result = None
        if state == "Succeeded":
            result = (
                self._termination_message(
                    ns,
                    f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master",
                )
                or {}
            )
        return ChildObservation(name, state, message=message, restarts=restarts, result=result)

    def _conversion(self, recjob: RecJob, ns: str) -> ChildObservation | None:
        name = conversion_name(recjob)
        try:
            job = self.batch.read_namespaced_job(name, ns)
        except ApiException as error:
            if _missing(error):
                return None
            raise
        conditions = {c.type: c for c in (job.status.conditions or [])} if job.status else {}
        report = self._termination_message(ns, f"job-name={name}")
        if "Complete" in conditions and conditions["Complete"].status == "True":
            return ChildObservation(name, "Succeeded", result=report)
        if "Failed" in conditions and conditions["Failed"].status == "True":
            message = conditions["Failed"].message or conditions["Failed"].reason
            return ChildObservation(name, "Failed", message=message, result=report)
        return ChildObservation(name, "Running")

    def _termination_message(self, ns: str, selector: str) -> dict | None:
        """The JSON a finished container left in its termination message."""
        pods = self.core.list_namespaced_pod(ns, label_selector=selector).items
        for pod in pods:
            for container in (pod.status.container_statuses or []) if pod.status else []:
                terminated = container.state.terminated if container.state else None
                if terminated and terminated.message:
                    try:
                        return json.loads(terminated.message)
                    except ValueError:
                        log.warning("unreadable termination message in %s", pod.metadata.name)
        return None

    def _serving(self, recjob: RecJob, ns: str) -> ServingObservation | None:
        try:
            isvc = self.custom.get_namespaced_custom_object(
                *KSERVE[:2], ns, KSERVE[2], recjob.service_name
            )
        except ApiException as error:
            if _missing(error):
                return None
            raise
        annotations = isvc["metadata"].get("annotations") or {}
        stable = annotations.get(STABLE_ANNOTATION)
        current = annotations.get(VERSION_ANNOTATION)
        predictor = isvc.get("spec", {}).get("predictor", {})
        conditions = {c.get("type"): c for c in (isvc.get("status") or {}).get("conditions") or []}
        ready = (conditions.get("Ready") or {}).get("status") == "True"
        traffic = ((isvc.get("status") or {}).get("components") or {}).get("predictor") or {}
        canary_version = int(current) if current and current != stable else None
        return ServingObservation(
            stable_version=int(stable) if stable else None,
            canary_version=canary_version,
            canary_weight=int(predictor.get("canaryTrafficPercent") or 0) if canary_version else 0,
            ready=ready,
            stable_revision=traffic.get("previousRolledoutRevision")
            if canary_version
            else traffic.get("latestReadyRevision"),
            canary_revision=traffic.get("latestCreatedRevision") if canary_version else None,
        )

    # ------------------------------------------------------------------ metrics
    def read_metrics(self, recjob: RecJob) -> list[Reading]:
        """The canary checks, read from Prometheus for the current revisions."""
        status = recjob.status
        assert status is not None and status.rollout is not None
        url = recjob.spec.rollout.prometheus_url or self.prometheus_url
        if not url:
            return [
                Reading(m.name, error="no Prometheus configured (spec.rollout.prometheusUrl)")
                for m in recjob.spec.rollout.metrics
            ]
        values = analysis_query_values(recjob)
        return PrometheusSource(url).read(recjob.spec.rollout.metrics, values)

    # ------------------------------------------------------------------ act
    def apply(self, recjob: RecJob, actions: list) -> None:
        """Carry out the core's actions; each is safe to repeat."""
        ns = recjob.metadata.namespace or "default"
        for action in actions:
            if isinstance(action, EmitEvent):
                self._event(recjob, ns, action)
            elif isinstance(action, CreateTraining):
                self._create_core(ns, training_config_map(recjob))
                self._create_custom(ns, KUBEFLOW, pytorch_job(recjob))
            elif isinstance(action, CreateConversion):
                self._create_core(ns, conversion_config_map(recjob))
                self._create_job(ns, conversion_job(recjob))
            elif isinstance(action, DeployStable):
                self._serve(recjob, ns, action.model_version, None, stable=action.model_version)
            elif isinstance(action, SetCanary):
                self._serve(recjob, ns, action.model_version, action.weight, stable=None)
            elif isinstance(action, Promote):
                self._serve(recjob, ns, action.model_version, None, stable=action.model_version)
            elif isinstance(action, RollBack):
                if action.stable_version is not None:
                    self._serve(recjob, ns, action.stable_version, None,
                                stable=action.stable_version)  # fmt: skip
            elif isinstance(action, CleanupGeneration):
                self._cleanup(recjob, ns, action.generation)

    def _create_core(self, ns: str, obj: dict) -> None:
        try:
            self.core.create_namespaced_config_map(ns, obj)
        except ApiException as error:
            if error.status != 409:
                raise

    def _create_job(self, ns: str, obj: dict) -> None:
        try:
            self.batch.create_namespaced_job(ns, obj)
        except ApiException as error:
            if error.status != 409:
                raise

    def _create_custom(self, ns: str, kind: tuple[str, str, str], obj: dict) -> None:
        try:
            self.custom.create_namespaced_custom_object(kind[0], kind[1], ns, kind[2], obj)
        except ApiException as error:
            if error.status != 409:
                raise

    def _serve(
        self, recjob: RecJob, ns: str, version: int, canary: int | None, stable: int | None
    ) -> None:
        desired = inference_service(recjob, version, canary)
        annotations = desired["metadata"]["annotations"]
        try:
            current = self.custom.get_namespaced_custom_object(
                *KSERVE[:2], ns, KSERVE[2], recjob.service_name
            )
        except ApiException as error:
            if not _missing(error):
                raise
            annotations[STABLE_ANNOTATION] = str(stable if stable is not None else version)
            self._create_custom(ns, KSERVE, desired)
            return
        previous = (current["metadata"].get("annotations") or {}).get(STABLE_ANNOTATION)
        annotations[STABLE_ANNOTATION] = str(stable) if stable is not None else previous
        predictor = desired["spec"]["predictor"]
        patch = {
            "metadata": {"annotations": annotations},
            "spec": {"predictor": {**predictor, "canaryTrafficPercent": canary}},
        }
        self.custom.patch_namespaced_custom_object(
            *KSERVE[:2], ns, KSERVE[2], recjob.service_name, patch
        )

    def _cleanup(self, recjob: RecJob, ns: str, generation: int) -> None:
        name = recjob.metadata.name
        for delete in (
            lambda: self.custom.delete_namespaced_custom_object(
                *KUBEFLOW[:2], ns, KUBEFLOW[2], f"{name}-g{generation}-train"
            ),
            lambda: self.batch.delete_namespaced_job(
                f"{name}-g{generation}-convert", ns, propagation_policy="Background"
            ),
        ):
            try:
                delete()
            except ApiException as error:
                if not _missing(error):
                    raise

    def _event(self, recjob: RecJob, ns: str, event: EmitEvent) -> None:
        now = datetime.now(UTC)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{recjob.metadata.name}.", "namespace": ns},
            "involvedObject": {
                "apiVersion": recjob.api_version,
                "kind": recjob.kind,
                "name": recjob.metadata.name,
                "namespace": ns,
                "uid": recjob.metadata.uid,
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:1024],
            "source": {"component": "recjob-operator"},
            "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(ns, body)
        except ApiException as error:  # events are best effort
            log.warning("event %s not recorded: %s", event.reason, error.reason)

    # ------------------------------------------------------------------ status
    def write_status(self, recjob: RecJob, status: RecJobStatus, attempts: int = 5) -> RecJob:
        """Write ``status`` with the RecJob's resourceVersion as a precondition; on 409
        re-read the object and try again (returns the RecJob as stored)."""
        ns = recjob.metadata.namespace or "default"
        body = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        version = recjob.metadata.resource_version
        for _ in range(attempts):
            try:
                stored = self.custom.patch_namespaced_custom_object_status(
                    *RECJOBS[:2], ns, RECJOBS[2], recjob.metadata.name,
                    {"metadata": {"resourceVersion": version}, "status": body},
                )  # fmt: skip
                return RecJob.model_validate(stored)
            except ApiException as error:
                if error.status != 409:
                    raise
                fresh = self.custom.get_namespaced_custom_object(
                    *RECJOBS[:2], ns, RECJOBS[2], recjob.metadata.name
                )
                version = fresh["metadata"]["resourceVersion"]
                log.info("status of %s conflicted; retrying on %s", recjob.metadata.name, version)
        raise RuntimeError(f"status of {recjob.metadata.name}: {attempts} conflicts in a row")
