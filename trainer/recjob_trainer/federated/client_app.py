"""The ClientApp every silo's SuperNode runs: the silo's data summary on a query message,
one round of local training on a train message. It learns where its data are only from
its SuperNode's ``--node-config silo-config=...`` (never from the server).

With ``secureAggregation`` in the silo's config, a train message must be part of SecAgg+
(:mod:`.secure`): the silo then sends its update only masked, and refuses a plain round."""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .secure import (
    check_setup,
    fit_instructions,
    fit_reply,
    is_secure_round,
    secure_aggregation_mod,
)
from .silo import SiloTrainer

app = ClientApp()
_trainers: dict[str, SiloTrainer] = {}


def _silo(context: Context) -> SiloTrainer:
    path = str(context.node_config["silo-config"])
    if path not in _trainers:  # one per process: its prepared data are reused by rounds
        _trainers[path] = SiloTrainer(path)
    return _trainers[path]


@app.query()
def query(message: Message, context: Context) -> Message:
    """Counts and label range of the silo's training data (what ModelInfo needs)."""
    summary = _silo(context).summary()
    return Message(RecordDict({"summary": ConfigRecord(summary)}), reply_to=message)


def _silo_terms(message: Message, context: Context, call_next) -> Message:
    """A SecAgg+ setup must be as strong as the silo's own config asks (a mod of the train
    handler: every message it sees is a train message)."""
    if is_secure_round(message):
        participation = _silo(context).config.training.federated.participation
        check_setup(message, participation.min_silos)
    return call_next(message, context)


@app.train(mods=[_silo_terms, secure_aggregation_mod])
def train(message: Message, context: Context) -> Message:
    """Local steps from the global weights; replies with the updated exchanged weights
    (in a secure round, their difference from the global ones, masked by SecAgg+)."""
    from ..models import ModelInfo

    silo = _silo(context)
    secure = is_secure_round(message)
    if secure:
        start, config = fit_instructions(message)
    elif silo.config.training.federated.secure_aggregation:
        raise PermissionError(
            "this silo sends its updates only by secure aggregation (secureAggregation is "
            "true in its config) and was asked for a plain training round"
        )
    else:
        start, config = message.content["arrays"], message.content["config"]
    result = silo.train_round(
        ModelInfo(**json.loads(str(config["model-info"]))),
        start,
        exchange=str(config["exchange"]),
        round_number=int(config["federated-round"]),
        local_steps=int(config["local-steps"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    metrics = {
        "num-examples": result.examples,
        "train-loss": result.mean_loss,
        "train-seconds": result.seconds,
    }
    if secure:  # with DP, the silo clips its update to its own config's norm
        dp = silo.config.training.federated.differential_privacy
        clip = dp.clipping_norm if dp is not None else None
        return fit_reply(message, start, result.arrays, metrics, clipping_norm=clip)
    return Message(
        RecordDict({"arrays": result.arrays, "metrics": MetricRecord(metrics)}), reply_to=message
    )


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """The final global model on the silo's test split: metrics and the group count."""
    from ..models import ModelInfo

    config = message.content["config"]
    metrics = _silo(context).evaluate(
        ModelInfo(**json.loads(str(config["model-info"]))),
        message.content["arrays"],
        exchange=str(config["exchange"]),
    )
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
