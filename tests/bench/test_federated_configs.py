"""bench/federated.py: the trainer configs its runs train with, at the default settings
(validated by the trainer's own schema; milliseconds, nothing is trained)."""

from __future__ import annotations

import pytest

from recjob_trainer.config import TrainerConfig
from tests.bench.scripts import BENCH, load_script


@pytest.fixture
def federated(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # its sibling bench/common.py
    return load_script(BENCH / "federated.py")


def configs(federated, tmp_path) -> dict[str, TrainerConfig]:
    args = federated.arguments().parse_args(["--runs", str(tmp_path)])
    steps = args.rounds * args.local_steps * args.silos
    central = federated.centralized_config(args.data, tmp_path, args, steps)
    iid = federated.federated_config(
        "federated-iid", args.data, tmp_path, args,
        {"partition": {"by": "hash", "count": args.silos}},
    )  # fmt: skip
    return {name: TrainerConfig.model_validate(doc)
            for name, doc in (("centralized", central), ("federated IID", iid))}  # fmt: skip


def test_every_run_trains_in_fp32_by_default(federated, tmp_path):
    # bf16 (the RecJob default) is emulated on CPUs without bf16 arithmetic, such as the
    # project's 2-core AVX2 machines: the centralized run went from minutes to hours
    for name, config in configs(federated, tmp_path).items():
        assert config.training.precision == "fp32", name
    args = federated.arguments().parse_args(["--precision", "bf16"])
    assert federated.base_config("x", args.data, tmp_path, args)["training"]["precision"] == "bf16"


def test_runs_differ_only_in_the_federation(federated, tmp_path):
    found = configs(federated, tmp_path)
    central, iid = found["centralized"], found["federated IID"]
    assert iid.training.federated is not None and central.training.federated is None
    for field in ("learning_rate", "micro_batch_size", "precision"):
        assert getattr(iid.training, field) == getattr(central.training, field), field
    rounds, local = iid.training.federated.rounds, iid.training.federated.local_steps
    assert rounds * local * 4 == central.training.max_steps  # 4 silos: the same steps in all


def test_every_user_is_scored_unless_told(federated):
    assert federated.arguments().parse_args([]).eval_users == 0  # main(): all test users
    assert federated.arguments().parse_args(["--eval-users", "1000"]).eval_users == 1000
