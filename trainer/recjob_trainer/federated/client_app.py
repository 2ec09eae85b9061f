"""The ClientApp every silo's SuperNode runs: the silo's data summary on a query message,
one round of local training on a train message. It learns where its data are only from
its SuperNode's ``--node-config silo-config=...`` (never from the server)."""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

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


@app.train()
def train(message: Message, context: Context) -> Message:
    """Local steps from the global weights; replies with the updated exchanged weights."""
    from ..models import ModelInfo

    config = message.content["config"]
    result = _silo(context).train_round(
        ModelInfo(**json.loads(str(config["model-info"]))),
        message.content["arrays"],
        exchange=str(config["exchange"]),
        round_number=int(config["federated-round"]),
        local_steps=int(config["local-steps"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    metrics = MetricRecord(
        {
            "num-examples": result.examples,
            "train-loss": result.mean_loss,
            "train-seconds": result.seconds,
        }
    )
    return Message(RecordDict({"arrays": result.arrays, "metrics": metrics}), reply_to=message)


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
