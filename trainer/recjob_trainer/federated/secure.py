"""Secure aggregation (``training.federated.secureAggregation``): Flower's SecAgg+ protocol
between the ServerApp and the silos, so the server learns only the weighted mean of the
silos' updates, never one silo's.

Flower runs SecAgg+ as a workflow of four message exchanges (setup, share keys, collect
masked vectors, unmask) written for its legacy strategies. :class:`SecureAggregationGrid`
runs that workflow, unchanged, in place of a training round's plain send-and-receive, so
the project's own strategies (FedAvg, FedProx, FedAdam, FedAvgM, wrapped by
:class:`.strategy.Ledgered`) stay as they are: each silo that completed the protocol is
answered with the securely aggregated weights and its own metrics (loss, examples: numbers,
never weights), so any weighted mean the strategy takes is the secure aggregate.

Silos send their update as a difference from the global weights (``global-names`` in the
round's config gives the tensors' order), which SecAgg+ clips to ``clipping_range`` and
quantizes; the server adds the mean difference back. Silo side: :func:`secure_aggregation_mod`
hands SecAgg+ messages to Flower's ``secaggplus_mod`` and everything else to the app."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import FitIns, FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.serde import recorddict_to_proto
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from recjob_operator.api.v1alpha1.spec_training import TrainingSpec

#: Config key of a secure round: the exchanged tensors' names, in the order of the vectors.
GLOBAL_NAMES = "global-names"
#: A silo update's values (differences from the global weights) are clipped to +- this at
#: least (see :func:`clipping_range`).
CLIPPING_RANGE = 1.0
#: Integers each clipped value is quantized to (2**24: steps of 1.2e-7 over [-1, 1]).
QUANTIZATION_RANGE = 2**24
#: Masks are drawn modulo 2**32; 64 silos x 2**24 stays below it.
MODULUS_RANGE = 2**32
#: Error code of a silo that did not complete the protocol in time.
DROPPED = 1


def clipping_range(local_steps: int, learning_rate: float) -> float:
    """The clipping range of a silo's update: an AdamW step moves a weight by about the
    learning rate at most, so a round's ``local_steps`` move it by less than twice their
    sum (and never less than :data:`CLIPPING_RANGE`)."""
    return max(CLIPPING_RANGE, 2.0 * local_steps * learning_rate)


def wire_bytes(content: RecordDict) -> int:
    """Bytes a message's content takes serialized as Flower sends it."""
    return recorddict_to_proto(content).ByteSize()


@dataclass
class Traffic:
    """Bytes the last secure round moved, every stage of the protocol counted."""

    to_silos: int = 0
    from_silos: int = 0


class _CountingGrid:
    """The grid the workflow talks through: counts every message's bytes each way."""

    def __init__(self, grid: Grid, traffic: Traffic):
        self.grid, self.traffic = grid, traffic

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        messages = list(messages)
        self.traffic.to_silos += sum(wire_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.traffic.from_silos += sum(wire_bytes(r.content) for r in replies if r.has_content())
        return replies


@dataclass
class _OneRound:
    """The legacy-strategy face the SecAgg+ workflow calls: it hands out the round's fit
    instructions and keeps what the workflow aggregated (every result then carries the
    unmasked weighted mean as its parameters)."""

    instructions: dict[int, FitIns]
    results: list[tuple[object, FitRes]] = field(default_factory=list)

    def configure_fit(self, server_round, parameters, client_manager) -> list:
        return [(SimpleNamespace(node_id=n), ins) for n, ins in self.instructions.items()]

    def aggregate_fit(self, server_round, results, failures) -> tuple:
        self.results = list(results)
        return (self.results[0][1].parameters if self.results else None), {}


class SecureAggregationGrid:
    """A Grid whose training rounds run SecAgg+; every other message passes through.

    ``threshold`` is the number of shares that rebuild a silo's secret (SecAgg+'s
    reconstruction threshold): the round survives silos dropping out while that many
    remain, and fewer than that many colluding silos learn nothing from the server's view.
    ``max_weight`` bounds a silo's example count per round (its update's weight)."""

    @classmethod
    def for_training(cls, grid: Grid, training: TrainingSpec) -> SecureAggregationGrid:
        """The grid for ``training.federated``: threshold minSilos, a silo's examples per
        round at most as the weight bound, the clipping range of its AdamW steps."""
        fed = training.federated
        return cls(
            grid,
            threshold=fed.participation.min_silos,
            max_weight=fed.local_steps * training.micro_batch_size
            * training.gradient_accumulation_steps,
            clipping=clipping_range(fed.local_steps, training.learning_rate),
        )  # fmt: skip

    def __init__(
        self, grid: Grid, *, threshold: int, max_weight: int, clipping: float = CLIPPING_RANGE
    ):
        self.grid = grid
        self.threshold = max(2, threshold)
        self.max_weight = max_weight
        self.clipping = clipping
        self.traffic = Traffic()

    def describe(self) -> dict:
        """The protocol's settings, for the model card and metrics."""
        return {
            "protocol": "secagg+",
            "reconstruction_threshold": self.threshold,
            "clipping_range": self.clipping,
            "quantization_range": QUANTIZATION_RANGE,
            "modulus_range": MODULUS_RANGE,
            "max_weight": self.max_weight,
        }

    def last_round_bytes(self) -> tuple[int, int]:
        """Bytes the last training round moved to and from the silos, every stage counted."""
        return self.traffic.to_silos, self.traffic.from_silos

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return list(self.grid.send_and_receive(messages, timeout=timeout))
        return self._secure_round(messages, timeout)

    def _secure_round(self, messages: list[Message], timeout: float | None) -> list[Message]:
        self.traffic = Traffic()
        first = messages[0].content
        names = list(first["arrays"].keys())
        start = [first["arrays"][n].numpy() for n in names]
        config = dict(first["config"])
        config[GLOBAL_NAMES] = json.dumps(names)
        parameters = ndarrays_to_parameters(start)
        by_node = {m.metadata.dst_node_id: m for m in messages}
        strategy = _OneRound({n: FitIns(parameters, dict(config)) for n in by_node})
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            strategy=strategy,  # type: ignore[arg-type]
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: int(config.get("federated-round", 1))}
        )
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        workflow = SecAggPlusWorkflow(
            num_shares=1.0,  # every sampled silo holds a share of every other's secret
            reconstruction_threshold=min(self.threshold, len(messages)),
            max_weight=float(self.max_weight),
            clipping_range=self.clipping,
            quantization_range=QUANTIZATION_RANGE,
            modulus_range=MODULUS_RANGE,
            timeout=timeout,
        )
        workflow(_CountingGrid(self.grid, self.traffic), context)  # type: ignore[arg-type]
        replied = {proxy.node_id: res for proxy, res in strategy.results}
        if replied:  # the same aggregate answers every silo that completed the protocol
            mean = parameters_to_ndarrays(strategy.results[0][1].parameters)
            arrays = ArrayRecord(
                {
                    n: Array(np.asarray(base + delta, dtype=base.dtype))
                    for n, base, delta in zip(names, start, mean, strict=True)
                }
            )
        replies = []
        for node, message in by_node.items():
            if node not in replied:
                reason = (
                    f"secure aggregation: silo node {node} did not complete SecAgg+ within "
                    f"the round deadline, or too few silos did (reconstruction threshold "
                    f"{self.threshold})"
                )
                replies.append(Message(Error(DROPPED, reason), reply_to=message))
                continue
            metrics = MetricRecord(dict(replied[node].metrics))
            replies.append(
                Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)
            )
        return replies


