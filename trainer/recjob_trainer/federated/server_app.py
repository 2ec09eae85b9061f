"""The ServerApp: the chosen strategy over the silos' updates, a checkpoint of the global
weights after every completed round, and the result written as ``recjob-train`` writes it
(``model/``, ``metrics.json``, ``model-card.json``) so conversion, the gate and the canary
take it unchanged.

It is told only :class:`.plan.ServerSettings` (no data URI). Every file this process opens
is recorded in ``federated/server-opened-files.json`` (a ``sys.addaudithook`` hook), which
is how the tests show that the server side never opens silo data."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid, ServerApp
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from recjob_operator.api.v1alpha1.spec_training import ModelSpec, TrainingSpec

from ..models import ModelInfo, base_model_path, build_model, save_model
from ..objective import apply_lora, merge_lora
from ..progress import Progress
from ..storage import atomic_directory, write_json_atomic
from .plan import SERVER_STATUS, ServerSettings
from .secure import SecureAggregationGrid
from .silo import merged_info
from .strategy import (
    Ledgered,
    build_strategy,
    checkpointing,
    optimizer_state,
    restore_optimizer_state,
)
from .weights import exchanged_names, load_record, to_record

app = ServerApp()
#: The server optimizer's state (FedAdam, FedAvgM), beside a round checkpoint's global weights.
OPTIMIZER_FILE = "server-optimizer.safetensors"


class OpenedFiles:
    """Every path this process opens from now on (Python's ``open`` audit event)."""

    def __init__(self) -> None:
        self.paths: set[str] = set()
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes)):
            path = args[0].decode(errors="replace") if isinstance(args[0], bytes) else args[0]
            self.paths.add(path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls in the ServerApp process."""
    opened = OpenedFiles()
    settings = ServerSettings.read(str(context.run_config["server-settings"]))
    out = Path(settings.output_dir)
    status: dict = {"status": "failed", "error": "interrupted"}
    try:
        serve(grid, settings)
        status = {"status": "completed", "error": None}
    except Exception as error:
        status = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        raise
    finally:
        write_json_atomic(out / "federated" / "server-opened-files.json", sorted(opened.paths))
        write_json_atomic(out / "federated" / SERVER_STATUS, {**status, "time": time.time()})


def _wait_for_silos(grid: Grid, needed: int, deadline: float) -> list[int]:
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= needed:
            return nodes
        if time.time() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} silo(s) connected within the round deadline; "
                f"participation.minSilos is {needed}"
            )
        time.sleep(0.5)


def _summaries(grid: Grid, nodes: list[int], timeout: float, needed: int) -> list[dict]:
    """Each silo's data summary (counts and label range)."""
    messages = [
        Message(RecordDict({}), dst_node_id=node, message_type=MessageType.QUERY) for node in nodes
    ]
    answers = list(grid.send_and_receive(messages, timeout=timeout))
    replies = [r for r in answers if not r.has_error()]
    if len(replies) < needed:
        errors = "; ".join(str(r.error.reason) for r in answers if r.has_error())
        raise RuntimeError(
            f"only {len(replies)} silo(s) answered the data summary query; "
            f"participation.minSilos is {needed}" + (f" (errors: {errors})" if errors else "")
        )
    return [dict(r.content["summary"]) for r in replies]


def serve(grid: Grid, settings: ServerSettings) -> None:
    """The whole federated run on the server side."""
    started = time.time()
    out = Path(settings.output_dir)
    fed_dir = out / "federated"
    ckpt_dir = fed_dir / "checkpoints"
    model_spec = ModelSpec.model_validate(settings.model)
    training = TrainingSpec.model_validate(settings.training)
    fed = training.federated
    part = fed.participation
    view = SimpleNamespace(
        model=model_spec, data=SimpleNamespace(task=settings.task), training=training
    )
    nodes = _wait_for_silos(grid, part.min_silos, time.time() + part.round_deadline_seconds)
    # what the model is: a restarted federation keeps its checkpoint's (no new query)
    digest = hashlib.sha256(
        json.dumps([settings.task, settings.model, fed.exchange], sort_keys=True).encode()
    ).hexdigest()
    done, history, state = 0, [], None
    latest = _latest_checkpoint(ckpt_dir)
    if latest is not None:
        state = json.loads((latest / "state.json").read_text())
        if state.get("spec_digest") != digest:
            raise RuntimeError(
                f"{latest} is a checkpoint of a different model or exchange; use a new "
                "output directory"
            )
        info, summaries = ModelInfo(**state["model_info"]), state["summaries"]
        done, history = int(state["round"]), state["rounds"]
    else:
        summaries = _summaries(grid, nodes, part.round_deadline_seconds, part.min_silos)
        info = merged_info(view, summaries)

    progress = Progress(out, fed.rounds, enabled=True)  # rounds are the run's steps
    progress.event("start", stage="federated", total_steps=fed.rounds, silos=len(nodes))
    if done:
        progress.event("resumed", stage="federated", step=done)
    torch.manual_seed(training.seed)
    encoder = base_model_path(model_spec.base_model, settings.base_dir)
    model = apply_lora(build_model(info, encoder), view)
    names = exchanged_names(model, fed.exchange)
    if state is not None:  # go on from the last completed round
        if state["names"] != names:
            raise RuntimeError(f"{latest} holds other tensors than this model exchanges")
        load_record(model, ArrayRecord(load_file(str(latest / "global.safetensors"))), names)

    # with secure aggregation, training rounds run SecAgg+ and the rest passes through
    secure = SecureAggregationGrid.for_training(grid, training) if fed.secure_aggregation else None
    grid = secure if secure is not None else grid
    strategy = Ledgered(
        build_strategy(fed, len(nodes)),
        round_offset=done,
        min_silos=part.min_silos,
        traffic=secure.last_round_bytes if secure is not None else None,
    )
    if latest is not None and (latest / OPTIMIZER_FILE).exists():
        restore_optimizer_state(strategy, load_numpy(str(latest / OPTIMIZER_FILE)))
    train_config = ConfigRecord(
        {
            "model-info": json.dumps(asdict(info)),
            "exchange": fed.exchange,
            "local-steps": fed.local_steps,
        }
    )

    def save(round_number: int, arrays: ArrayRecord) -> None:
        rounds = history + [r.to_json() for r in strategy.rounds]
        with atomic_directory(ckpt_dir / f"round-{round_number:06d}") as tmp:
            save_file(
                {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()},
                str(tmp / "global.safetensors"),
            )
            moments = optimizer_state(strategy)
            if moments:  # a server optimizer's state goes on from here on a resume
                save_numpy(moments, str(tmp / OPTIMIZER_FILE))
            state = {"round": round_number, "spec_digest": digest, "model_info": asdict(info),
                     "summaries": summaries, "names": names, "rounds": rounds}  # fmt: skip
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
        last = strategy.rounds[-1] if strategy.rounds else None
        progress.event("progress", stage="federated", step=round_number,
                       total_steps=fed.rounds, loss=last.mean_loss if last else None,
                       silos=last.replied_silos if last else None)  # fmt: skip

    arrays = to_record(model, names)
    if fed.rounds > done:
        result = strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=fed.rounds - done,
            timeout=part.round_deadline_seconds,
            train_config=train_config,
            evaluate_fn=checkpointing(save, done),
        )
        arrays = result.arrays
    load_record(model, arrays, names)
    test = _evaluate_on_silos(grid, nodes, arrays, train_config, part.round_deadline_seconds)
    rounds = history + [r.to_json() for r in strategy.rounds]
    described = secure.describe() if secure is not None else None
    _write_outputs(out, settings, model_spec, training, info, model, rounds, summaries, done,
                   test, time.time() - started, described)  # fmt: skip
    progress.event("done", stage="federated", step=fed.rounds, **{
        f"test/{k}": v for k, v in test["weighted"].items() if k.endswith("ndcg@10")})  # fmt: skip
    progress.close()


