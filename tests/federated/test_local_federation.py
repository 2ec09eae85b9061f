"""Federated fine-tuning on Flower's deployment engine, end to end on this machine.

A SuperLink and two SuperNodes run as separate processes on loopback with TLS; each silo's
data sit in a folder whose path only that silo's trainer config (read by its SuperNode's
ClientApp) names. Two rounds of LoRA fine-tuning of the bundled MiniLM cross-encoder on
tiny synthetic search logs; the whole federation is killed once round 1 is checkpointed,
and started again it resumes with round 2."""

from __future__ import annotations

import json
import random
import socket
import ssl
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from recjob_trainer.config import load_config
from recjob_trainer.federated.local import launch, run_federation
from recjob_trainer.models import base_model_path, load_model

pytestmark = pytest.mark.slow

TOPICS = {
    "north": (["drill", "saw", "hammer", "wrench", "sander"], ["cordless", "steel", "heavy"]),
    "south": (["hose", "rake", "shovel", "mower", "planter"], ["garden", "lawn", "outdoor"]),
}


def silo_logs(path: Path, silo: str, queries: int = 24, seed: int = 0) -> Path:
    """Graded query-title pairs: the query's own product is relevant (3), others not."""
    rng = random.Random(f"{silo}-{seed}")
    nouns, adjectives = TOPICS[silo]
    rows = ["q,title,relevance"]
    for i in range(queries):
        noun, adjective = nouns[i % len(nouns)], rng.choice(adjectives)
        query = f"{adjective} {noun} {i}"
        rows.append(f"{query},{adjective} {noun} model {i},3")
        rows.append(f"{query},{rng.choice(nouns)} spare part {i},2")
        rows.append(f"{query},{rng.choice(adjectives)} gift card {i},1")
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.csv").write_text("\n".join(rows) + "\n")
    return path / "train.csv"


