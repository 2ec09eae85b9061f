"""Secure aggregation: Flower's SecAgg+ workflow (server) and ``secaggplus_mod`` (silos), both
real, run in process with messages handed from one to the other (the only stand-in is the
transport). The server gets the weighted mean of the silos' updates and nothing from which
one silo's update can be read; a silo that drops out mid-protocol is unmasked away."""

from __future__ import annotations

import copy
from collections import OrderedDict
from types import SimpleNamespace

import flwr  # noqa: F401  (make install puts it in; missing, these tests fail, never skip)
import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.supercore.task_identity import TaskIdentity

from recjob_operator.api.v1alpha1.spec_federated import FederatedSpec
from recjob_trainer.federated.secure import (
    SecureAggregationGrid,
    clipping_range,
    fit_instructions,
    fit_reply,
    secure_aggregation_mod,
)
from recjob_trainer.federated.strategy import Ledgered, build_strategy

#: Each silo's update (difference from the global weights) and its examples this round.
UPDATES = {11: 0.010, 12: -0.004, 13: 0.030}
EXAMPLES = {11: 300, 12: 100, 13: 600}


@pytest.fixture(autouse=True)
def identity(monkeypatch):
    """Messages carry the run and node they come from (set by Flower in its processes)."""
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


def silo_app(drop: set[int], clipping_norm: float | None = None) -> ClientApp:
    """A silo whose training adds its UPDATES value to every weight; silos in ``drop``
    fail when asked for their update (after they shared their keys)."""
    app = ClientApp()

    @app.train(mods=[secure_aggregation_mod])
    def train(message: Message, context: Context) -> Message:
        node = message.metadata.dst_node_id
        if node in drop:
            raise RuntimeError(f"silo {node} went away")
        start, config = fit_instructions(message)
        assert int(config["local-steps"]) == 5
        trained = ArrayRecord({n: Array(start[n].numpy() + UPDATES[node]) for n in start})
        metrics = {"num-examples": EXAMPLES[node], "train-loss": float(node)}
        return fit_reply(message, start, trained, metrics, clipping_norm=clipping_norm)

    return app


class LoopbackGrid:
    """Delivers a copy of each message (as if it had crossed the wire: Flower's workflow
    sends one content object to every silo) to the silo app of its node, one Context per
    node as each SuperNode keeps one, and records every reply the server gets."""

    def __init__(self, app: ClientApp, nodes: list[int], node_config: dict | None = None):
        self.app = app
        config = dict(node_config or {})
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config=config, state=RecordDict(), run_config={})
            for n in nodes
        }
        self.seen: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            monkey = TaskIdentity._node_id
            TaskIdentity._node_id = node  # the reply comes from the silo
            try:
                delivered = copy.deepcopy(message)
                replies.append(self.app(delivered, self.contexts[node]))
            except Exception as error:  # a silo that fails answers with an error
                replies.append(Message(Error(1, str(error)), reply_to=message))
            finally:
                TaskIdentity._node_id = monkey
        self.seen.extend(replies)
        return replies


def train_messages(nodes: list[int]) -> list[Message]:
    arrays = ArrayRecord(OrderedDict(w=torch.linspace(-1, 1, 6), b=torch.zeros(2)))
    config = ConfigRecord({"local-steps": 5, "federated-round": 4, "model-info": "{}"})
    return [
        Message(
            RecordDict({"arrays": arrays, "config": config}),
            dst_node_id=n,
            message_type=MessageType.TRAIN,
        )
        for n in nodes
    ]


