"""The server's strategy wrapper on Flower's own FedAvg, with Flower messages built in
process: what a round counts, how it aggregates, and a round that loses a silo."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

pytest.importorskip("flwr", reason="flwr is not installed (see the federated extra)")
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from recjob_trainer.federated.strategy import Ledgered
from recjob_trainer.federated.weights import record_bytes


class Grid:
    """Two connected silos (node ids 11 and 12)."""

    def get_node_ids(self) -> list[int]:
        return [11, 12]


@pytest.fixture(autouse=True)
def identity(monkeypatch):
    """Messages carry the run and node they come from (set by Flower in its processes)."""
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


def reply(message: Message, value: float, examples: int) -> Message:
    arrays = ArrayRecord(OrderedDict(w=torch.full((4,), value)))
    metrics = MetricRecord({"num-examples": examples, "train-loss": value})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)


def strategy(offset: int = 0) -> Ledgered:
    inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
    return Ledgered(inner, round_offset=offset, min_silos=2)


def test_a_round_is_counted_and_averaged_by_examples() -> None:
    led = strategy(offset=3)
    arrays = ArrayRecord(OrderedDict(w=torch.ones(4)))
    messages = list(led.configure_train(1, arrays, ConfigRecord({}), Grid()))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12]
    assert {int(m.content["config"]["federated-round"]) for m in messages} == {4}
    aggregated, _ = led.aggregate_train(1, [reply(messages[0], 1.0, 1), reply(messages[1], 3.0, 3)])
    assert torch.allclose(aggregated.to_torch_state_dict()["w"], torch.full((4,), 2.5))
    (record,) = led.rounds
    assert (record.round, record.sampled_silos, record.replied_silos) == (4, 2, 2)
    assert record.bytes_to_silos == record.bytes_from_silos == 2 * record_bytes(arrays)
    assert record.examples == 4 and record.mean_loss == pytest.approx((1 * 1 + 3 * 3) / 4)


def test_a_round_below_min_silos_fails_with_the_reason() -> None:
    led = strategy()
    arrays = ArrayRecord(OrderedDict(w=torch.ones(4)))
    first, second = led.configure_train(1, arrays, ConfigRecord({}), Grid())
    lost = Message(Error(code=0, reason="silo went away"), reply_to=second)
    with pytest.raises(
        RuntimeError, match=r"round 1: 1 of 2 sampled silo.*minSilos is 2"
    ) as raised:
        led.aggregate_train(1, [reply(first, 1.0, 1), lost])
    assert "silo went away" in str(raised.value)
    assert led.rounds[0].failed_silos == 1