def _evaluate_on_silos(
    grid: Grid, nodes: list[int], arrays: ArrayRecord, config: ConfigRecord, timeout: float
) -> dict:
    """Each silo measures the final global model on its own test split; the server gets
    the metrics only and averages them weighted by the silos' test groups."""
    messages = [
        Message(
            RecordDict({"arrays": arrays, "config": config}),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        for node in nodes
    ]
    per_silo = [
        {k: float(v) for k, v in r.content["metrics"].items()}
        for r in grid.send_and_receive(messages, timeout=timeout)
        if not r.has_error()
    ]
    total = sum(m["groups"] for m in per_silo)
    keys = set.intersection(*(set(m) for m in per_silo)) - {"groups"} if per_silo else set()
    weighted = {k: sum(m[k] * m["groups"] for m in per_silo) / total for k in sorted(keys)}
    return {"per_silo": per_silo, "weighted": {**weighted, "groups": total}}


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.exists():
        return None
    done = sorted(p for p in ckpt_dir.glob("round-*") if (p / "state.json").exists())
    return done[-1] if done else None


def privacy_spent(fed, rounds: int, silos: int) -> dict | None:
    """(epsilon, delta) of server-side fixed-clipping DP after ``rounds`` rounds, by Opacus's
    RDP accountant (sampling rate: the fraction of silos sampled per round)."""
    dp = fed.differential_privacy
    if dp is None:
        return None
    out = {"clipping_norm": dp.clipping_norm, "noise_multiplier": dp.noise_multiplier,
           "delta": dp.delta, "rounds": rounds, "accountant": "opacus-rdp"}  # fmt: skip
    if dp.noise_multiplier == 0 or rounds == 0:
        out["epsilon"] = None if rounds else 0.0
        return out
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    rate = min(1.0, max(fed.participation.min_silos, silos * fed.participation.fraction) / silos)
    accountant.history = [(dp.noise_multiplier, rate, rounds)]
    out["sample_rate"] = rate
    out["epsilon"] = float(accountant.get_epsilon(delta=dp.delta))
    return out


def _write_outputs(out, settings, model_spec, training, info: ModelInfo, model, rounds,
                   summaries, resumed_from, test, seconds, secure) -> None:  # fmt: skip
    """model/ (LoRA merged, the trainer's layout), metrics.json and model-card.json."""
    from transformers import AutoTokenizer

    fed = training.federated
    encoder = base_model_path(model_spec.base_model, settings.base_dir)
    plain = merge_lora(model).eval()
    with atomic_directory(out / "model") as tmp:
        save_model(plain, plain.state_dict(), AutoTokenizer.from_pretrained(encoder), tmp)
    federated = {
        "engine": "flower-deployment",
        "silos": len(summaries),
        "silo_rows": sorted(int(s["rows"]) for s in summaries),
        "rounds_completed": len(rounds),
        "rounds": rounds,
        "resumed_from_round": resumed_from or None,
        "strategy": fed.strategy.model_dump(mode="json", by_alias=True, exclude_none=True),
        "exchange": fed.exchange,
        "secure_aggregation": secure,
        "local_steps": fed.local_steps,
        "bytes_total": sum(r["bytes_total"] for r in rounds),
        "bytes_per_round": [r["bytes_total"] for r in rounds],
        "privacy": privacy_spent(fed, len(rounds), len(summaries)),
    }
    metrics = {
        "task": settings.task,
        "split": "test",
        "model": test["weighted"],  # the silos' test splits, weighted by their groups
        "test_per_silo": test["per_silo"],
        "federated": federated,
        "steps": len(rounds) * fed.local_steps,
    }
    write_json_atomic(out / "metrics.json", metrics)
    weights = (out / "model" / "model.safetensors").read_bytes()
    card = {
        "name": settings.name,
        "task": settings.task,
        "base_model": model_spec.base_model,
        "architecture": info.kind,
        "objective": info.objective,
        "checkpoint_digest": "sha256:" + hashlib.sha256(weights).hexdigest(),
        "parameters": sum(p.numel() for p in plain.parameters()),
        "hyperparameters": training.model_dump(mode="json", by_alias=True, exclude_none=True),
        "fine_tuning": model_spec.fine_tuning.model_dump(
            mode="json", by_alias=True, exclude_none=True
        ),
        "federated": {k: v for k, v in federated.items() if k != "rounds"},
        "wall_time_seconds": round(seconds, 2),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    write_json_atomic(out / "model-card.json", card)
