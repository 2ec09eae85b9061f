"""The RecJob spec's ``training.federated`` section: fine-tuning across data silos whose
raw logs never leave them (Flower's deployment engine: a SuperLink, one SuperNode per silo,
a ServerApp that aggregates model updates only). Field docstrings become the CRD's
descriptions; cross-field rules are in :mod:`.cel` (mirrored in ``..semantics``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from . import cel_federated
from .common import StorageUri
from .spec_base import MAX_STEP_COUNT, MAX_TEXT_LENGTH, SpecModel, with_rules
from .spec_data import DataSpec

#: Most silos a federation lists (bounds the cost of the CEL rules that read the list).
MAX_SILOS = 64
#: A silo's name: a DNS label (it names the silo's SuperNode and its objects).
SILO_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


class SiloData(SpecModel):
    """One silo's own data: the URIs replace spec.data's for this silo (columns, format and
    preprocessing stay spec.data's). Only the silo's SuperNode reads them."""

    train: StorageUri
    validation: StorageUri | None = None
    test: StorageUri | None = None
    catalog: StorageUri | None = None

    def uris(self) -> dict[str, str]:
        """The silo's files, by spec.data field (those set)."""
        return self.model_dump(exclude_none=True)


#: spec.data's file fields: a silo's data section sets each to the silo's own or to none.
DATA_URI_FIELDS = ("train", "validation", "test", "catalog", "item_index", "candidates")


def silo_data_section(data: DataSpec, uris: dict[str, str]) -> DataSpec:
    """spec.data for one silo: its format, columns and preprocessing, with ``uris`` (the
    silo's own files, by field) as its only files. Every other file field is unset, so a
    silo never reads the owner's files (a silo without validation has none, not the
    owner's)."""
    return data.model_copy(update={**dict.fromkeys(DATA_URI_FIELDS), **uris})


class SiloSpec(SpecModel):
    """A data owner: a merchant, a region or a business unit."""

    name: str = Field(min_length=1, max_length=63, pattern=SILO_NAME_PATTERN)
    """Unique in the federation; names the silo's SuperNode."""
    data: SiloData
    namespace: str | None = Field(
        default=None, min_length=1, max_length=63, pattern=SILO_NAME_PATTERN
    )
    """Kubernetes: the namespace the silo's SuperNode runs in, and its data's claims are
    in (default: the RecJob's). Another namespace must grant it: a Gateway API
    ReferenceGrant there from RecJobs (group recjob.dev) of the RecJob's namespace to
    each of the silo's PersistentVolumeClaims; until then nothing is created and the
    ChildrenCreated condition names the missing grant. Ignored by local mode."""


class PartitionSpec(SpecModel):
    """For experiments: spec.data split into silos (each silo's SuperNode still reads only
    its own part)."""

    model_config = with_rules(cel_federated.PARTITION_RULES)

    by: Literal["hash", "column"] = "hash"
    """hash: rows go to silos by a hash of the user id (recommendation) or query (search),
    about equal in size (IID); column: every distinct value of column goes to one silo,
    by its hash (non-IID, e.g. a category or a region)."""
    column: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """Required when by is column."""
    count: int = Field(default=2, ge=2, le=MAX_SILOS)
    """Number of silos."""


class ParticipationSpec(SpecModel):
    """Which silos take part in a round, and how long a round may wait for them."""

    fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    """Fraction of the connected silos sampled for each round."""
    min_silos: int = Field(default=2, ge=1, le=MAX_SILOS)
    """A round needs at least this many silos (connected to start it, replying to
    complete it)."""
    round_deadline_seconds: int = Field(default=1800, ge=10, le=7 * 24 * 3600)
    """How long a round waits for the silos' updates."""


class StrategySpec(SpecModel):
    """How the server combines the silos' updates."""

    model_config = with_rules(cel_federated.STRATEGY_RULES)

    type: Literal["FedAvg", "FedProx", "FedAdam", "FedAvgM"] = "FedAvg"
    """FedAvg: average weighted by training examples; FedProx: FedAvg with a proximal term
    (mu) in each silo's loss, for heterogeneous silos; FedAdam: an Adam step on the server
    with the averaged update as its gradient; FedAvgM: FedAvg with a server learning rate
    and server momentum (an SGD step on the server with the averaged update as its
    gradient)."""
    mu: float | None = Field(default=None, ge=0.0, le=1000.0)
    """FedProx: weight of the proximal term ||w - w_global||^2 / 2 (required by FedProx)."""
    server_learning_rate: float | None = Field(default=None, gt=0.0, le=10.0)
    """FedAdam and FedAvgM: the server optimizer's step size (default 0.01 for FedAdam, 1.0
    for FedAvgM, where 1.0 without momentum is FedAvg and the number of silos applies the
    sum of their updates)."""
    server_momentum: float | None = Field(default=None, ge=0.0, lt=1.0)
    """FedAvgM: the server optimizer's momentum (default 0)."""


class DifferentialPrivacySpec(SpecModel):
    """Central differential privacy on the server: each silo's update is clipped to
    clippingNorm (by the server; with secureAggregation, by the silo) and Gaussian noise of
    stdev noiseMultiplier x clippingNorm / silos is added to the average; the (epsilon,
    delta) spent is reported."""

    clipping_norm: float = Field(gt=0.0, le=1e6)
    """L2 norm every silo's update is clipped to."""
    noise_multiplier: float = Field(ge=0.0, le=1000.0)
    """Noise stdev relative to clippingNorm (0: clipping only, no privacy guarantee)."""
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    """The delta the reported epsilon is for."""


class FederatedSpec(SpecModel):
    """Federated fine-tuning with Flower: silos train on their own data and send only model
    updates; the server aggregates them each round. The result is a model/ like any other
    run's, converted, gated and rolled out unchanged. With silos, spec.data's own URIs are
    the model owner's held-out reference data: never sent to a silo nor trained on, they
    feed the conversion's quality gate (and local mode's replay traffic); with partition,
    spec.data is the data split. recjob run starts a SuperLink and SuperNodes on loopback;
    the operator starts a SuperLink Deployment and Service and one SuperNode Deployment
    per silo (silos only: each silo's data on claims of its own, which only its SuperNode
    mounts; partition is local mode's)."""

    model_config = with_rules(cel_federated.FEDERATED_RULES)

    silos: list[SiloSpec] | None = Field(default=None, min_length=2, max_length=MAX_SILOS)
    """The data owners, each with its own data URIs (or set partition)."""
    partition: PartitionSpec | None = None
    """Silos made by splitting spec.data (experiments; or set silos)."""
    rounds: int = Field(default=10, ge=1, le=100_000)
    """Federated rounds; the global model is checkpointed after each completed one."""
    local_steps: int = Field(default=50, ge=1, le=MAX_STEP_COUNT)
    """Optimizer steps each silo takes per round."""
    participation: ParticipationSpec = Field(default_factory=ParticipationSpec)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    exchange: Literal["lora", "full"] = "lora"
    """What crosses the wire: lora, the LoRA adapters and the scoring head (needs
    model.fineTuning.method lora); full, every trained weight."""
    secure_aggregation: bool = False
    """Flower's SecAgg+: each silo masks its update (its difference from the global weights)
    with masks that cancel only in the sum of the round's silos, so the server learns the
    weighted mean of the updates, never one silo's; a silo that drops out mid-round is
    unmasked away while participation.minSilos remain. A silo told so refuses a plain
    round. With differentialPrivacy each silo clips its own update before masking it
    (the server cannot clip what it cannot see) and the server adds the noise."""
    differential_privacy: DifferentialPrivacySpec | None = None