def test_the_server_gets_the_weighted_mean_of_the_updates_and_no_silos_update() -> None:
    nodes = [11, 12, 13]
    loop = LoopbackGrid(silo_app(drop=set()), nodes)
    grid = SecureAggregationGrid(loop, threshold=2, max_weight=1000)
    messages = train_messages(nodes)
    replies = grid.send_and_receive(messages, timeout=10)

    mean = sum(UPDATES[n] * EXAMPLES[n] for n in nodes) / sum(EXAMPLES.values())
    assert [r.has_error() for r in replies] == [False] * 3
    for reply in replies:
        got = reply.content["arrays"]
        np.testing.assert_allclose(got["w"].numpy(), np.linspace(-1, 1, 6) + mean, atol=1e-6)
        np.testing.assert_allclose(got["b"].numpy(), np.full(2, mean), atol=1e-6)
        node = reply.metadata.src_node_id
        assert reply.content["metrics"]["num-examples"] == EXAMPLES[node]
    # the four stages went out to every silo, and no silo's reply carried weights: the
    # update left each silo only as a masked integer vector
    assert len(loop.seen) == 4 * len(nodes)
    assert all(
        len(record) == 0
        for r in loop.seen
        if r.has_content()
        for record in r.content.array_records.values()
    )
    masked = [r for r in loop.seen
              if Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]]  # fmt: skip
    assert len(masked) == 3
    to, back = grid.last_round_bytes()
    assert to > 0 and back > 0

    # the project's strategies take the secure aggregate unchanged
    led = Ledgered(FedAvg(fraction_evaluate=0.0, min_train_nodes=2), min_silos=2,
                   traffic=grid.last_round_bytes)  # fmt: skip
    led.configure_train(4, messages[0].content["arrays"], ConfigRecord({}), loop)
    arrays, _ = led.aggregate_train(4, replies)
    np.testing.assert_allclose(arrays["b"].numpy(), np.full(2, mean), atol=1e-6)
    record = led.rounds[-1]
    assert (record.replied_silos, record.bytes_to_silos, record.bytes_from_silos) == (3, to, back)
    assert record.mean_loss == pytest.approx(
        sum(n * EXAMPLES[n] for n in nodes) / sum(EXAMPLES.values())
    )


def test_with_differential_privacy_each_silo_clips_its_update_before_masking() -> None:
    """Client-side clipping (the server cannot clip what it cannot see): with no noise the
    server's result is the mean of the silos' updates, each scaled to the clipping norm."""
    nodes = [11, 12, 13]
    norm = 0.02  # updates are constant over 8 weights: norms 0.028, 0.011, 0.085
    loop = LoopbackGrid(silo_app(drop=set(), clipping_norm=norm), nodes)
    grid = SecureAggregationGrid(loop, threshold=2, max_weight=1000)
    fed = FederatedSpec.model_validate(
        {"partition": {"count": 3}, "participation": {"minSilos": 3}, "secureAggregation": True,
         "differentialPrivacy": {"clippingNorm": norm, "noiseMultiplier": 0.0}}
    )  # fmt: skip
    strategy = build_strategy(fed, silos=3)
    assert isinstance(strategy, DifferentialPrivacyClientSideFixedClipping)
    led = Ledgered(strategy, min_silos=3, traffic=grid.last_round_bytes)
    start = train_messages(nodes)[0].content["arrays"]
    config = ConfigRecord({"local-steps": 5, "model-info": "{}"})
    replies = grid.send_and_receive(led.configure_train(1, start, config, grid), timeout=10)
    arrays, _ = led.aggregate_train(1, replies)

    def clipped(u: float) -> float:
        return u * min(1.0, norm / (abs(u) * np.sqrt(8)))

    mean = sum(clipped(UPDATES[n]) * EXAMPLES[n] for n in nodes) / sum(EXAMPLES.values())
    np.testing.assert_allclose(arrays["b"].numpy(), np.full(2, mean), atol=1e-6)
    unclipped = sum(UPDATES[n] * EXAMPLES[n] for n in nodes) / sum(EXAMPLES.values())
    assert abs(mean - unclipped) > 1e-3  # clipping changed the result


def test_a_silo_that_drops_out_is_unmasked_away_while_enough_remain() -> None:
    nodes = [11, 12, 13]
    grid = SecureAggregationGrid(LoopbackGrid(silo_app(drop={13}), nodes), threshold=2,
                                 max_weight=1000)  # fmt: skip
    replies = grid.send_and_receive(train_messages(nodes), timeout=10)
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert by_node[13].has_error() and "did not complete SecAgg+" in by_node[13].error.reason
    mean = (UPDATES[11] * EXAMPLES[11] + UPDATES[12] * EXAMPLES[12]) / (EXAMPLES[11] + EXAMPLES[12])
    np.testing.assert_allclose(by_node[11].content["arrays"]["b"].numpy(), mean, atol=1e-6)


