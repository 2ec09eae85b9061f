"""A PyTorchJob pod's launch: `recjob-train --launch` turns the variables the Kubeflow
Training Operator (v1.9.3, pkg/controller.v1/pytorch/envvar.go and master.go) injects into
a torchrun command, and two 'pods' of 2 processes each, started exactly as the PyTorchJob
built by the operator says, train one world of 4."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from recjob_operator.api.validation import parse_recjob
from recjob_operator.controller.children import (
    CONFIG_MOUNT,
    HOME,
    PVC_ROOT,
    TERMINATION_LOG,
    pytorch_job,
    training_config_map,
)
from recjob_trainer import launch
from recjob_trainer.cli import cli
from tests.conftest import SHARED
from tests.trainer.test_training import BIN, free_port, kill_tree, search_slice


def training_operator_env(job: dict, replica_type: str, index: int) -> dict[str, str]:
    """What Training Operator v1.9.3 appends to the `pytorch` container's env of pod
    ``<job>-<replica_type>-<index>`` (no elasticPolicy), in its order."""
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    nodes = sum(r["replicas"] for r in replicas.values())
    nproc = spec["nprocPerNode"]
    (container,) = [
        c for c in replicas["Master"]["template"]["spec"]["containers"] if c["name"] == "pytorch"
    ]
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "pytorchjob-port"]
    master = f"{job['metadata']['name']}-master-0"
    rank = index + (1 if replica_type == "Worker" else 0)
    return {
        "PYTHONUNBUFFERED": "1",
        "MASTER_PORT": str(port),
        "PET_MASTER_PORT": str(port),
        "MASTER_ADDR": master,
        "PET_MASTER_ADDR": master,
        "WORLD_SIZE": str(nodes * (int(nproc) if nproc.isdigit() else 1)),
        "RANK": str(rank),  # the pod's node rank
        "PET_NODE_RANK": str(rank),
        "PET_NPROC_PER_NODE": nproc,
        "PET_NNODES": str(nodes),
    }


def recjob(nodes: int = 2, processes: int = 2, train: str = "pvc://recjob-data/queries.csv"):
    document = {
        "apiVersion": "recjob.dev/v1alpha1",
        "kind": "RecJob",
        "metadata": {"name": "launch", "namespace": "shop", "uid": "0f0c1e6e-2a4e-4a4b"},
        "spec": {
            "data": {
                "task": "search-ranking",
                "train": train,
                "columns": {
                    "query": "search_term",
                    "itemId": "product_uid",
                    "itemText": "product_title",
                    "label": "relevance",
                },
                "preprocessing": {"split": {"validationFraction": 0.2, "testFraction": 0.2}},
            },
            "model": {"maxSequenceLength": 24},
            "training": {
                "nodes": nodes,
                "processesPerNode": processes,
                "microBatchSize": 4,
                "maxSteps": 2,
                "precision": "fp32",
                "deepspeed": {"zeroStage": 2},
                "evalIntervalSteps": 100,
                "checkpoint": {"intervalSteps": 2},
            },
        },
    }
    return parse_recjob(document)


def test_the_operators_variables_become_torchrun_options() -> None:
    job = pytorch_job(recjob())
    env = training_operator_env(job, "Worker", 0)
    command = launch.torchrun_command(env, ["--config", "/etc/recjob/trainer.yaml"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[3:] == [
        "--nnodes=2",
        "--nproc-per-node=2",
        "--node-rank=1",
        "--master-addr=launch-g1-train-master-0",
        "--master-port=23456",
        "-m",
        "recjob_trainer",
        "--config",
        "/etc/recjob/trainer.yaml",
    ]
    # torchrun reads them as a static rendezvous of 2 nodes x 2 processes on the master
    from torch.distributed.run import config_from_args, get_args_parser

    config, _, args = config_from_args(get_args_parser().parse_args(command[3:]))
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 2)
    assert config.rdzv_backend == "static" and config.rdzv_configs["rank"] == 1
    assert config.rdzv_endpoint == "launch-g1-train-master-0:23456"
    assert args == ["-u", "-m", "recjob_trainer", "--config", "/etc/recjob/trainer.yaml"]


def test_launch_outside_a_pytorchjob_pod_fails_clearly(monkeypatch) -> None:
    for name in launch.TORCHRUN_OPTIONS.values():
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(cli, ["--launch", "--config", "trainer.yaml"])
    assert result.exit_code == 1
    assert "PET_NNODES" in result.output and "PET_MASTER_PORT" in result.output


def test_launch_execs_torchrun_with_the_trainer_options(monkeypatch) -> None:
    env = training_operator_env(pytorch_job(recjob(nodes=1, processes=1)), "Master", 0)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    seen = []
    monkeypatch.setattr(launch.os, "execv", lambda path, argv: seen.append((path, argv)))
    result = CliRunner().invoke(cli, ["--launch", "--config", "t.yaml", "--max-eval-groups", "5"])
    assert result.exit_code == 0, result.output
    ((path, argv),) = seen
    assert path == sys.executable and "--nnodes=1" in argv and "--nproc-per-node=1" in argv
    assert argv[-5:] == ["recjob_trainer", "--config", "t.yaml", "--max-eval-groups", "5"]


def _kubelet_paths(root: Path, pod: str) -> dict[str, Path]:
    """Container paths -> this machine: the ConfigMap, the PVCs, the pod's emptyDirs and
    its termination log."""
    return {
        CONFIG_MOUNT: root / "config",
        PVC_ROOT: root / "pvc",
        "/tmp": root / pod / "tmp",
        HOME: root / pod / "home",
        TERMINATION_LOG: root / pod / "termination-log",
    }


def _localize(value: str, paths: dict[str, Path]) -> str:
    for inside, outside in paths.items():
        if value == inside or value.startswith(inside + "/"):
            return str(outside) + value[len(inside) :]
    return value


# extended: tests/cluster/test_training.py runs this PyTorchJob (2 pods x 2 processes) on the
# real Training Operator and node agents in make test
@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.skipif(not (SHARED / "data").exists(), reason="../shared/data not present")
def test_two_pods_of_two_processes_train_one_world_of_four(tmp_path: Path) -> None:
    """The PyTorchJob children.py builds, run as the Training Operator and a kubelet would:
    each pod's container command with the container's env plus the operator's variables
    (MASTER_ADDR = 127.0.0.1: there is no DNS for <job>-master-0 here)."""
    (tmp_path / "pvc" / "recjob-data").mkdir(parents=True)
    slice_ = search_slice(tmp_path)
    slice_.rename(tmp_path / "pvc" / "recjob-data" / "queries.csv")
    job_object = recjob()
    job = copy.deepcopy(pytorch_job(job_object))
    (master,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    master["ports"][0]["containerPort"] = free_port()  # 23456 may be taken on this machine
    config = yaml.safe_load(training_config_map(job_object)["data"]["trainer.yaml"])
    config["evaluation"] = {"baselines": False, "maxGroups": 5, "batchSize": 32}  # quick
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "trainer.yaml").write_text(yaml.safe_dump(config))

    pods = []
    for replica_type, index in (("Master", 0), ("Worker", 0)):
        spec = job["spec"]["pytorchReplicaSpecs"][replica_type]["template"]["spec"]
        (container,) = spec["containers"]
        pod = f"{replica_type.lower()}-{index}"
        paths = _kubelet_paths(tmp_path, pod)
        for path in (paths["/tmp"], paths[HOME]):
            path.mkdir(parents=True)
        env = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "LANG": "C.UTF-8"}
        env.update({e["name"]: _localize(e["value"], paths) for e in container["env"]})
        env.update(training_operator_env(job, replica_type, index))
        env["MASTER_ADDR"] = env["PET_MASTER_ADDR"] = "127.0.0.1"
        # DeepSpeed's shared-memory comm op (2 CPU processes per node), built once for
        # every run on this machine rather than in each pod's fresh HOME (25-60 s)
        env["TORCH_EXTENSIONS_DIR"] = os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")
        )
        command = [_localize(arg, paths) for arg in container["command"]]
        log = (tmp_path / f"{pod}.log").open("w")
        pods.append(
            subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    deadline = time.time() + 480
    try:
        for pod in pods:
            pod.wait(timeout=max(1, deadline - time.time()))
    finally:
        for pod in pods:
            if pod.poll() is None:
                kill_tree(pod.pid)
    logs = [(tmp_path / f"{p}.log").read_text() for p in ("master-0", "worker-0")]
    assert [pod.returncode for pod in pods] == [0, 0], logs[0][-3000:] + logs[1][-3000:]

    run = tmp_path / "pvc" / "recjob-artifacts" / "launch" / "0f0c1e6e" / "g1" / "train"
    card = json.loads((run / "model-card.json").read_text())
    assert card["world_size"] == 4 and card["steps"] == 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["ranks"]["agree"] and len(metrics["ranks"]["parameter_digests"]) == 4
    deepspeed = json.loads((run / "deepspeed.json").read_text())  # derived by the trainer
    assert deepspeed["train_batch_size"] == 4 * 4
    summary = json.loads((tmp_path / "master-0" / "termination-log").read_text())
    assert summary["main_metric"] in summary["model"]
    assert not (tmp_path / "worker-0" / "termination-log").exists()
