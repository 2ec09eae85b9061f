"""A small, faithful fake Kubernetes API server (HTTP, aiohttp) for integration tests and
benchmarks, where no real kube-apiserver can run.

What it does as the real one does:
- discovery (``/api``, ``/api/v1``, ``/apis``, ``/apis/{group}/{version}``);
- one global, increasing ``resourceVersion``; ``uid``, ``creationTimestamp``,
  ``generation`` (bumped by spec changes, not by status or metadata);
- list (label selectors) and watch (chunked JSON lines, from a resourceVersion);
- create (409 AlreadyExists), get (404), replace (409 Conflict on a stale
  resourceVersion), merge / strategic-merge patch, JSON patch (422 when a ``test`` op
  fails), delete;
- the ``status`` subresource of resources that have one: the main endpoint ignores status,
  the subresource changes only status;
- finalizers: delete sets ``deletionTimestamp``; the object goes when its finalizers are
  removed;
- a request log (verb, group, resource, subresource, namespace) to check RBAC against;
- injected faults: the next N writes of a resource answer 409.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

import jsonpatch
from aiohttp import web


@dataclass(frozen=True)
class Resource:
    """One API resource the server knows."""

    group: str  # "" for core
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status: bool = False
    """Has a status subresource."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


DEFAULT_RESOURCES = (
    Resource("", "v1", "namespaces", "Namespace", namespaced=False, status=True),
    Resource("", "v1", "configmaps", "ConfigMap"),
    Resource("", "v1", "events", "Event"),
    Resource("", "v1", "pods", "Pod", status=True),
    Resource("events.k8s.io", "v1", "events", "Event"),
    Resource("batch", "v1", "jobs", "Job", status=True),
    Resource("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", status=True),
    Resource("serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService", status=True),
    Resource("recjob.dev", "v1alpha1", "recjobs", "RecJob", status=True),
    Resource(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
    ),
    Resource("coordination.k8s.io", "v1", "leases", "Lease"),
)

_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


@dataclass
class LoggedRequest:
    """One request, as RBAC sees it."""

    verb: str
    group: str
    resource: str
    subresource: str | None
    namespace: str | None
    name: str | None
    status: int = 0
    client: str = "operator"
    """"test" for requests from httpx (the tests playing other controllers)."""
    created: str | None = None
    """For creates: the name in the body."""


def _status(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(
        {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
         "reason": reason, "code": code},
        status=code,
    )  # fmt: skip


def _merge(target: object, patch: object) -> object:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def _matches(obj: dict, selector: str | None) -> bool:
    if not selector:
        return True
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in selector.split(","):
        term = term.strip()
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@dataclass
class Store:
    """Objects, the resourceVersion clock, watch queues and the request log."""

    resources: tuple[Resource, ...] = DEFAULT_RESOURCES
    objects: dict[tuple, dict] = field(default_factory=dict)
    revision: int = 1
    history: list[tuple[int, str, Resource, dict]] = field(default_factory=list)
    watchers: dict[Resource, set[asyncio.Queue]] = field(default_factory=lambda: defaultdict(set))
    log: list[LoggedRequest] = field(default_factory=list)
    conflicts: dict[tuple[str, str | None], int] = field(default_factory=dict)
    """(plural, subresource) -> how many more writes answer 409."""

    def find(self, group: str, version: str, plural: str) -> Resource | None:
        for resource in self.resources:
            if (resource.group, resource.version, resource.plural) == (group, version, plural):
                return resource
        return None

    def key(self, resource: Resource, namespace: str | None, name: str) -> tuple:
        return (resource.group, resource.plural, namespace if resource.namespaced else None, name)

    def emit(self, kind: str, resource: Resource, obj: dict) -> None:
        self.history.append((self.revision, kind, resource, copy.deepcopy(obj)))
        for queue in list(self.watchers[resource]):
            queue.put_nowait((kind, copy.deepcopy(obj)))

    def bump(self, obj: dict) -> None:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)

    def put(self, resource: Resource, obj: dict, kind: str) -> dict:
        self.bump(obj)
        meta = obj["metadata"]
        self.objects[self.key(resource, meta.get("namespace"), meta["name"])] = obj
        self.emit(kind, resource, obj)
        return obj

    def remove(self, resource: Resource, obj: dict) -> None:
        meta = obj["metadata"]
        del self.objects[self.key(resource, meta.get("namespace"), meta["name"])]
        self.bump(obj)
        self.emit("DELETED", resource, obj)

    def seed(self, resource: Resource, obj: dict) -> dict:
        """Create ``obj`` directly (tests: namespaces, CRDs, objects made by 'kubectl')."""
        obj = copy.deepcopy(obj)
        _initialise(resource, obj)
        return self.put(resource, obj, "ADDED")


def _initialise(resource: Resource, obj: dict) -> None:
    meta = obj.setdefault("metadata", {})
    meta.setdefault("uid", str(uuid.uuid4()))
    meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    meta["generation"] = 1
    obj.setdefault("apiVersion", resource.api_version)
    obj.setdefault("kind", resource.kind)


