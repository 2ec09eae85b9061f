"""The server's strategies: Flower's own FedAvg / FedProx / FedAdam / FedAvgM / fixed-clipping DP as
the spec picks them, under the byte-counting wrapper, with Flower messages built in process:
what a round counts, how it aggregates, clipping, and a round that loses a silo."""

from __future__ import annotations

from collections import OrderedDict

import flwr  # noqa: F401  (make install puts it in; missing, these tests fail, never skip)
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
)
from flwr.supercore.task_identity import TaskIdentity

from recjob_operator.api.v1alpha1.spec_federated import FederatedSpec
from recjob_trainer.federated.strategy import (
    Ledgered,
    OptimizerAfterPrivacy,
    build_strategy,
    optimizer_state,
    restore_optimizer_state,
)
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


def spec(**strategy_and_dp) -> FederatedSpec:
    return FederatedSpec.model_validate({"partition": {"count": 2}, **strategy_and_dp})


def test_the_spec_picks_flowers_strategy() -> None:
    assert type(build_strategy(spec(), 2)) is FedAvg
    prox = build_strategy(spec(strategy={"type": "FedProx", "mu": 0.1}), 2)
    assert type(prox) is FedProx and prox.proximal_mu == 0.1
    adam = build_strategy(spec(strategy={"type": "FedAdam", "serverLearningRate": 0.3}), 2)
    assert type(adam) is FedAdam and adam.eta == 0.3
    avgm = build_strategy(
        spec(strategy={"type": "FedAvgM", "serverLearningRate": 4, "serverMomentum": 0.5}), 2
    )
    assert type(avgm) is FedAvgM
    assert (avgm.server_learning_rate, avgm.server_momentum) == (4, 0.5)
    assert build_strategy(spec(strategy={"type": "FedAvgM"}), 2).server_learning_rate == 1.0
    dp = build_strategy(spec(differentialPrivacy={"clippingNorm": 0.5, "noiseMultiplier": 0}), 2)
    assert isinstance(dp, DifferentialPrivacyServerSideFixedClipping)
    assert (dp.clipping_norm, dp.noise_multiplier) == (0.5, 0)


def test_fedprox_sends_mu_to_the_silos() -> None:
    led = Ledgered(build_strategy(spec(strategy={"type": "FedProx", "mu": 0.25}), 2), 0, 2)
    arrays = ArrayRecord(OrderedDict(w=torch.ones(4)))
    messages = list(led.configure_train(1, arrays, ConfigRecord({}), Grid()))
    assert {float(m.content["config"]["proximal-mu"]) for m in messages} == {0.25}


def test_differential_privacy_clips_each_silos_update() -> None:
    """Noise 0 isolates the clipping: each update (reply - global) is scaled to norm <= 0.5
    before averaging, so the global model moves by at most 0.5."""
    led = Ledgered(
        build_strategy(spec(differentialPrivacy={"clippingNorm": 0.5, "noiseMultiplier": 0}), 2),
        0,
        2,
    )
    arrays = ArrayRecord(OrderedDict(w=torch.zeros(4)))
    first, second = led.configure_train(1, arrays, ConfigRecord({}), Grid())
    aggregated, _ = led.aggregate_train(1, [reply(first, 10.0, 1), reply(second, 10.0, 1)])
    moved = aggregated.to_torch_state_dict()["w"]
    assert torch.linalg.vector_norm(moved).item() == pytest.approx(0.5, rel=1e-5)


def server_rounds(rounds: range, led: Ledgered, arrays: ArrayRecord) -> ArrayRecord:
    """Run ``rounds`` of ``led`` from ``arrays``: the silos reply with w + 1 and w + 3."""
    for server_round in rounds:
        messages = list(led.configure_train(server_round, arrays, ConfigRecord({}), Grid()))
        w = arrays.to_torch_state_dict()["w"]
        replies = [
            reply(messages[0], float(w[0]) + 1.0, 1),
            reply(messages[1], float(w[0]) + 3.0, 1),
        ]
        arrays, _ = led.aggregate_train(server_round, replies)
    return arrays


def test_fedavgm_steps_by_the_server_learning_rate_and_momentum() -> None:
    """The silos' average update is +2 a round. Server learning rate 2 without momentum
    applies their sum (+4 a round); momentum 0.5 adds half the previous step's direction
    (+4, then 2 x (2 + 0.5 x 2) = +6)."""
    start = ArrayRecord(OrderedDict(w=torch.zeros(4)))
    plain = Ledgered(build_strategy(spec(strategy={"type": "FedAvgM"}), 2), min_silos=2)
    assert server_rounds(range(1, 3), plain, start).to_torch_state_dict()["w"][0] == 4.0
    summed = {"type": "FedAvgM", "serverLearningRate": 2.0}
    led = Ledgered(build_strategy(spec(strategy=summed), 2), min_silos=2)
    assert server_rounds(range(1, 3), led, start).to_torch_state_dict()["w"][0] == 8.0
    heavy = {**summed, "serverMomentum": 0.5}
    led = Ledgered(build_strategy(spec(strategy=heavy), 2), min_silos=2)
    assert server_rounds(range(1, 3), led, start).to_torch_state_dict()["w"][0] == 10.0


