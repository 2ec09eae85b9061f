"""Serving through KServe: observe a RecJob's service and carry out the core's rollout
actions, in Serverless or RawDeployment/Standard mode (objects: ``serving_objects``).

One rollout per service at a time: the service record (ConfigMap ``<service>-recjob``)
names the RecJob holding the service; it is claimed by the first serving action with a
resourceVersion precondition (two operators' passes cannot both win) and released when the
rollout ends. A holder that no longer exists or no longer rolls out counts as gone. RecJobs
waiting for the service go oldest first.

Objects of a service's names that the operator did not create (no
``app.kubernetes.io/managed-by=recjob-operator`` label) are never modified: the action
fails with a message saying so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ..api.v1alpha1.recjob import RecJob
from ..controller.actions import ServingObservation
from ..controller.rollout import revision_name
from ..controller.serving_objects import (
    http_route,
    record_name,
    route_weights,
    serverless_inference_service,
    service_record,
    version_inference_service,
)
from .cache import HTTPROUTES, KSERVE, MANAGED_SELECTOR, ApiView, ChildView
from .errors import ChildWriteError
from .metrics import api_call

MANAGED_LABEL, MANAGED_VALUE = MANAGED_SELECTOR.split("=")
#: modelStatus.transitionStatus values meaning the model cannot load (KServe's API).
FAILED_TRANSITIONS = ("BlockedByFailedLoad", "InvalidSpec")


def _conditions(obj: Mapping | None) -> dict[str, dict]:
    status = (obj or {}).get("status") or {}
    return {c.get("type"): c for c in status.get("conditions") or []}


def is_ready(isvc: Mapping | None) -> bool:
    """The InferenceService's Ready condition is True."""
    return (_conditions(isvc).get("Ready") or {}).get("status") == "True"


def observed(isvc: Mapping | None) -> bool:
    """KServe's status describes the current spec (its observedGeneration caught up): a
    status from before the last change says nothing about the new model."""
    generation = ((isvc or {}).get("metadata") or {}).get("generation")
    seen = ((isvc or {}).get("status") or {}).get("observedGeneration")
    return generation is None or seen == generation


def failure(isvc: Mapping | None) -> str | None:
    """Why KServe says the InferenceService's model cannot serve, if it says so (about
    its current spec)."""
    if not observed(isvc):
        return None
    model = ((isvc or {}).get("status") or {}).get("modelStatus") or {}
    info = model.get("lastFailureInfo") or {}
    if model.get("transitionStatus") not in FAILED_TRANSITIONS:
        return None
    text = ": ".join(str(info[k]) for k in ("reason", "message") if info.get(k))
    return text or str(model.get("transitionStatus"))


def serverless_readiness(isvc: Mapping | None) -> bool:
    """Serverless: the latest created revision is the latest ready one."""
    predictor = (((isvc or {}).get("status") or {}).get("components") or {}).get("predictor")
    predictor = predictor or {}
    created = predictor.get("latestCreatedRevision")
    return bool(created) and created == predictor.get("latestReadyRevision")


def _without_nones(value: object) -> object:
    """``value`` without the None entries a merge patch uses to remove fields."""
    if isinstance(value, dict):
        return {k: _without_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nones(v) for v in value]
    return value


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _foreign(kind: str, name: str) -> ChildWriteError:
    body = json.dumps({
        "reason": "NotManaged",
        "message": f"{kind} {name} exists and was not created by the RecJob operator (no label "
        f"{MANAGED_SELECTOR}): not modified; rename spec.serving.name or remove it",
    })  # fmt: skip
    error = ApiException(status=409, reason="Conflict")
    error.body = body
    return ChildWriteError("modify", kind, name, error)


