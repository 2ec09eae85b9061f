"""How a federated RecJob reaches its launcher, and where it is refused: `recjob validate`
says what will run, `recjob-train` (the PyTorchJob's trainer) refuses a federated config
instead of training on spec.data, the operator on Kubernetes refuses it (Valid=False, see
tests/cluster/test_api_validation.py), and the ServerApp's progress events read as
rounds."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from recjob_operator.cli import cli as recjob_cli
from recjob_operator.documents import load_documents
from recjob_operator.validation import FEDERATED_LOCAL_ONLY, cluster_problems, parse_recjob
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
        "(local mode only)" in result.output
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


def test_the_kubernetes_backend_refuses_federated_recjobs_only() -> None:
    federated = parse_recjob(load_documents(PARTITION)[0].content)
    [problem] = cluster_problems(federated)
    assert (problem.path, problem.message) == ("spec.training.federated", FEDERATED_LOCAL_ONLY)
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