def _without_status(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "status"}


def make_app(store: Store) -> web.Application:
    """The aiohttp application serving ``store``."""
    app = web.Application()

    def resource_of(request: web.Request) -> Resource:
        info = request.match_info
        resource = store.find(info.get("group", ""), info["version"], info["plural"])
        if resource is None:
            raise web.HTTPNotFound(
                text=json.dumps({"kind": "Status", "code": 404, "reason": "NotFound",
                                 "message": f"the server could not find {info['plural']}"}),
                content_type="application/json",
            )  # fmt: skip
        return resource

    def record(request: web.Request, verb: str, resource: Resource) -> LoggedRequest:
        info = request.match_info
        entry = LoggedRequest(
            verb, resource.group, resource.plural, info.get("sub"), info.get("namespace"),
            info.get("name"),
            client="test" if request.headers.get("User-Agent", "").startswith("python-httpx")
            else "operator",
        )  # fmt: skip
        store.log.append(entry)
        return entry

    def conflict_injected(resource: Resource, sub: str | None) -> bool:
        left = store.conflicts.get((resource.plural, sub), 0)
        if left > 0:
            store.conflicts[(resource.plural, sub)] = left - 1
            return True
        return False

    async def discovery_core(_: web.Request) -> web.Response:
        return web.json_response({"kind": "APIVersions", "versions": ["v1"]})

    async def discovery_groups(_: web.Request) -> web.Response:
        groups: dict[str, list[str]] = defaultdict(list)
        for r in store.resources:
            if r.group and r.version not in groups[r.group]:
                groups[r.group].append(r.version)
        return web.json_response({
            "kind": "APIGroupList", "apiVersion": "v1",
            "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                for g, vs in groups.items()
            ],
        })  # fmt: skip

    async def discovery_resources(request: web.Request) -> web.Response:
        group, version = request.match_info.get("group", ""), request.match_info["version"]
        items = []
        for r in store.resources:
            if (r.group, r.version) != (group, version):
                continue
            items.append({"name": r.plural, "singularName": r.kind.lower(),
                          "namespaced": r.namespaced, "kind": r.kind, "verbs": _VERBS})  # fmt: skip
            if r.status:
                items.append({"name": f"{r.plural}/status", "singularName": "",
                              "namespaced": r.namespaced, "kind": r.kind,
                              "verbs": ["get", "patch", "update"]})  # fmt: skip
        if not items:
            return _status(404, "NotFound", f"no resources in {group}/{version}")
        return web.json_response({
            "kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": items,
        })  # fmt: skip

    async def collection(request: web.Request) -> web.StreamResponse:
        resource = resource_of(request)
        namespace = request.match_info.get("namespace")
        if request.method == "POST":
            entry = record(request, "create", resource)
            obj = await request.json()
            meta = obj.setdefault("metadata", {})
            entry.created = meta.get("name")
            if resource.namespaced:
                meta["namespace"] = namespace
            if "name" not in meta and "generateName" in meta:
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            if store.key(resource, namespace, meta.get("name", "")) in store.objects:
                entry.status = 409
                return _status(
                    409, "AlreadyExists", f'{resource.plural} "{meta["name"]}" already exists'
                )
            _initialise(resource, obj)
            if resource.status:
                obj.pop("status", None)
            store.put(resource, obj, "ADDED")
            entry.status = 201
            return web.json_response(obj, status=201)
        selector = request.query.get("labelSelector")
        if request.query.get("watch") in ("true", "1"):
            record(request, "watch", resource)
            return await watch(request, resource, namespace, selector)
        record(request, "list", resource)
        items = [
            o for k, o in sorted(store.objects.items())
            if k[0] == resource.group and k[1] == resource.plural
            and (namespace is None or k[2] == namespace) and _matches(o, selector)
        ]  # fmt: skip
        return web.json_response({
            "kind": f"{resource.kind}List", "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(store.revision)}, "items": items,
        })  # fmt: skip

    async def watch(
        request: web.Request, resource: Resource, namespace: str | None, selector: str | None
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        since = int(request.query.get("resourceVersion") or 0)
        timeout = float(request.query.get("timeoutSeconds") or 300)
        queue: asyncio.Queue = asyncio.Queue()
        store.watchers[resource].add(queue)

        def wanted(obj: dict) -> bool:
            ns = obj["metadata"].get("namespace")
            return (namespace is None or ns == namespace) and _matches(obj, selector)

        try:
            if since:
                for revision, kind, res, obj in list(store.history):
                    if res == resource and revision > since and wanted(obj):
                        await response.write(
                            json.dumps({"type": kind, "object": obj}).encode() + b"\n"
                        )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    kind, obj = await asyncio.wait_for(queue.get(), timeout=left)
                except TimeoutError:
                    break
                if wanted(obj):
                    await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            store.watchers[resource].discard(queue)
        return response

    async def item(request: web.Request) -> web.Response:
        resource = resource_of(request)
        info = request.match_info
        namespace, name, sub = info.get("namespace"), info["name"], info.get("sub")
        if sub not in (None, "status"):
            return _status(404, "NotFound", f"no subresource {sub}")
        if sub == "status" and not resource.status:
            return _status(404, "NotFound", f"{resource.plural} have no status subresource")
        verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[request.method]
        entry = record(request, verb, resource)
        key = store.key(resource, namespace, name)
        current = store.objects.get(key)
        if current is None:
            entry.status = 404
            return _status(404, "NotFound", f'{resource.plural} "{name}" not found')
        if request.method == "GET":
            entry.status = 200
            return web.json_response(current)
        if request.method == "DELETE":
            entry.status = 200
            if current["metadata"].get("finalizers"):
                if not current["metadata"].get("deletionTimestamp"):
                    current["metadata"]["deletionTimestamp"] = datetime.now(UTC).strftime(
                        "%Y-%m-%dT%H:%M:%SZ"
                    )
                    store.put(resource, current, "MODIFIED")
                return web.json_response(current)
            store.remove(resource, current)
            return web.json_response(current)
        if conflict_injected(resource, sub):
            entry.status = 409
            return _status(409, "Conflict", "the object has been modified (injected)")
        body = await request.read()
        content_type = request.headers.get("Content-Type", "application/json").split(";")[0]
        try:
            payload = json.loads(body)
        except ValueError:
            entry.status = 400
            return _status(400, "BadRequest", "the body is not JSON")
        if request.method == "PUT":
            wanted_rv = (payload.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
                entry.status = 409
                return _status(
                    409, "Conflict", f'{resource.plural} "{name}": stale resourceVersion'
                )
            updated = payload
        elif content_type == "application/json-patch+json":
            try:
                updated = jsonpatch.apply_patch(current, payload)
            except jsonpatch.JsonPatchTestFailed as error:
                entry.status = 422
                return _status(422, "Invalid", f"test operation failed: {error}")
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
                entry.status = 422
                return _status(422, "Invalid", str(error))
        else:  # merge-patch+json, strategic-merge-patch+json (treated as merge)
            wanted_rv = (payload.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
                entry.status = 409
                return _status(
                    409, "Conflict", f'{resource.plural} "{name}": stale resourceVersion'
                )
            updated = _merge(current, payload)
        updated = copy.deepcopy(updated)
        meta = updated.setdefault("metadata", {})
        for fixed in ("uid", "creationTimestamp", "name", "namespace", "deletionTimestamp"):
            if fixed in current["metadata"]:
                meta[fixed] = current["metadata"][fixed]
        meta["generation"] = current["metadata"].get("generation", 1)
        if resource.status:
            if sub == "status":  # only status changes through the subresource
                updated = {**_without_status(current), "status": updated.get("status")}
                if updated["status"] is None:
                    updated.pop("status")
            else:  # and never through the main resource
                updated = {**_without_status(updated)}
                if "status" in current:
                    updated["status"] = current["status"]
                if _without_status(updated).get("spec") != current.get("spec"):
                    updated["metadata"]["generation"] = meta["generation"] + 1
        if updated["metadata"].get("deletionTimestamp") and not updated["metadata"].get(
            "finalizers"
        ):
            store.remove(resource, updated)
            entry.status = 200
            return web.json_response(updated)
        store.put(resource, updated, "MODIFIED")
        entry.status = 200
        return web.json_response(updated)

    app.router.add_get("/api", discovery_core)
    app.router.add_get("/apis", discovery_groups)
    app.router.add_get("/api/{version}", discovery_resources)
    app.router.add_get("/apis/{group}/{version}", discovery_resources)
    for prefix in ("/api/{version}", "/apis/{group}/{version}"):
        app.router.add_route("*", prefix + "/{plural}", collection)
        app.router.add_route("*", prefix + "/namespaces/{namespace}/{plural}", collection)
        app.router.add_route("*", prefix + "/{plural}/{name}", item)
        app.router.add_route("*", prefix + "/{plural}/{name}/{sub}", item)
        app.router.add_route("*", prefix + "/namespaces/{namespace}/{plural}/{name}", item)
        app.router.add_route("*", prefix + "/namespaces/{namespace}/{plural}/{name}/{sub}", item)
    return app


class FakeApiServer:
    """The fake API server on 127.0.0.1 in a background thread (for tests and benches)."""

    def __init__(self, store: Store | None = None):
        self.store = store or Store()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner = web.AppRunner(
            make_app(self.store), handle_signals=False, shutdown_timeout=0.5
        )
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeApiServer:
        self._thread.start()
        self._started.wait(10)
        return self

    def call(self, function, *args):
        """Run ``function(*args)`` on the server's loop (store changes from tests)."""
        future = asyncio.run_coroutine_threadsafe(_call(function, *args), self._loop)
        return future.result(10)

    def stop(self) -> None:
        """Close every connection (open watches included) and stop the thread."""
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def kubeconfig(self, path) -> None:
        """Write a kubeconfig pointing at this server (no auth)."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))  # fmt: skip


async def _call(function, *args):
    return function(*args)
