"""The server's Flower strategy for ``training.federated.strategy``, wrapped so that every
round's traffic is counted and every completed round is checkpointed.

:class:`Ledgered` delegates the aggregation to Flower's FedAvg / FedProx / FedAdam / FedAvgM (and
Flower's fixed-clipping differential privacy when asked: server-side clipping, or
client-side with secure aggregation); it only looks at the
messages going out and the replies coming back. With differential privacy and a server
optimizer (FedAdam, FedAvgM), :class:`OptimizerAfterPrivacy` puts the optimizer outside
Flower's DP wrapper, so that it only ever sees the private release."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    Strategy,
)
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase
from flwr.serverapp.strategy.fedopt import FedOpt

from recjob_operator.api.v1alpha1.spec_federated import FederatedSpec

from .weights import record_bytes

#: FedAdam's server step size when serverLearningRate is unset.
FEDADAM_DEFAULT_ETA = 0.01


@dataclass
class RoundRecord:
    """What one round moved and who took part (no data, only sizes and counts)."""

    round: int
    sampled_silos: int = 0
    replied_silos: int = 0
    failed_silos: int = 0
    bytes_to_silos: int = 0
    bytes_from_silos: int = 0
    examples: int = 0
    mean_loss: float | None = None
    seconds: float = 0.0
    started: float = field(default=0.0, repr=False)

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("started")
        out["bytes_total"] = self.bytes_to_silos + self.bytes_from_silos
        return out


class Ledgered(Strategy):
    """A strategy that records each round's :class:`RoundRecord` and delegates the rest.

    ``round_offset`` is the number of rounds completed before this ServerApp started (a
    resumed federation numbers its rounds on from there). ``traffic``, with secure
    aggregation, is what the SecAgg+ grid counted on the wire (all four of its stages),
    which replaces the count of the plain messages."""

    def __init__(
        self,
        inner: Strategy,
        round_offset: int = 0,
        min_silos: int = 1,
        traffic: Callable[[], tuple[int, int]] | None = None,
    ):
        self.inner = inner
        self.round_offset = round_offset
        self.min_silos = min_silos
        self.traffic = traffic
        self.rounds: list[RoundRecord] = []

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        record = RoundRecord(round=server_round + self.round_offset, started=time.time())
        config["federated-round"] = record.round
        # the inner strategy sees the federation's round number: a resumed FedAdam's bias
        # correction goes on from there instead of restarting at round 1
        messages = list(self.inner.configure_train(record.round, arrays, config, grid))
        record.sampled_silos = len(messages)
        record.bytes_to_silos = sum(record_bytes(m.content["arrays"]) for m in messages)
        self.rounds.append(record)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        record = self.rounds[-1]
        good = [r for r in replies if not r.has_error()]
        record.replied_silos, record.failed_silos = len(good), len(replies) - len(good)
        if len(good) < self.min_silos:
            errors = "; ".join(str(r.error.reason) for r in replies if r.has_error())
            raise RuntimeError(
                f"round {record.round}: {len(good)} of {record.sampled_silos} sampled silo(s) "
                f"replied within the round deadline, participation.minSilos is "
                f"{self.min_silos}" + (f" (errors: {errors})" if errors else "")
            )
        if self.traffic is not None:  # what the secure protocol moved, all stages
            record.bytes_to_silos, record.bytes_from_silos = self.traffic()
        else:
            record.bytes_from_silos = sum(
                record_bytes(r.content[key]) for r in good for key in r.content.array_records
            )
        losses, examples = [], 0
        for reply in good:
            metrics = reply.content["metrics"]
            examples += int(metrics["num-examples"])
            losses.append((float(metrics["train-loss"]), int(metrics["num-examples"])))
        record.examples = examples
        if examples:
            record.mean_loss = sum(loss * n for loss, n in losses) / examples
        arrays, metrics = self.inner.aggregate_train(record.round, good)
        record.seconds = time.time() - record.started
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


class OptimizerAfterPrivacy(Strategy):
    """Central differential privacy, then a server optimizer's step on the private release.

    Flower's DP wrapper adds its noise to what the strategy inside it returns, so FedAdam's
    moments or FedAvgM's momentum inside it would be built from the silos' clipped but
    noiseless mean and carry it into later releases past the noise. Here the wrapper goes
    around plain FedAvg (clip each silo's update, average, add noise) and the optimizer
    takes its step from that noised mean alone, handed to it as the one reply of its
    round: post-processing of a private release, so the accountant's (epsilon, delta)
    still holds. ``strategy`` is the optimizer (as in Flower's wrappers, where
    :func:`optimizer_state` finds it)."""

    def __init__(self, private: DifferentialPrivacyFixedClippingBase, optimizer: Strategy):
        if not isinstance(optimizer, FedOpt | FedAvgM):
            raise TypeError(f"{type(optimizer).__name__} is not a server optimizer")
        self.private = private
        self.strategy = optimizer
        self._sent: list[Message] = []

    def summary(self) -> None:
        self.private.summary()
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # what the optimizer's own configure_train keeps (without sampling silos again)
        if isinstance(self.strategy, FedAvgM):
            if self.strategy.current_arrays is None:
                self.strategy.current_arrays = arrays
        else:
            self.strategy.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        self._sent = list(self.private.configure_train(server_round, arrays, config, grid))
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        released, metrics = self.private.aggregate_train(server_round, replies)
        if released is None or not self._sent:
            return released, metrics
        release = Message(
            RecordDict({"arrays": released, "metrics": MetricRecord({"num-examples": 1})}),
            reply_to=self._sent[0],
        )
        stepped, _ = self.strategy.aggregate_train(server_round, [release])
        return stepped, metrics

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return self.private.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return self.private.aggregate_evaluate(server_round, replies)


def build_strategy(fed: FederatedSpec, silos: int) -> Strategy:
    """Flower's strategy for the spec: sampling by participation, no client-side
    evaluation rounds (the server evaluates nothing: it has no data), DP if asked: the
    server clips each silo's update, or with secure aggregation (where the server never
    sees one) each silo clips its own before masking it and the server adds the noise."""
    part = fed.participation
    common = dict(
        fraction_train=part.fraction,
        fraction_evaluate=0.0,
        min_train_nodes=part.min_silos,
        min_evaluate_nodes=part.min_silos,
        min_available_nodes=part.min_silos,
    )
    kind = fed.strategy.type
    if kind == "FedAvg":
        strategy: Strategy = FedAvg(**common)
    elif kind == "FedProx":
        strategy = FedProx(**common, proximal_mu=fed.strategy.mu or 0.0)
    elif kind == "FedAdam":
        strategy = FedAdam(**common, eta=fed.strategy.server_learning_rate or FEDADAM_DEFAULT_ETA)
    elif kind == "FedAvgM":
        strategy = FedAvgM(
            **common,
            server_learning_rate=fed.strategy.server_learning_rate or 1.0,
            server_momentum=fed.strategy.server_momentum or 0.0,
        )
    else:
        raise ValueError(f"unknown strategy {kind!r}")
    dp = fed.differential_privacy
    if dp is None:
        return strategy
    sampled = max(part.min_silos, int(silos * part.fraction))
    optimizer = isinstance(strategy, FedOpt | FedAvgM)
    clipping = (
        DifferentialPrivacyClientSideFixedClipping
        if fed.secure_aggregation
        else DifferentialPrivacyServerSideFixedClipping
    )
    private = clipping(
        FedAvg(**common) if optimizer else strategy,
        noise_multiplier=dp.noise_multiplier,
        clipping_norm=dp.clipping_norm,
        num_sampled_clients=sampled,
    )
    return OptimizerAfterPrivacy(private, strategy) if optimizer else private


def checkpointing(save: Callable[[int, ArrayRecord], None], offset: int):
    """An ``evaluate_fn`` for ``Strategy.start`` that checkpoints each completed round's
    global weights (Flower calls it after every round, and with round 0 before the first)."""

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            save(server_round + offset, arrays)
        return None

    return evaluate


#: The server optimizer's moment estimates FedAdam keeps between rounds (Flower's FedOpt).
MOMENTS = ("m_t", "v_t")
#: Prefix of FedAvgM's momentum vector (a list in the global arrays' order) in a checkpoint.
MOMENTUM = "momentum"


def _server_optimizer(strategy: Strategy) -> FedOpt | FedAvgM | None:
    """The FedOpt (FedAdam) or FedAvgM inside the wrappers (Ledgered, DP), if any."""
    while not isinstance(strategy, FedOpt | FedAvgM):
        inner = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
        if inner is None:
            return None
        strategy = inner
    return strategy


def optimizer_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The server optimizer's state as named arrays, checkpointed with each round's global
    weights: FedAdam's moment estimates (``m_t/<tensor>``, ``v_t/<tensor>``), FedAvgM's
    momentum vector (``momentum/<index>/<tensor>``); empty for other strategies."""
    opt = _server_optimizer(strategy)
    if opt is None:
        return {}
    if isinstance(opt, FedAvgM):
        if opt.momentum_vector is None or opt.current_arrays is None:
            return {}
        names = list(opt.current_arrays.keys())
        return {
            f"{MOMENTUM}/{i:05d}/{name}": np.ascontiguousarray(value)
            for i, (name, value) in enumerate(zip(names, opt.momentum_vector, strict=True))
        }
    return {
        f"{moment}/{name}": np.ascontiguousarray(value)
        for moment in MOMENTS
        for name, value in (getattr(opt, moment) or {}).items()
    }


def restore_optimizer_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    """Put a checkpointed server optimizer state back into the strategy (a resumed
    federation then takes the step the uninterrupted one would have)."""
    opt = _server_optimizer(strategy)
    if opt is None or not state:
        return
    if isinstance(opt, FedAvgM):
        prefix = f"{MOMENTUM}/"
        momentum = sorted((k, v) for k, v in state.items() if k.startswith(prefix))
        opt.momentum_vector = [v for _, v in momentum] or None
        return
    for moment in MOMENTS:
        prefix = f"{moment}/"
        values = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        setattr(opt, moment, values or None)