def is_secure_round(message: Message) -> bool:
    """Whether a train message is part of SecAgg+ (or a plain round)."""
    return RECORD_KEY_CONFIGS in message.content.config_records


def check_setup(message: Message, min_silos: int) -> None:
    """Silo side, before it shares any key: refuse a SecAgg+ setup weaker than the silo's
    own config asks for (a reconstruction threshold below its participation.minSilos, or
    a round of one silo, whose "sum" would be its own update)."""
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    configs = message.content.config_records[RECORD_KEY_CONFIGS]
    if configs.get(Key.STAGE) != Stage.SETUP:
        return
    threshold, silos = int(configs[Key.THRESHOLD]), int(configs[Key.SAMPLE_NUMBER])
    needed = max(2, min_silos)
    if threshold < needed or silos < 2:
        raise PermissionError(
            f"secure aggregation setup refused: reconstruction threshold {threshold} with "
            f"{silos} silo(s) in the round; this silo's config asks for at least {needed} "
            "(participation.minSilos, and never fewer than 2)"
        )


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Silo side: SecAgg+ messages through Flower's ``secaggplus_mod``, others unchanged."""
    from flwr.client.mod import secaggplus_mod

    if msg.metadata.message_type == MessageType.TRAIN and is_secure_round(msg):
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def fit_instructions(message: Message) -> tuple[ArrayRecord, ConfigRecord]:
    """The global weights (named) and the round's config of a SecAgg+ fit message."""
    from flwr.compat.common.recorddict_compat import recorddict_to_fitins

    ins = recorddict_to_fitins(message.content, keep_input=True)
    names = json.loads(str(ins.config[GLOBAL_NAMES]))
    values = parameters_to_ndarrays(ins.parameters)
    arrays = ArrayRecord({n: Array(v) for n, v in zip(names, values, strict=True)})
    return arrays, ConfigRecord(dict(ins.config))


def fit_reply(
    message: Message,
    start: ArrayRecord,
    trained: ArrayRecord,
    metrics: dict,
    clipping_norm: float | None = None,
) -> Message:
    """A silo's SecAgg+ fit reply: its update as differences from the global weights (which
    ``secaggplus_mod`` masks before anything leaves the silo) and its metrics. With
    ``clipping_norm`` (central differential privacy) the update is first scaled to that L2
    norm at most, as Flower's ``fixedclipping_mod`` does: the server, which sees only the
    sum, adds the noise."""
    from flwr.common import Code, Status
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict
    from flwr.supercore.differential_privacy import clip_inputs_inplace

    delta = [
        (trained[n].numpy().astype(np.float32) - start[n].numpy().astype(np.float32)) for n in start
    ]
    if clipping_norm is not None:
        clip_inputs_inplace(delta, clipping_norm)
    res = FitRes(
        Status(Code.OK, "ok"),
        ndarrays_to_parameters(delta),
        int(metrics["num-examples"]),
        dict(metrics),
    )
    return Message(fitres_to_recorddict(res, keep_input=False), reply_to=message)