def test_too_few_silos_left_fails_the_round_on_every_silo() -> None:
    nodes = [11, 12, 13]
    grid = SecureAggregationGrid(LoopbackGrid(silo_app(drop={12, 13}), nodes), threshold=2,
                                 max_weight=1000)  # fmt: skip
    replies = grid.send_and_receive(train_messages(nodes), timeout=10)
    assert all(r.has_error() for r in replies)
    led = Ledgered(FedAvg(fraction_evaluate=0.0), min_silos=2, traffic=grid.last_round_bytes)
    led.configure_train(1, train_messages(nodes)[0].content["arrays"], ConfigRecord({}),
                        grid)  # fmt: skip
    with pytest.raises(RuntimeError, match="0 of 3 sampled silo"):
        led.aggregate_train(1, replies)


def test_other_messages_pass_through_and_the_clipping_range_covers_adamw() -> None:
    loop = LoopbackGrid(ClientApp(), [11])
    grid = SecureAggregationGrid(loop, threshold=2, max_weight=10)
    query = Message(RecordDict({}), dst_node_id=11, message_type=MessageType.QUERY)
    (reply,) = grid.send_and_receive([query], timeout=1)
    assert reply.has_error()  # the empty app has no query handler: it got there unchanged
    assert grid.get_node_ids() == [11]
    described = grid.describe()
    assert (described["protocol"], described["reconstruction_threshold"]) == ("secagg+", 2)
    assert clipping_range(50, 5e-4) == 1.0
    assert clipping_range(400, 5e-3) == pytest.approx(4.0)


def fake_silo(monkeypatch, min_silos: int = 2) -> list:
    """The real ClientApp over a silo whose config asks for secure aggregation; the list
    records every training it is asked for."""
    from recjob_trainer.federated import client_app

    trained: list = []
    federated = SimpleNamespace(
        secure_aggregation=True,
        participation=SimpleNamespace(min_silos=min_silos),
        differential_privacy=None,
    )
    silo = SimpleNamespace(
        config=SimpleNamespace(training=SimpleNamespace(federated=federated)),
        train_round=lambda *a, **k: trained.append(a),
    )
    monkeypatch.setitem(client_app._trainers, "silo.yaml", silo)
    return trained


def test_a_silo_told_secure_aggregation_refuses_a_plain_round(monkeypatch) -> None:
    """The silo's own config decides: a server that asks for the update in the clear gets
    an error, and the silo never trains for it."""
    from recjob_trainer.federated import client_app

    trained = fake_silo(monkeypatch)
    context = Context(run_id=1, node_id=11, node_config={"silo-config": "silo.yaml"},
                      state=RecordDict(), run_config={})  # fmt: skip
    message = train_messages([11])[0]
    with pytest.raises(PermissionError, match="only by secure aggregation"):
        client_app.app(message, context)
    assert trained == []


def test_a_silo_refuses_a_setup_weaker_than_its_config(monkeypatch) -> None:
    """A server asking for a reconstruction threshold of 2 where the silos' minSilos is 3:
    every silo refuses before it shares a key, and nothing trains."""
    from recjob_trainer.federated import client_app

    trained = fake_silo(monkeypatch, min_silos=3)
    nodes = [11, 12, 13]
    loop = LoopbackGrid(client_app.app, nodes, {"silo-config": "silo.yaml"})
    grid = SecureAggregationGrid(loop, threshold=2, max_weight=1000)
    replies = grid.send_and_receive(train_messages(nodes), timeout=10)
    assert all(r.has_error() for r in replies) and trained == []
    assert len(loop.seen) == 3  # the setup stage only
    assert all("setup refused: reconstruction threshold 2" in r.error.reason for r in loop.seen)
