"""What the reconcile core reads and asks for: observations, actions, decisions.

Backends turn the world into :class:`Observed` and carry out the actions of a
:class:`Decision`; every action is idempotent (children are created by deterministic
name, "already exists" counts as done).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..api.v1alpha1.status import RecJobStatus

#: How often a backend that does not watch the children looks again at a running one.
POLL_SECONDS = 5.0


# --------------------------------------------------------------------------- observations
@dataclass(frozen=True)
class ChildObservation:
    """A training or conversion child as the backend sees it."""

    name: str
    state: Literal["Created", "Running", "Restarting", "Succeeded", "Failed"]
    message: str | None = None
    restarts: int = 0
    progress: dict | None = None
    """Training: step, total_steps, loss, samples_per_second, resumed_from_step."""
    result: dict | None = None
    """Training: metrics.json (+ ``card``: model-card.json); conversion: quality-gate.json."""


@dataclass(frozen=True)
class ServingObservation:
    """The service the RecJob rolls out to."""

    stable_version: int | None = None
    canary_version: int | None = None
    canary_weight: int = 0
    ready: bool = False
    stable_revision: str | None = None
    canary_revision: str | None = None
    canary_ready: bool = True
    """The version being rolled out (canary, or first model) has ready pods (Serverless:
    its revision is KServe's latest ready one; Raw: its InferenceService is Ready)."""
    failure: str | None = None
    """Why the version being rolled out cannot become ready, as KServe reports it
    (PredictorReady=False, ``modelStatus.lastFailureInfo``)."""
    waiting_for: str | None = None
    """Why this RecJob may not roll out to the service now: another RecJob holds it, or
    older ones wait first (one rollout per service, oldest first)."""


@dataclass(frozen=True)
class Observed:
    """Everything the backend observed for the RecJob's current generation."""

    training: ChildObservation | None = None
    conversion: ChildObservation | None = None
    serving: ServingObservation | None = None
    approved_generation: int | None = None
    """The generation named by the recjob.dev/approve-generation annotation."""


# --------------------------------------------------------------------------- actions
@dataclass(frozen=True)
class CreateTraining:
    """Create the training child (PyTorchJob / local processes) if it does not exist."""

    name: str


@dataclass(frozen=True)
class CreateConversion:
    """Create the conversion child (Job / local process) if it does not exist."""

    name: str


@dataclass(frozen=True)
class DeployStable:
    """Serve ``model_version`` to all traffic (the service's first model)."""

    model_version: int


@dataclass(frozen=True)
class SetCanary:
    """Serve ``model_version`` as the canary with ``weight`` percent of traffic."""

    model_version: int
    weight: int


@dataclass(frozen=True)
class Promote:
    """Make the canary ``model_version`` the stable model (all traffic)."""

    model_version: int


@dataclass(frozen=True)
class RollBack:
    """Send all traffic back to ``stable_version`` and remove the canary."""

    canary_version: int
    stable_version: int | None
    reason: str


@dataclass(frozen=True)
class ReleaseService:
    """This RecJob's rollout to its service is over: let the next RecJob have it."""


@dataclass(frozen=True)
class CleanupGeneration:
    """Stop and remove superseded children of model generation ``generation``: its
    training child (when ``training``) and its conversion child of revision
    ``conversion`` (None: none). Names: ``identity.training_child_name`` /
    ``identity.conversion_child_name``."""

    generation: int
    training: bool = True
    conversion: int | None = 1


@dataclass(frozen=True)
class StopFederation:
    """The federated training child ``name`` has ended: stop the federation it ran on (its
    SuperLink and SuperNodes). The child itself stays, with its result and logs. Backends
    whose federation ends with its run do nothing."""

    name: str


@dataclass(frozen=True)
class EmitEvent:
    """A Kubernetes event on the RecJob."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


Action = (
    CreateTraining
    | CreateConversion
    | DeployStable
    | SetCanary
    | Promote
    | RollBack
    | ReleaseService
    | CleanupGeneration
    | StopFederation
    | EmitEvent
)


@dataclass
class Decision:
    """What to do and the status to write."""

    status: RecJobStatus
    actions: list = field(default_factory=list)
    requeue_after: float | None = None
    """Seconds until the core wants to look again, whatever else happens (None: no
    deadline; only on change)."""
    wait_for_children: bool = False
    """The core waits for a child to change (a job to finish, a service to be ready): a
    backend that watches the children looks again when one of them changes, one that
    does not after :data:`POLL_SECONDS`."""
