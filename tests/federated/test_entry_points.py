"""How a federated RecJob reaches its launcher, and where it is refused: `recjob validate`
says what will run, `recjob-train` (the PyTorchJob's trainer) refuses a federated config
instead of training on spec.data, what the operator on Kubernetes refuses (Valid=False:
partitions, silos that would share a claim; see tests/cluster/test_federated.py), and the
ServerApp's progress events read as rounds."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from recjob_operator.api.documents import load_documents
from recjob_operator.api.semantics_federated import (
    FEDERATED_PARTITION_LOCAL_ONLY,
    FEDERATED_SILO_PVC,
    cluster_problems,
)
from recjob_operator.api.validation import parse_recjob
from recjob_operator.cli import cli as recjob_cli
from recjob_trainer.cli import cli as train_cli
from recjob_trainer.progress import describe

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PARTITION = EXAMPLES / "federated" / "recjob-federated-partition.yaml"


def test_recjob_validate_summarises_the_federation() -> None:
    result = CliRunner().invoke(
        recjob_cli, ["validate", str(EXAMPLES / "federated" / "recjob-federated.yaml")]
    )
    assert result.exit_code == 0, result.output
    assert (
        "federated over 2 silos: 10 rounds x 50 steps, FedProx, lora exchanged, DP "
        in result.output
    )
    assert "node(s)" not in result.output


def test_recjob_train_refuses_a_federated_config(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        train_cli, ["--recjob", str(PARTITION), "--output", str(tmp_path / "run")]
    )
    assert result.exit_code == 1
    assert "training.federated is set" in result.output
    assert "python -m recjob_trainer.federated" in result.output
    assert not (tmp_path / "run").exists()  # refused before any data were read


def test_the_kubernetes_backend_runs_silos_each_on_claims_of_their_own() -> None:
    federated = parse_recjob(load_documents(PARTITION)[0].content)
    [problem] = cluster_problems(federated)
    assert problem.path == "spec.training.federated.partition"
    assert problem.message == FEDERATED_PARTITION_LOCAL_ONLY
    document = load_documents(EXAMPLES / "federated" / "recjob-federated.yaml")[0].content
    assert cluster_problems(parse_recjob(document)) == []  # north-logs, south-logs: own claims

    silos = document["spec"]["training"]["federated"]["silos"]
    silos[1]["data"]["test"] = "pvc://north-logs/south-test.csv"  # south reads north's claim
    silos[0]["data"]["validation"] = "s3://north/valid.csv"
    document["spec"]["artifactsUri"] = "pvc://south-logs/runs"  # the owner's pods mount it
    problems = {(p.path, p.message) for p in cluster_problems(parse_recjob(document))}
    fed = "spec.training.federated"
    assert (f"{fed}.silos[0].data.validation", FEDERATED_SILO_PVC) in problems
    paths = {path for path, _ in problems}
    assert paths == {
        f"{fed}.silos[0].data.validation",
        f"{fed}.silos[1].data.train",  # south-logs is the artifacts claim too
        f"{fed}.silos",  # north-logs holds north's and south's data
    }, problems
    message = dict(problems)[f"{fed}.silos"]
    assert "north-logs" in message and "north, south" in message
    # in another namespace, south's claims are that namespace's: neither the owner's
    # artifacts claim nor north's, although they have the same names
    silos[1]["namespace"] = "south"
    problems = {p.path for p in cluster_problems(parse_recjob(document))}
    assert problems == {f"{fed}.silos[0].data.validation"}, problems
    plain = parse_recjob(load_documents(EXAMPLES / "recjob-search.yaml")[0].content)
    assert cluster_problems(plain) == []


def test_federated_progress_events_read_as_rounds() -> None:
    assert describe("start", {"stage": "federated", "total_steps": 5, "silos": 4}) == (
        "[federated] 5 rounds over 4 connected silo(s)"
    )
    line = describe(
        "progress", {"stage": "federated", "step": 2, "total_steps": 5, "loss": 0.5, "silos": 3}
    )
    assert line == "[federated] round 2/5: mean loss 0.5 from 3 silo(s)"
    assert describe("resumed", {"stage": "federated", "step": 2}) == (
        "[federated] resumed after round 2 (its checkpoint)"
    )