class KubeServing:
    """A RecJob's service, through the API server."""

    def __init__(self, api: client.ApiClient):
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.api_view = ApiView(api)  # writes read what they change through the API

    # ------------------------------------------------------------------ read
    def record(self, recjob: RecJob) -> client.V1ConfigMap | None:
        """The service record, if the service has one."""
        found = api_call(
            "list", "configmaps", self.core.list_namespaced_config_map,
            recjob.metadata.namespace or "default",
            field_selector=f"metadata.name={record_name(recjob.service_name)}",
        ).items  # fmt: skip
        return found[0] if found else None

    @staticmethod
    def waiting_for(recjob: RecJob, data: Mapping[str, str], view: ChildView) -> str | None:
        """Why ``recjob`` may not roll out to its service now (None: it may)."""
        uid = recjob.metadata.uid
        if data.get("holderUid") == uid:
            return None
        ns = recjob.metadata.namespace or "default"
        rolling = [r for r in view.service_recjobs(ns, recjob.service_name)
                   if r.get("phase") == "RollingOut"]  # fmt: skip
        holder = next((r for r in rolling if r["uid"] == data.get("holderUid")), None)
        if holder is not None:
            return f"RecJob {holder['name']} is rolling out to it"

        def order(r: Mapping) -> tuple[str, str]:
            return (r.get("created") or "", r.get("name") or "")

        me = next((r for r in rolling if r["uid"] == uid), None)
        ahead = sorted(
            (r for r in rolling if me is not None and r is not me and order(r) < order(me)),
            key=order,
        )
        if ahead:
            return f"older RecJobs go first: {', '.join(r['name'] for r in ahead)}"
        return None

    def observe(self, recjob: RecJob, view: ChildView) -> ServingObservation | None:
        """The service as the core sees it (None: nothing deployed yet, and free)."""
        ns = recjob.metadata.namespace or "default"
        record = view.record(ns, record_name(recjob.service_name))
        data = dict((record or {}).get("data") or {})
        waiting = self.waiting_for(recjob, data, view)
        stable, canary = _int(data.get("stableModelVersion")), _int(data.get("canaryModelVersion"))
        status = recjob.status
        target = status.conversion.model_version if status and status.conversion else None
        service = recjob.service_name
        if recjob.spec.serving.raw:
            target_isvc = (
                view.inferenceservice(ns, revision_name(service, target)) if target else None
            )
            stable_name = revision_name(service, stable) if stable else None
            stable_isvc = view.inferenceservice(ns, stable_name) if stable_name else None
            route = view.httproute(ns, service) if stable is not None else None
            weights = route_weights(route) if route else {}
            ready = is_ready(stable_isvc) and weights.get(stable or -1) == 100
            canary_ready = is_ready(target_isvc)
        else:
            isvc = view.inferenceservice(ns, service)
            target_isvc = isvc
            predictor = (isvc or {}).get("spec", {}).get("predictor") or {}
            ready = is_ready(isvc)
            # (a status not yet caught up with a new storageUri still shows the old revision
            # ready: analyses then find no data for the canary and hold, never pass)
            canary_ready = ready and serverless_readiness(isvc)
            weights = {}
            if canary is not None:
                weights = {canary: int(predictor.get("canaryTrafficPercent") or 0)}
        if record is None and waiting is None:
            return None
        components = ((target_isvc or {}).get("status") or {}).get("components") or {}
        predictor_status = components.get("predictor") or {}
        return ServingObservation(
            stable_version=stable,
            canary_version=canary,
            canary_weight=weights.get(canary, 0) if canary is not None else 0,
            ready=ready,
            stable_revision=predictor_status.get("latestRolledoutRevision"),
            canary_revision=predictor_status.get("latestCreatedRevision"),
            canary_ready=canary_ready,
            failure=failure(target_isvc),
            waiting_for=waiting,
        )

    # ------------------------------------------------------------------ write
    def _managed(self, obj: Mapping | client.V1ConfigMap | None, kind: str, name: str) -> None:
        labels = (
            obj.metadata.labels
            if isinstance(obj, client.V1ConfigMap)
            else ((obj or {}).get("metadata") or {}).get("labels")
        ) or {}
        if obj is not None and labels.get(MANAGED_LABEL) != MANAGED_VALUE:
            raise _foreign(kind, name)

    def claim(self, recjob: RecJob, record=None, **changes: str | None) -> None:
        """Hold the service (and change the record's ``changes``: None removes a key), with
        a resourceVersion precondition; a lost race raises a 409 ChildWriteError.
        ``record``: the record as just read (else read here)."""
        record = record if record is not None else self.record(recjob)
        name = record_name(recjob.service_name)
        self._managed(record, "ConfigMap", name)
        data = dict(record.data or {}) if record is not None else {}
        data.update({"holder": recjob.metadata.name, "holderUid": recjob.metadata.uid or ""})
        for key, value in changes.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        self._write_record(recjob, record, data)

    def release(self, recjob: RecJob) -> None:
        """Let go of the service if ``recjob`` holds it."""
        record = self.record(recjob)
        if record is None or (record.data or {}).get("holderUid") != recjob.metadata.uid:
            return
        data = {k: v for k, v in (record.data or {}).items() if k not in ("holder", "holderUid")}
        self._write_record(recjob, record, data)

    def _write_record(self, recjob: RecJob, record, data: dict[str, str]) -> None:
        ns = recjob.metadata.namespace or "default"
        body = service_record(recjob, data)
        name = body["metadata"]["name"]
        try:
            if record is None:
                api_call("create", "configmaps", self.core.create_namespaced_config_map, ns, body)
            else:
                body["metadata"]["resourceVersion"] = record.metadata.resource_version
                api_call("update", "configmaps", self.core.replace_namespaced_config_map,
                         name, ns, body)  # fmt: skip
        except ApiException as error:
            raise ChildWriteError("update", "ConfigMap", name, error) from None

    def _apply_custom(self, kind: tuple[str, str, str], ns: str, obj: dict) -> None:
        """Create ``obj``, or merge-patch it if the operator's own object exists."""
        name, label = obj["metadata"]["name"], obj["kind"]
        current = self.api_view._list_custom(kind, ns, name)
        self._managed(current, label, name)
        try:
            if current is None:
                api_call("create", kind[2], self.custom.create_namespaced_custom_object,
                         *kind[:2], ns, kind[2], _without_nones(obj))  # fmt: skip
            else:
                api_call("patch", kind[2], self.custom.patch_namespaced_custom_object,
                         *kind[:2], ns, kind[2], name, obj)  # fmt: skip
        except ApiException as error:
            raise ChildWriteError("apply", label, name, error) from None

    def _patch_isvc(self, ns: str, name: str, patch: dict) -> None:
        try:
            api_call("patch", KSERVE[2], self.custom.patch_namespaced_custom_object,
                     *KSERVE[:2], ns, KSERVE[2], name, patch)  # fmt: skip
        except ApiException as error:
            if error.status != 404:
                raise ChildWriteError("patch", "InferenceService", name, error) from None

    def _delete_isvc(self, ns: str, name: str) -> None:
        current = self.api_view._list_custom(KSERVE, ns, name)
        if current is None:
            return
        self._managed(current, "InferenceService", name)
        try:
            api_call("delete", KSERVE[2], self.custom.delete_namespaced_custom_object,
                     *KSERVE[:2], ns, KSERVE[2], name)  # fmt: skip
        except ApiException as error:
            if error.status != 404:
                raise ChildWriteError("delete", "InferenceService", name, error) from None

    @staticmethod
    def _stable(record: client.V1ConfigMap | None) -> int | None:
        return _int((record.data or {}).get("stableModelVersion")) if record else None

    def deploy_stable(self, recjob: RecJob, version: int) -> None:
        """``version`` to all traffic: the service's first model."""
        ns = recjob.metadata.namespace or "default"
        self.claim(recjob, stableModelVersion=str(version), canaryModelVersion=None)
        if recjob.spec.serving.raw:
            self._apply_custom(KSERVE, ns, version_inference_service(recjob, version, False))
            self._apply_custom(HTTPROUTES, ns, http_route(recjob, {version: 100}))
        else:
            isvc = serverless_inference_service(recjob, version, None)
            isvc["spec"]["predictor"]["canaryTrafficPercent"] = None  # merge patch: removed
            self._apply_custom(KSERVE, ns, isvc)

    def set_canary(self, recjob: RecJob, version: int, weight: int) -> None:
        """``version`` as the canary with ``weight`` percent (Raw: 0 until it is Ready)."""
        ns = recjob.metadata.namespace or "default"
        record = self.record(recjob)
        stable = self._stable(record)
        self.claim(recjob, record, canaryModelVersion=str(version))
        if recjob.spec.serving.raw:
            self._apply_custom(KSERVE, ns, version_inference_service(recjob, version, True))
            name = revision_name(recjob.service_name, version)
            if not is_ready(self.api_view._list_custom(KSERVE, ns, name)):
                weight = 0  # no traffic to pods that cannot answer yet
            weights = {version: weight}
            if stable is not None and stable != version:
                weights[stable] = 100 - weight
            self._apply_custom(HTTPROUTES, ns, http_route(recjob, weights))
        else:
            self._apply_custom(KSERVE, ns, serverless_inference_service(recjob, version, weight))

    def promote(self, recjob: RecJob, version: int) -> None:
        """The canary ``version`` becomes the stable model (no new revision, no restart)."""
        ns = recjob.metadata.namespace or "default"
        record = self.record(recjob)
        stable = self._stable(record)
        if recjob.spec.serving.raw:
            self._apply_custom(HTTPROUTES, ns, http_route(recjob, {version: 100}))
            name = revision_name(recjob.service_name, version)
            self._patch_isvc(ns, name, {"metadata": {"ownerReferences": None}})
            if stable is not None and stable != version:
                self._delete_isvc(ns, revision_name(recjob.service_name, stable))
        else:  # traffic only: KServe routes 100% to the latest revision
            self._patch_isvc(ns, recjob.service_name,
                             {"spec": {"predictor": {"canaryTrafficPercent": None}}})  # fmt: skip
        self.claim(recjob, record, stableModelVersion=str(version), canaryModelVersion=None)

    def roll_back(self, recjob: RecJob, version: int, stable: int | None) -> None:
        """All traffic back to ``stable``; the canary ``version`` removed (Raw) or at 0%
        (Serverless: KServe's documented rollback, no new revision)."""
        ns = recjob.metadata.namespace or "default"
        if recjob.spec.serving.raw:
            if stable is not None:
                self._apply_custom(HTTPROUTES, ns, http_route(recjob, {stable: 100}))
            if stable != version:
                self._delete_isvc(ns, revision_name(recjob.service_name, version))
        else:
            self._patch_isvc(ns, recjob.service_name,
                             {"spec": {"predictor": {"canaryTrafficPercent": 0}}})  # fmt: skip
        record = self.record(recjob)
        if record is not None and (record.data or {}).get("holderUid") == recjob.metadata.uid:
            self.claim(recjob, record, canaryModelVersion=None)