@pytest.mark.parametrize("kind", ["FedAdam", "FedAvgM"])
def test_with_differential_privacy_a_server_optimizer_steps_from_the_private_release(
    kind, monkeypatch
) -> None:
    """Flower's DP wrapper noises what the strategy inside it returns, so an optimizer inside
    it would build its state from the silos' noiseless mean. build_strategy puts the
    wrapper around FedAvg and the optimizer after it: its state and its step come from the
    noised release alone (the noiseless clipped mean, 0.25 a coordinate here, is seen by
    nothing but the wrapper)."""
    settings = {"type": kind, "serverLearningRate": 2.0}
    if kind == "FedAvgM":
        settings["serverMomentum"] = 0.9
    dp = {"clippingNorm": 0.5, "noiseMultiplier": 1.0}
    led = Ledgered(build_strategy(spec(strategy=settings, differentialPrivacy=dp), 2), 0, 2)
    composed = led.inner
    assert isinstance(composed, OptimizerAfterPrivacy)
    assert type(composed.private.strategy) is FedAvg and type(composed.strategy).__name__ == kind
    releases = []
    private_aggregate = composed.private.aggregate_train

    def spy(server_round, replies):
        out = private_aggregate(server_round, replies)
        releases.append(out[0].to_torch_state_dict()["w"].clone())
        return out

    monkeypatch.setattr(composed.private, "aggregate_train", spy)
    start = ArrayRecord(OrderedDict(w=torch.zeros(4)))
    first, second = led.configure_train(1, start, ConfigRecord({}), Grid())
    stepped, _ = led.aggregate_train(1, [reply(first, 10.0, 1), reply(second, 10.0, 1)])
    (release,) = releases
    noiseless = torch.full((4,), 0.25)
    assert not torch.allclose(release, noiseless, atol=1e-3)  # the noise is there
    state = optimizer_state(led)
    if kind == "FedAvgM":  # round 1's momentum: the pseudo-gradient old - new
        (momentum,) = state.values()
        assert torch.allclose(torch.from_numpy(momentum), -release)
        assert torch.allclose(stepped.to_torch_state_dict()["w"], 2.0 * release)
    else:  # the first moment: (1 - beta_1) x (release - global)
        assert torch.allclose(torch.from_numpy(state["m_t/w"]), 0.1 * release, atol=1e-6)
        assert not torch.allclose(torch.from_numpy(state["m_t/w"]), 0.1 * noiseless, atol=1e-4)


@pytest.mark.parametrize(
    ("settings", "keys"),
    [
        ({"type": "FedAdam", "serverLearningRate": 0.1}, ["m_t/w", "v_t/w"]),
        (
            {"type": "FedAvgM", "serverLearningRate": 1.5, "serverMomentum": 0.9},
            ["momentum/00000/w"],
        ),
        # after the DP wrapper (noise 0, a clipping norm no update reaches: deterministic)
        (
            {"type": "FedAdam", "serverLearningRate": 0.1, "dp": True},
            ["m_t/w", "v_t/w"],
        ),
    ],
    ids=["FedAdam", "FedAvgM", "FedAdam-after-DP"],
)
def test_a_resumed_server_optimizer_takes_the_steps_the_uninterrupted_one_takes(
    settings, keys
) -> None:
    """FedAdam's moments (and its bias correction's round number) and FedAvgM's momentum
    survive a restart: three rounds in one go equal one round, a checkpoint of
    optimizer_state, and two more rounds in a fresh strategy resumed from it (without the
    state they differ)."""
    settings = dict(settings)
    private = {"clippingNorm": 1e6, "noiseMultiplier": 0.0} if settings.pop("dp", False) else None
    fed = spec(strategy=settings, **({"differentialPrivacy": private} if private else {}))
    start = ArrayRecord(OrderedDict(w=torch.zeros(4)))
    straight = server_rounds(range(1, 4), Ledgered(build_strategy(fed, 2), min_silos=2), start)

    first = Ledgered(build_strategy(fed, 2), min_silos=2)
    after_one = server_rounds(range(1, 2), first, start)
    saved = optimizer_state(first)
    assert sorted(saved) == keys
    resumed = Ledgered(build_strategy(fed, 2), round_offset=1, min_silos=2)
    restore_optimizer_state(resumed, saved)
    # Flower numbers a restarted run's rounds from 1 again; Ledgered adds the offset
    finished = server_rounds(range(1, 3), resumed, after_one)
    expected = straight.to_torch_state_dict()["w"]
    assert torch.allclose(finished.to_torch_state_dict()["w"], expected)

    forgetful = Ledgered(build_strategy(fed, 2), round_offset=1, min_silos=2)
    lost = server_rounds(range(1, 3), forgetful, after_one)
    assert not torch.allclose(lost.to_torch_state_dict()["w"], expected)
    assert optimizer_state(Ledgered(build_strategy(spec(), 2), min_silos=2)) == {}