def handshake(port: int, context: ssl.SSLContext) -> dict:
    """A TLS handshake with the local SuperLink; the subject of its certificate."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return dict(pair[0] for pair in tls.getpeercert()["subject"])


def config_file(
    tmp: Path, data: dict[str, Path], output: Path, rounds: int = 2, **federated: object
) -> Path:
    doc = {
        "name": "fed",
        "outputUri": str(output),
        "data": {
            "task": "search-ranking",
            "train": str(data["north"]),  # spec.data: columns/format; silos bring their URIs
            "columns": {"query": "q", "itemText": "title", "label": "relevance"},
            "preprocessing": {"split": {"validationFraction": 0.2, "testFraction": 0.2}},
        },
        "model": {
            "maxSequenceLength": 16,
            "fineTuning": {"method": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}},
        },
        "training": {
            "microBatchSize": 4,
            "learningRate": 0.005,
            "federated": {
                "silos": [
                    {"name": name, "data": {"train": str(path)}} for name, path in data.items()
                ],
                "rounds": rounds,
                "localSteps": 2,
                "participation": {"minSilos": 2, "roundDeadlineSeconds": 120},
                **federated,
            },
        },
        "evaluation": {"baselines": False},
    }
    path = tmp / f"trainer-{rounds}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# extended: tests/cluster/test_federated.py kills the SuperLink after round 1 and checks the
# resume, TLS and the ServerApp's opened files on the real cluster in make test
@pytest.mark.extended
def test_two_silos_two_rounds_killed_after_round_one_then_resumed(tmp_path: Path) -> None:
    owners = tmp_path / "owners"  # the data owners' premises, outside the federation's folders
    data = {name: silo_logs(owners / name, name) for name in TOPICS}
    output, work = tmp_path / "run", tmp_path / "federation"
    config = load_config(config_file(tmp_path, data, output))
    rounds_dir = output / "federated" / "checkpoints"

    # a crash: every process of the federation (SuperLink, SuperNodes, their ServerApp and
    # ClientApps) is stopped as soon as round 1 is checkpointed
    federation, _, _ = launch(config, work)
    try:
        # the SuperLink speaks TLS only, with the certificate of the federation's own CA
        ca = ssl.create_default_context(cafile=str(work / "tls" / "ca.crt"))
        assert handshake(federation.port, ca)["commonName"] == "recjob superlink"
        with pytest.raises(ssl.SSLCertVerificationError):  # no trust without that CA
            handshake(federation.port, ssl.create_default_context())
        with socket.create_connection(("127.0.0.1", federation.port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # plain HTTP
            assert not raw.recv(64).startswith(b"HTTP/")
        deadline = time.time() + 240
        while not (rounds_dir / "round-000001" / "state.json").exists():
            assert time.time() < deadline, "round 1 was not checkpointed in 240 s"
            assert federation.processes["superlink"].poll() is None
            time.sleep(0.2)
    finally:
        federation.stop()
    assert not (rounds_dir / "round-000002").exists() and not (output / "model").exists()

    # started again, the federation resumes after round 1 and runs round 2
    metrics = run_federation(config, work, 900)
    fed = metrics["federated"]
    assert fed["resumed_from_round"] == 1

    # two rounds, both silos in each, model updates counted both ways
    assert fed["engine"] == "flower-deployment" and fed["silos"] == 2
    assert fed["rounds_completed"] == 2 and [r["round"] for r in fed["rounds"]] == [1, 2]
    for r in fed["rounds"]:
        assert (r["sampled_silos"], r["replied_silos"], r["failed_silos"]) == (2, 2, 0)
        assert r["bytes_to_silos"] == r["bytes_from_silos"] > 0  # the same tensors each way
        assert r["examples"] == 2 * 2 * 4  # silos x localSteps x microBatchSize
        assert r["mean_loss"] is not None and r["mean_loss"] > 0
    assert fed["bytes_per_round"] == [r["bytes_total"] for r in fed["rounds"]]
    assert fed["superlink"]["tls"] and fed["superlink"]["network_traffic"]["total-bytes"] > 0

    # only LoRA adapters + the head cross the wire: a small fraction of the model's weights
    weights = load_file(str(output / "model" / "model.safetensors"))
    model_bytes = sum(t.numel() * 4 for t in weights.values())
    per_silo = fed["rounds"][0]["bytes_to_silos"] / 2
    assert per_silo < 0.05 * model_bytes, (per_silo, model_bytes)

    # the global model changed: LoRA's B starts at zero, so a merged query weight differs
    # from the pretrained one only if the silos trained and the server aggregated it
    base = load_file(str(Path(base_model_path("all-MiniLM-L6-v2")) / "model.safetensors"))
    key = next(k for k in base if k.endswith("layer.0.attention.self.query.weight"))
    ours = next(v for k, v in weights.items() if k.endswith("layer.0.attention.self.query.weight"))
    assert not torch.allclose(ours, base[key]), "LoRA deltas did not reach the global model"
    one = load_file(str(rounds_dir / "round-000001" / "global.safetensors"))
    two = load_file(str(rounds_dir / "round-000002" / "global.safetensors"))
    assert one.keys() == two.keys() and any(not torch.equal(one[k], two[k]) for k in one)

    # each silo measured the final global model on its own test split; only numbers came back
    assert len(metrics["test_per_silo"]) == 2 and metrics["split"] == "test"
    assert all(m["groups"] >= 1 and 0 <= m["ndcg@10"] <= 1 for m in metrics["test_per_silo"])
    groups = [m["groups"] for m in metrics["test_per_silo"]]
    weighted = sum(m["ndcg@10"] * n for m, n in zip(metrics["test_per_silo"], groups, strict=True))
    assert metrics["model"]["ndcg@10"] == pytest.approx(weighted / sum(groups))

    # the trainer's model/ layout: it reloads and scores
    model, tokenizer = load_model(output / "model")
    batch = tokenizer(["cordless drill 0"], ["cordless drill model 0"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch)).all()
    card = json.loads((output / "model-card.json").read_text())
    assert card["federated"]["silos"] == 2 and card["checkpoint_digest"].startswith("sha256:")

    # the server side never opened a silo's files; the hook did see the server's own files
    opened = json.loads((output / "federated" / "server-opened-files.json").read_text())
    assert any(p.endswith("settings.json") for p in opened)
    private = [str(owners), str(work / "silos")]
    assert not [p for p in opened if any(p.startswith(root) for root in private)]
    settings = (work / "server" / "settings.json").read_text()
    assert str(owners) not in settings and str(work / "silos") not in settings


# extended: tests/federated/test_strategy.py checks the optimizer's step from the private
# release and its resume; the SecAgg+ DP run below runs Flower's deployment engine with DP
@pytest.mark.extended
def test_a_server_optimizer_with_differential_privacy_runs_on_the_deployment_engine(
    tmp_path: Path,
) -> None:
    """FedAvgM with momentum after central DP (OptimizerAfterPrivacy) in the real ServerApp:
    both rounds complete, the privacy spent is reported and the momentum the optimizer
    built from the private releases is checkpointed with each round."""
    data = {name: silo_logs(tmp_path / "owners" / name, name) for name in TOPICS}
    output = tmp_path / "run"
    path = config_file(
        tmp_path, data, output,
        strategy={"type": "FedAvgM", "serverLearningRate": 2.0, "serverMomentum": 0.9},
        differentialPrivacy={"clippingNorm": 1.0, "noiseMultiplier": 0.5},
    )  # fmt: skip
    metrics = run_federation(load_config(path), tmp_path / "federation", 900)
    fed = metrics["federated"]
    assert fed["rounds_completed"] == 2
    assert fed["privacy"]["epsilon"] > 0 and fed["privacy"]["noise_multiplier"] == 0.5
    rounds_dir = output / "federated" / "checkpoints"
    for n in (1, 2):
        state = load_file(str(rounds_dir / f"round-{n:06d}" / "server-optimizer.safetensors"))
        assert state and all(k.startswith("momentum/") for k in state)
    one = load_file(str(rounds_dir / "round-000001" / "server-optimizer.safetensors"))
    two = load_file(str(rounds_dir / "round-000002" / "server-optimizer.safetensors"))
    assert any(not torch.equal(one[k], two[k]) for k in one)


# extended: make test runs SecAgg+ on the deployment engine (test_silo_dropout.py, and on the
# cluster), and the silos' clipping under DP in test_secure_aggregation.py
@pytest.mark.extended
def test_secure_aggregation_with_differential_privacy_runs_on_the_deployment_engine(
    tmp_path: Path,
) -> None:
    """SecAgg+ between the real ServerApp and the SuperNodes, with central DP (each silo
    clips its own update before masking it, the server noises the aggregate) and FedAdam
    stepping from the noised release: both rounds complete, each with both silos, the
    bytes of all four protocol stages counted (the masked vectors are wider than the
    plain fp32 update), the privacy spent reported and the global LoRA weights moved."""
    data = {name: silo_logs(tmp_path / "owners" / name, name) for name in TOPICS}
    output = tmp_path / "run"
    path = config_file(
        tmp_path, data, output, secureAggregation=True, strategy={"type": "FedAdam"},
        differentialPrivacy={"clippingNorm": 1.0, "noiseMultiplier": 0.5},
    )  # fmt: skip
    metrics = run_federation(load_config(path), tmp_path / "federation", 900)
    fed = metrics["federated"]
    assert fed["rounds_completed"] == 2
    assert fed["secure_aggregation"]["protocol"] == "secagg+"
    assert fed["secure_aggregation"]["reconstruction_threshold"] == 2  # minSilos
    assert fed["privacy"]["epsilon"] > 0
    card = json.loads((output / "model-card.json").read_text())
    assert card["federated"]["secure_aggregation"] == fed["secure_aggregation"]
    rounds_dir = output / "federated" / "checkpoints"
    one = load_file(str(rounds_dir / "round-000001" / "global.safetensors"))
    two = load_file(str(rounds_dir / "round-000002" / "global.safetensors"))
    plain = sum(t.numel() * 4 for t in one.values())  # one silo's fp32 update
    for record in fed["rounds"]:
        assert record["replied_silos"] == 2 and record["failed_silos"] == 0
        assert record["bytes_from_silos"] > 2 * plain
    assert any(not torch.equal(one[k], two[k]) for k in one)
    assert torch.isfinite(torch.cat([t.flatten() for t in two.values()])).all()
